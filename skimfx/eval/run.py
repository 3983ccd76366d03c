"""Evaluate recipes against dense on one task with the same code: a table (markdown + json) and a
plot of quality vs prefill time, one point per recipe and the dense point."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from .agreement import agreement
from .haystack import niah_prompts
from .passkey import passkey_correct, passkey_prompts
from .perplexity import perplexity, text_ids
from .ruler import TASKS as RULER_TASKS
from .ruler import ruler_samples
from .synthetic import SYNTHETIC, score

# passkey and SYNTHETIC: this package's generators; niah: needles in Paul Graham's essays (haystack.py);
# ruler_*: RULER's own generators from lm-eval (ruler.py)
# perplexity: the Python license's continuation (short contexts); perplexity_essays: the essays', over
# n_prompts windows (long contexts)
TASKS = ("passkey", *SYNTHETIC, "niah", *(f"ruler_{t}" for t in RULER_TASKS), "perplexity", "perplexity_essays",
         "agreement")
METRIC = {"perplexity": "perplexity", "perplexity_essays": "perplexity", "agreement": "top1"}   # the rest: accuracy


def evaluate(model, tok, recipes: list[str], task: str, length: int = 1000, n_prompts: int = 10,
             out_dir: str | Path | None = None, seed: int = 0) -> list[dict]:
    """Rows for dense + each recipe string on ``task`` at prompts of ~``length`` tokens."""
    import skimfx

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    parsed = {"dense": []}
    for r in recipes:
        rec = skimfx.parse_recipe(r)        # validate every string before any work
        parsed[skimfx.recipe_label(rec)] = rec
    if task in SYNTHETIC:
        examples = SYNTHETIC[task](tok, length, n=n_prompts, seed=seed)
        ids = [e.ids for e in examples]
    elif task == "niah":
        depths = tuple(i / 4 for i in range(5))
        needles = niah_prompts(tok, length, depths=depths, per_depth=max(1, n_prompts // len(depths)), seed=seed)
        ids = [p.ids for p in needles]
    elif task.startswith("ruler_"):
        samples = ruler_samples(task[len("ruler_"):], tok, length, n_prompts, seed=seed)
        ids = [s.ids for s in samples]
    elif task == "perplexity_essays":
        ids = [text_ids(tok, "essays")[:length]]          # the timed prefill: the first window's context
    else:
        depths = tuple(i / 4 for i in range(5))
        prompts = passkey_prompts(tok, length, depths=depths, keys_per_depth=max(1, n_prompts // len(depths)),
                                  seed=seed)
        ids = [p.ids for p in prompts]
    dense = None
    rows = []
    for name, rec in tqdm(parsed.items(), desc=f"eval {task}", unit="recipe"):
        cm = skimfx.compile(model, rec, tokenizer=tok)
        dense = dense or cm
        g = cm.generate(ids, max_new_tokens=48 if task.startswith("ruler_") else 24)   # cwe lists ten words
        row = {"recipe": name, "prompt_tokens": round(sum(map(len, ids)) / len(ids)), "ttft_s": g.stats.ttft_s,
               "kv_prefill_mib": g.stats.kv_prefill_bytes / 2**20}
        if task == "passkey":
            row["accuracy"] = sum(passkey_correct(tok, p, t) for p, t in zip(prompts, g.tokens)) / len(prompts)
        elif task in SYNTHETIC:
            row["accuracy"] = sum(score(tok, e, t) for e, t in zip(examples, g.tokens)) / len(examples)
        elif task == "niah":
            row["accuracy"] = sum(p.correct(tok, t) for p, t in zip(needles, g.tokens)) / len(needles)
        elif task.startswith("ruler_"):
            row["accuracy"] = sum(s.score(tok, t) for s, t in zip(samples, g.tokens)) / len(samples)
        elif task == "perplexity":
            row["perplexity"] = perplexity(cm.program, tok, context_tokens=length)
        elif task == "perplexity_essays":
            row["perplexity"] = perplexity(cm.program, tok, context_tokens=length, text="essays", windows=n_prompts)
        else:
            row.update(agreement(dense.program, cm.program, ids, n_tokens=16))
        rows.append(row)
    if out_dir is not None:
        write_report(rows, task, Path(out_dir))
    return rows


def write_report(rows: list[dict], task: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metric = METRIC.get(task, "accuracy")
    cols = ["recipe", "prompt_tokens", metric] + (["kl"] if task == "agreement" else []) + ["ttft_s", "kv_prefill_mib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (out / f"eval_{task}.md").write_text(f"# skimfx eval: {task}\n\n" + "\n".join(lines) + "\n")
    (out / f"eval_{task}.json").write_text(json.dumps(rows, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.scatter(r["ttft_s"], r[metric], color="black" if r["recipe"] == "dense" else None)
        ax.annotate(r["recipe"], (r["ttft_s"], r[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.margins(x=0.2, y=0.1)
    ax.set_xlabel("TTFT for the batch (s)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: quality vs prefill time")
    fig.tight_layout()
    fig.savefig(out / f"eval_{task}.png", dpi=110)
    plt.close(fig)
