"""Prefill token pruning (GemFilter, PromptDistill) vs dense on SmolLM2-135M-Instruct, one run.

Speed: TTFT, analytic prefill FLOPs and KV bytes after prefill at 2k / 4k / 8k prompt tokens (real
prose: the Python license text), with the speedup next to the FLOP ratio (target: TTFT speedup
>= 0.9 x FLOP ratio).
Quality: passkey retrieval at ~1k tokens over a grid of needle depths, whether the needle sentence
survived the selection, and agreement of the first 32 greedy tokens with dense, at 25%, 10% and 5%
kept, each rule at token granularity (the papers') and at sentence granularity (whole sentences).

    python bench/prune.py                     # full run (about 15 minutes on 2 cores)
    python bench/prune.py --quick             # 2k only, fewer passkey prompts
    python bench/prune.py --quality-only      # the passkey grid only (keeps the last speed table)
    python bench/prune.py --plot-only         # redraw prune.png from prune.json

Writes bench/results/prune.md, prune.json and prune.png (passkey accuracy vs TTFT speedup on the same
prompts: one colour per rule and selection layer, filled = whole sentences, one marker per kept fraction,
the Pareto frontier drawn).
"""
from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path

import torch

import skimfx
from _results import finish
from skimfx import GemFilter, PromptDistill
from skimfx.eval import passkey_correct, passkey_prompts
from skimfx.kernels import attention_flops

RESULTS = Path(__file__).parent / "results"
warnings.filterwarnings("ignore", message=".*no tokens are pruned.*")


def license_ids(tok, n: int) -> list[int]:
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(errors="ignore")
    ids = tok(text).input_ids
    while len(ids) < n:
        ids = ids + ids
    q = tok("\n\nIn one sentence, what is this text about?", add_special_tokens=False).input_ids
    return ids[: n - len(q)] + q


def prefill_flops(model, info, prompt_len: int, recipe) -> float:
    """Analytic prefill FLOPs: linear layers (2 x params x tokens), causal attention, the token
    scores of each selection, and the LM head on the last token."""
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 2)

    def layer(n):
        return 2 * layer_params * n + attention_flops(n, n, info.num_heads, info.head_dim)

    head = 2 * info.hidden_size * info.vocab_size
    L, T = info.num_layers, prompt_len
    if recipe is None:
        return L * layer(T) + head
    if isinstance(recipe, GemFilter):
        K = min(recipe.keep, T)
        return (recipe.layer + 1) * layer(T) + 2 * T * info.num_heads * info.head_dim + L * layer(K) + head
    total, n, prev = 0.0, T, -1
    for r, k in zip(recipe.layers, recipe.keep):
        total += (r - prev) * layer(n) + 2 * n * info.num_heads * info.head_dim
        n, prev = min(k, n), r
    return total + (L - 1 - prev) * layer(n) + head


def label(recipe) -> str:
    if recipe is None:
        return "dense"
    s = " sentences" if recipe.granularity == "sentence" else ""
    if isinstance(recipe, GemFilter):
        return f"GemFilter r={recipe.layer} keep={recipe.keep}{s}"
    t = " +truncKV" if recipe.truncate_earlier_kv else ""
    return f"PromptDistill r={list(recipe.layers)} keep={list(recipe.keep)}{t}{s}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="speed runs per setting; the best TTFT is kept")
    ap.add_argument("--quality-only", action="store_true", help="skip the speed table (reuse the last prune.json's)")
    ap.add_argument("--plot-only", action="store_true", help="redraw prune.png from prune.json")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "prune.json").read_text())["quality"])
        return
    lengths = [2048] if args.quick else [2048, 4096, 8000]
    model, tok = skimfx.load_model("smollm2-135m")
    info = skimfx.compile(model).info
    compiled = {}

    def compiled_for(recipe):
        key = label(recipe)
        if key not in compiled:
            compiled[key] = skimfx.compile(model, recipe, tokenizer=tok)
        return compiled[key]

    # ---------------- speed ----------------
    speed_recipes = [None, PromptDistill(layers=8, keep=256), PromptDistill(layers=8, keep=512),
                     PromptDistill(layers=8, keep=256, truncate_earlier_kv=True),
                     PromptDistill(layers=(4, 12), keep=(1024, 256)), GemFilter(layer=12, keep=256)]
    compiled_for(None).generate(license_ids(tok, 128), max_new_tokens=2)   # warm-up
    speed = json.loads((RESULTS / "prune.json").read_text())["speed"] if args.quality_only else []
    for n in [] if args.quality_only else lengths:
        ids = license_ids(tok, n)
        base = None
        for recipe in speed_recipes:
            cm = compiled_for(recipe)
            cm.generate(ids[:300], max_new_tokens=1, stop_tokens=[])          # warm-up
            runs = [cm.generate(ids, max_new_tokens=1, stop_tokens=[]) for _ in range(args.repeats)]
            g = min(runs, key=lambda r: r.stats.ttft_s)
            flops = prefill_flops(model, info, n, recipe)
            row = dict(prompt_tokens=n, recipe=label(recipe), ttft_s=g.stats.ttft_s, prefill_gflops=flops / 1e9,
                       kv_prefill_mib=g.stats.kv_prefill_bytes / 2**20,
                       kv_used_mib=sum(g.stats.layer_tokens) * 2 * info.num_kv_heads * info.head_dim * 4 / 2**20)
            if recipe is None:
                base = row
            row["ttft_speedup"] = base["ttft_s"] / row["ttft_s"]
            row["flop_ratio"] = base["prefill_gflops"] / row["prefill_gflops"]
            row["speedup_vs_flop_ratio"] = row["ttft_speedup"] / row["flop_ratio"]
            speed.append(row)
            print(row, flush=True)

    # ---------------- quality ----------------
    prompts = passkey_prompts(tok, 1000, keys_per_depth=1 if args.quick else 2)
    plen = sum(len(p.ids) for p in prompts) / len(prompts)
    shortest = min(len(p.ids) for p in prompts)
    quality_recipes = [None]
    for keep in (shortest // 4, shortest // 10, shortest // 20):  # at most 25%, 10% and 5% of every prompt
        for gran in ("token", "sentence"):
            quality_recipes += [PromptDistill(layers=8, keep=keep, granularity=gran),
                                PromptDistill(layers=14, keep=keep, granularity=gran),
                                GemFilter(layer=8, keep=keep, granularity=gran),
                                GemFilter(layer=14, keep=keep, granularity=gran)]
    quality, dense_tokens = [], None
    for recipe in quality_recipes:          # every configuration warmed up first: no cold start is timed
        compiled_for(recipe).generate([prompts[0].ids], max_new_tokens=1, stop_tokens=[])
    for recipe in quality_recipes:
        g = compiled_for(recipe).generate([p.ids for p in prompts], max_new_tokens=32)
        acc = sum(passkey_correct(tok, p, t) for p, t in zip(prompts, g.tokens)) / len(prompts)
        if recipe is None:
            dense_tokens = g.tokens
            needle = 1.0
        else:
            layer = max(g.stats.selected)
            needle = sum(p.key_kept(sel) for p, sel in zip(prompts, g.stats.selected[layer])) / len(prompts)
        agree = []
        for a, b in zip(g.tokens, dense_tokens):
            n = min(32, max(len(a), len(b)))
            agree.append(sum(x == y for x, y in zip(a[:n], b[:n])) / n)
        row = dict(recipe=label(recipe), keep_fraction=(min(recipe.keep) if isinstance(recipe, PromptDistill) else
                                                         recipe.keep) / plen if recipe else 1.0,
                   passkey_acc=acc, needle_kept=needle, agreement_32=sum(agree) / len(agree),
                   ttft_s=g.stats.ttft_s)
        quality.append(row)
        print(row, flush=True)
    dense_acc = quality[0]["passkey_acc"]
    for row in quality:
        row["acc_vs_dense"] = row["passkey_acc"] / dense_acc if dense_acc else float("nan")
        row["ttft_speedup"] = quality[0]["ttft_s"] / row["ttft_s"]

    # ---------------- report ----------------
    lines = ["# Prefill token pruning vs dense — SmolLM2-135M-Instruct (fp32, CPU)", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
             f"One process; dense is the baseline row of each length; TTFT is the best of {args.repeats} runs and includes "
             "the selection and (GemFilter) the re-run.",
             "", "## Speed (prompt: Python license text + a question)", "",
             "| prompt tokens | recipe | TTFT (s) | TTFT speedup | FLOP ratio | speedup / FLOP ratio | prefill GFLOPs "
             "| KV after prefill (MiB, allocated) | KV filled (MiB) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in speed:
        lines.append(f"| {r['prompt_tokens']} | {r['recipe']} | {r['ttft_s']:.2f} | {r['ttft_speedup']:.2f}x "
                     f"| {r['flop_ratio']:.2f}x | {r['speedup_vs_flop_ratio']:.2f} | {r['prefill_gflops']:.0f} "
                     f"| {r['kv_prefill_mib']:.1f} | {r['kv_used_mib']:.1f} |")
    lines += ["", f"## Quality: passkey retrieval, {len(prompts)} prompts of ~{plen:.0f} tokens, needle depths "
              f"{sorted({p.depth for p in prompts})}; agreement = first 32 greedy tokens equal to dense", "",
              "| recipe | kept fraction | passkey accuracy | vs dense | key kept by the selection | agreement (32 tok) "
              "| batch TTFT (s) | TTFT speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in quality:
        lines.append(f"| {r['recipe']} | {r['keep_fraction']:.0%} | {r['passkey_acc']:.0%} | {r['acc_vs_dense']:.0%} "
                     f"| {r['needle_kept']:.0%} | {r['agreement_32']:.0%} | {r['ttft_s']:.2f} | {r['ttft_speedup']:.2f}x |")
    lines += ["", "Batch TTFT: the 10 prompts prefilled as one batch, after one warm-up run of every configuration."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "prune.json").write_text(json.dumps(dict(speed=speed, quality=quality), indent=1))
    plot(quality)
    print("\n".join(lines))
    finish("prune")


def plot(quality: list[dict]) -> None:
    """prune.png: passkey accuracy against TTFT speedup on the same prompts, one point per recipe."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    dense = quality[0]
    fractions = sorted({round(r["keep_fraction"], 2) for r in quality[1:]}, reverse=True)
    markers = dict(zip(fractions, "osD^v"))
    colours = {}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = []
    for r in quality[1:]:
        rule = r["recipe"].split(" keep=")[0]                 # e.g. "PromptDistill r=[8]"
        colour = colours.setdefault(rule, f"C{len(colours)}")
        sentence = r["recipe"].endswith("sentences")
        x = dense["ttft_s"] / r["ttft_s"]
        ax.scatter(x, r["passkey_acc"], marker=markers[round(r["keep_fraction"], 2)], s=60, edgecolors=colour,
                   facecolors=colour if sentence else "none", linewidths=1.5, zorder=3)
        points.append((x, r["passkey_acc"]))
    ax.scatter(1.0, dense["passkey_acc"], marker="*", s=220, color="black", zorder=4)
    points.append((1.0, dense["passkey_acc"]))
    frontier, best = [], -1.0                                  # highest accuracy at each speedup or more
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            frontier.append((x, y))
            best = y
    fx, fy = zip(*sorted(frontier))
    ax.step(fx, fy, where="post", color="grey", linestyle="--", linewidth=1, zorder=2)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="*", color="black", linestyle="", markersize=12, label="dense")]
    handles += [Line2D([], [], marker="o", color=c, linestyle="", label=rule) for rule, c in colours.items()]
    handles += [Line2D([], [], marker="o", markerfacecolor="grey", color="grey", linestyle="", label="whole sentences"),
                Line2D([], [], marker="o", markerfacecolor="none", color="grey", linestyle="", label="single tokens")]
    handles += [Line2D([], [], marker=m, color="grey", linestyle="", markerfacecolor="none", label=f"{f:.0%} kept")
                for f, m in markers.items()]
    handles.append(Line2D([], [], color="grey", linestyle="--", label="Pareto frontier"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("TTFT speedup vs dense, same prompts (higher is better)")
    ax.set_ylabel("passkey accuracy (higher is better)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("Prefill token pruning on SmolLM2-135M: accuracy vs speedup")
    fig.tight_layout()
    fig.savefig(RESULTS / "prune.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
