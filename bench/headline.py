"""The README's headline table: the best recipe of each axis against dense, read from the result files
the benchmark scripts wrote (prune.json, sparse.json, exit.json, e2e_dense.json), with the rule that
picked it stated in the table. Writes bench/results/headline.md and publishes it into the README.

    python bench/headline.py

Rules (quality first, then the saving; every number from one script's run, dense in the same run):
- dense: skimfx's dense pipeline vs HF at the longest prompt of bench/e2e_dense.py.
- prefill pruning: among bench/prune.py's passkey settings that keep >= 95% of dense accuracy, the
  largest TTFT speedup on those same prompts.
- KV policy: among bench/sparse.py's policies that keep >= 95% of dense passkey accuracy, the smallest
  resident KV (ties: fewest keys read); its decode speed and greedy agreement at the longest context.
- self-speculation: bench/exit.py's lossless mode (greedy tokens equal to dense) with the largest decode
  speedup, on each prompt kind.
- long context (Qwen2.5-Coder-0.5B, bench/long_context.py): at the longest length its grid measured, among
  the recipes that keep >= 95% of dense needle accuracy (and of dense's RULER score, where bench/ruler.py
  measured the same recipe), the largest TTFT speedup, with its RULER score.
- the three axes stacked (bench/compose.py) and batched self-speculation (bench/batched_speculation.py): shown
  as measured, whatever their quality, with it stated.
"""
from __future__ import annotations

import json

from _results import RESULTS, save
from ruler import vs_dense

KEEP = 0.95


def load(stem: str):
    return json.loads((RESULTS / f"{stem}.json").read_text())


def ruler_score(label: str) -> tuple[float, int] | None:
    """(mean over RULER tasks of the recipe's score / dense's, prompt length) for a recipe label measured by
    bench/ruler.py, from the first result file that has it; None when none has."""
    for f in sorted(RESULTS.glob("ruler*.json")):
        data = json.loads(f.read_text())
        row = next((r for r in data["rows"] if r["recipe"] == label), None)
        dense = next((r for r in data["rows"] if r["recipe"] == "dense"), None)
        rel = vs_dense(row, dense) if row and dense else None
        if rel is not None:
            return rel, data["length"]
    return None


def main() -> None:
    rows = []
    e2e = load("e2e_dense")["rows"]
    r = max(e2e, key=lambda x: x["prompt_tokens"])
    rows.append(("dense (no recipe)", f"{r['prompt_tokens']}-token prompt vs HF eager",
                 f"TTFT {r['ttft_ratio']:.2f}x, decode {r['decode_ratio']:.2f}x HF's",
                 f"greedy tokens equal to HF: {r['token_agreement']:.0%}", "e2e_dense"))

    q = load("prune")["quality"]
    dense = q[0]
    ok = [x for x in q[1:] if x["passkey_acc"] >= KEEP * dense["passkey_acc"]]
    if ok:
        best = max(ok, key=lambda x: dense["ttft_s"] / x["ttft_s"])
        rows.append((f"prefill pruning: {best['recipe']}", f"{best['keep_fraction']:.0%} of ~1k-token passkey prompts kept",
                     f"TTFT {dense['ttft_s'] / best['ttft_s']:.2f}x dense",
                     f"passkey {best['passkey_acc']:.0%} (dense {dense['passkey_acc']:.0%})", "prune"))

    sp = load("sparse")
    dq = sp["quality"][0]
    ok = [x for x in sp["quality"][1:] if x["passkey"] >= KEEP * dq["passkey"]]
    if ok:
        best = min(ok, key=lambda x: (x["kv_mib"], x["attended"]))
        longest = max(x["context"] for x in sp["speed"])
        speed = next((x for x in sp["speed"] if x["recipe"] == best["recipe"] and x["context"] == longest
                      and x["batch"] == 1), None)
        saving = f"KV {best['kv_mib'] / dq['kv_mib']:.0%} of dense, {best['attended']:.0%} of keys read"
        if speed:
            saving += f"; decode {speed['decode_speedup']:.2f}x at {longest} tokens"
        quality = f"passkey {best['passkey']:.0%} (dense {dq['passkey']:.0%})"
        if speed:
            quality += f"; greedy agreement {speed['agreement']:.0%} at {longest}"
        rows.append((f"KV policy: {best['recipe']}", f"25% budget, ~{best['prompt_tokens']}-token passkey prompts",
                     saving, quality, "sparse"))

    ex = load("exit")["decoding"]
    for kind in dict.fromkeys(x["prompts"] for x in ex):
        lossless = [x for x in ex if x["prompts"] == kind and x["agreement"] == 1.0 and x["mode"] != "dense"]
        if lossless:
            best = max(lossless, key=lambda x: x["speedup"])
            rows.append((f"self-speculation: {best['mode']}", f"'{kind}' prompts", f"decode {best['speedup']:.2f}x dense",
                         "greedy tokens equal to dense (100%)", "exit"))

    if (RESULTS / "long_context.json").exists():
        grid = [x for x in load("long_context")["rows"] if x["stage"] == "grid" and x["format"] == "after+prefix"]
        longest = max((x["length"] for x in grid), default=None)
        at = [x for x in grid if x["length"] == longest]

        # per recipe row: the dense row of its run (bench/long_context.py) and its RULER score, where measured
        cands = [(x, next((d for d in at if d["recipe"] == "dense" and d.get("run") == x.get("run")), None),
                  ruler_score(x["recipe"])) for x in at if x["recipe"] != "dense"]
        ok = [(x, d, ruler) for x, d, ruler in cands if d and x["accuracy"] >= KEEP * d["accuracy"]
              and "load" in x and "load" in d              # TTFT compared only under recorded load
              and (ruler is None or ruler[0] >= KEEP)]
        if ok:
            best, dense_lc, ruler = max(ok, key=lambda c: c[1]["ttft_s"] / c[0]["ttft_s"])
            rows.append((f"long context: {best['recipe']}", f"{best['budget']:.0%} of {longest}-token essay needle "
                         f"prompts kept, Qwen2.5-Coder-0.5B", f"TTFT {dense_lc['ttft_s'] / best['ttft_s']:.2f}x dense",
                         f"needles {sum(best['correct'])}/{len(best['correct'])} (dense "
                         f"{sum(dense_lc['correct'])}/{len(dense_lc['correct'])})" + (
                             f"; RULER at {ruler[1] // 1024}k: {ruler[0]:.0%} of dense" if ruler else ""),
                         "long_context"))

    if (RESULTS / "compose.json").exists():              # the three axes together: shown whatever its quality
        c = load("compose")
        st = next(x for x in c["rows"] if x["recipe"] == "stacked" and x["batch"] == 1)
        same = sum(f is None for f in c["lossless_batch1"])
        rows.append(("three axes stacked: PromptDistill + Quest + lookahead", f"{c['budget']:.0%} budgets, "
                     f"{c['length'] // 1024}k-token copy-heavy essay prompts, Qwen2.5-Coder-0.5B",
                     f"time to answer {st['total_ratio']:.2f}x dense (TTFT {st['ttft_ratio']:.2f}x)",
                     f"needles {c['needles']['stacked']}/{c['n_needles']} (dense {c['needles']['dense']}/"
                     f"{c['n_needles']}); answers equal to the recipe without speculation {same}/{len(c['lossless_batch1'])}",
                     "compose"))
    if (RESULTS / "batched_speculation.json").exists():
        b = next(x for x in load("batched_speculation")["rows"] if x["recipe"] == "lookahead" and x["batch"] == 4)
        rows.append(("batched self-speculation (lookahead)", "batch 4, ~600-token copy-heavy prompts",
                     f"decode {b['ratio']:.2f}x the same prompts speculated one at a time",
                     f"answers equal to greedy without speculation {sum(f is None for f in b['together_vs_plain'])}/"
                     f"{len(b['together_vs_plain'])}", "batched_speculation"))

    lines = ["| axis and recipe | setting | saving (measured) | quality vs dense (same inputs) | from |",
             "|---|---|---|---|---|"]
    def source(stem: str) -> str:
        recorded = "Provenance:" in (RESULTS / f"{stem}.md").read_text()
        return f"[{stem}](docs/benchmarks.md)" + ("" if recorded else " (earlier run: provenance not recorded)")

    lines += [f"| {a} | {b} | {c} | {d} | {source(e)} |" for a, b, c, d, e in rows]
    lines += ["", f"SmolLM2-135M-Instruct unless the row names another model; fp32, CPU. Picked by the rules in `bench/headline.py` (quality >= "
              f"{KEEP:.0%} of dense first, then the largest saving) from the result files of the scripts named."]
    save("headline", lines, {"rows": [dict(zip(("axis", "setting", "saving", "quality", "source"), r)) for r in rows]})


if __name__ == "__main__":
    main()
