"""KV selection and sparse attention (SnapKV, PyramidKV, StreamingLLM, H2O, TOVA, Quest, DELTA, SentenceKV) vs
dense on SmolLM2-135M-Instruct, one run, the dense baseline in the same process.

Speed and fidelity at 2k / 4k / 8k (8000: prompt + 64 new tokens fit the 8192 context) context (a passkey prompt, greedy 64 new tokens): decode tokens/s
and its ratio to dense, KV bytes resident after decode, the fraction of cached keys the decode steps
read, and the agreement of the 64 tokens with dense (position by position).
Quality: passkey retrieval at ~1k tokens (needle depths 0..1, four keys each) at 25% budgets.

    python bench/sparse.py                 # full run (about 15 minutes on 2 cores)
    python bench/sparse.py --quick         # 2k only, 5 passkey prompts
    python bench/sparse.py --sentence-grid # token vs sentence granularity at 25/10/5% (about 20 minutes)
    python bench/sparse.py --delta-calibration cal.pt   # + "DELTA cal.": select layers from skimfx.calibrate_delta

Writes bench/results/sparse.md, sparse.json and sparse.png; the sentence grid writes
sparse_sentence.md / .json / .png: passkey accuracy of each rule at token and at sentence
granularity next to dense, and decode speed, resident / offloaded KV and bytes moved per token at 4k.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import skimfx
from _results import agreement, delta_calibration, finish, pyplot, save, save_figure
from skimfx.eval import passkey_correct, passkey_prompts

RESULTS = Path(__file__).parent / "results"

# 25% budgets everywhere; DELTA: layers 0-1 full, selection at 2, 10, 20 (5 of 30 layers read everything)
RECIPES = {
    "dense": "dense",
    "SnapKV": "snapkv:budget=0.25",
    "PyramidKV": "snapkv:budget=0.25,pyramid=true",
    "StreamingLLM": "streamingllm:recent=0.25",
    "H2O": "h2o:heavy=0.125,recent=0.125",
    "TOVA": "tova:budget=0.25",
    "Quest": "quest:token_budget=0.25",
    "Quest p8": "quest:token_budget=0.25,page_size=8",
    "DELTA": "delta:budget=0.25",
    "SentenceKV": "sentencekv:budget=0.25",
}
BATCH_RECIPES = ("dense", "Quest", "DELTA", "DELTA cal.")   # batch-4 decode: where reading less of the cache pays on a CPU


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passkey-prompts", type=int, default=20)
    ap.add_argument("--sentence-grid", action="store_true",
                    help="token vs sentence granularity on the passkey grid at 25/10/5%% (sparse_sentence.md)")
    ap.add_argument("--delta-calibration", help="DeltaCalibration file (made here when missing): adds DELTA with "
                    "calibrated select layers at the same 25%% budget")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sentence_grid:
        return sentence_grid(args)
    lengths = [2048] if args.quick else [int(x) for x in args.lengths.split(",")]
    n_pk = 5 if args.quick else args.passkey_prompts

    model, tok = skimfx.load_model("smollm2-135m")
    compiled = {name: skimfx.compile(model, r, tokenizer=tok) for name, r in RECIPES.items()}
    cal = delta_calibration(args.delta_calibration, compiled["dense"], tok) if args.delta_calibration else None
    if cal is not None:
        compiled["DELTA cal."] = skimfx.compile(model, cal.recipe(budget=0.25), tokenizer=tok)

    speed = []
    runs = [(T, 1) for T in lengths] + [(T, 4) for T in lengths if T == 4096 and not args.quick]
    for T, batch in runs:
        depths = (0.5,) if batch == 1 else (0.2, 0.4, 0.6, 0.8)
        prompts = [p.ids for p in passkey_prompts(tok, T, depths=depths, keys_per_depth=1, seed=11)]
        ref = None
        for name, cm in compiled.items():
            if batch > 1 and name not in BATCH_RECIPES:
                continue
            g = cm.generate(prompts, max_new_tokens=args.new_tokens if batch == 1 else 32, stop_tokens=[])
            ref = ref or g
            agree = sum(agreement(a, b) for a, b in zip(g.tokens, ref.tokens)) / batch
            row = {"context": len(prompts[0]), "batch": batch, "recipe": name, "ttft_s": g.stats.ttft_s,
                   "decode_tok_s": g.stats.decode_tokens_per_s, "kv_mib": g.stats.kv_bytes / 2**20,
                   "attended": g.stats.attended_fraction, "agreement": agree}
            row["decode_speedup"] = row["decode_tok_s"] / ref.stats.decode_tokens_per_s
            row["kv_ratio"] = row["kv_mib"] / (ref.stats.kv_bytes / 2**20)
            speed.append(row)
            print(f"{row['context']:>5} x{batch} {name:<13} decode {row['decode_tok_s']:5.2f} tok/s ({row['decode_speedup']:.2f}x) "
                  f"KV {row['kv_mib']:6.1f} MiB ({row['kv_ratio']:.2f}) attended {row['attended']:.2f} "
                  f"agreement {row['agreement']:.2f} TTFT {row['ttft_s']:.1f}s", flush=True)

    quality = []
    prompts = passkey_prompts(tok, 1000, depths=tuple(i / 4 for i in range(5)), keys_per_depth=max(1, n_pk // 5),
                              seed=0)
    for name, cm in compiled.items():
        g = cm.generate([p.ids for p in prompts], max_new_tokens=24)
        acc = sum(passkey_correct(tok, p, t) for p, t in zip(prompts, g.tokens)) / len(prompts)
        quality.append({"recipe": name, "passkey": acc, "prompt_tokens": round(sum(len(p.ids) for p in prompts) / len(prompts)),
                        "kv_mib": g.stats.kv_bytes / 2**20, "attended": g.stats.attended_fraction})
        print(f"passkey {name:<13} {acc:.0%}", flush=True)
    write(speed, quality, args, n_pk, cal)


def grid_recipes(f: float) -> dict[str, str]:
    """The rules at ``f`` of the prompt, each at token and at sentence granularity where it has both."""
    h = f / 2
    return {
        "SnapKV": f"snapkv:budget={f}",
        "SnapKV sentence": f"snapkv:budget={f},granularity=sentence",
        "H2O": f"h2o:heavy={h},recent={h}",
        "H2O sentence": f"h2o:heavy={h},recent={h},granularity=sentence",
        "TOVA": f"tova:budget={f}",
        "TOVA sentence": f"tova:budget={f},granularity=sentence",
        "Quest": f"quest:token_budget={f}",
        "SentenceKV": f"sentencekv:budget={f}",
    }


def sentence_grid(args) -> None:
    """Passkey accuracy at 25 / 10 / 5% for token- and sentence-granular rules, dense in the same run;
    then decode speed and memory at 4k for the 10% variants."""
    model, tok = skimfx.load_model("smollm2-135m")
    n_pk = 5 if args.quick else args.passkey_prompts
    prompts = passkey_prompts(tok, 1000, depths=tuple(i / 4 for i in range(5)), keys_per_depth=max(1, n_pk // 5),
                              seed=0)
    ids = [p.ids for p in prompts]

    def passkey(recipe: str) -> float:
        g = skimfx.compile(model, recipe, tokenizer=tok).generate(ids, max_new_tokens=24)
        return sum(passkey_correct(tok, p, t) for p, t in zip(prompts, g.tokens)) / len(prompts)

    dense = passkey("dense")
    print(f"passkey dense {dense:.0%}", flush=True)
    grid = []
    for f in (0.25, 0.10, 0.05):
        for name, recipe in grid_recipes(f).items():
            acc = passkey(recipe)
            grid.append({"recipe": name, "fraction": f, "passkey": acc, "of_dense": acc / dense if dense else None})
            print(f"passkey {f:.0%} {name:<16} {acc:.0%}", flush=True)
    speed = []
    T = 1024 if args.quick else 4096
    long_ids = [passkey_prompts(tok, T, depths=(0.5,), keys_per_depth=1, seed=11)[0].ids]
    ref = None
    variants = {"dense": "dense", **grid_recipes(0.10),
                "SentenceKV on device": "sentencekv:budget=0.1,offload=false"}
    for name, recipe in variants.items():
        if name.startswith("H2O"):
            continue   # same decode path as SnapKV; its prefill scoring is measured in sparse.md
        g = skimfx.compile(model, recipe, tokenizer=tok).generate(long_ids, max_new_tokens=args.new_tokens,
                                                                  stop_tokens=[])
        ref = ref or g
        s = g.stats
        speed.append({"recipe": name, "context": len(long_ids[0]), "decode_tok_s": s.decode_tokens_per_s,
                      "decode_speedup": s.decode_tokens_per_s / ref.stats.decode_tokens_per_s,
                      "kv_mib": s.kv_bytes / 2**20, "host_mib": s.kv_host_bytes / 2**20,
                      "moved_kib_per_token": s.moved_bytes_per_token / 2**10, "read": s.attended_fraction,
                      "agreement": agreement(g.tokens[0], ref.tokens[0]), "ttft_s": s.ttft_s})
        r = speed[-1]
        print(f"{T} {name:<22} decode {r['decode_tok_s']:.2f} tok/s ({r['decode_speedup']:.2f}x) device KV "
              f"{r['kv_mib']:.1f} MiB host {r['host_mib']:.1f} MiB moved {r['moved_kib_per_token']:.0f} KiB/token "
              f"agree {r['agreement']:.0%}", flush=True)
    write_grid(dense, grid, speed, args, len(prompts), round(sum(map(len, ids)) / len(ids)))


def write_grid(dense, grid, speed, args, n_pk, prompt_tokens) -> None:
    fracs = (0.25, 0.10, 0.05)
    names = list(grid_recipes(0.1))
    lines = ["# Token vs sentence granularity for KV selection — SmolLM2-135M-Instruct (fp32, CPU)", "",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}. One run, dense in the "
             f"same process. Passkey retrieval over {n_pk} prompts of ~{prompt_tokens} tokens (needle depths 0, 0.25, "
             f"0.5, 0.75, 1), greedy 24 tokens; dense retrieves {dense:.0%}. Budgets are the fraction of the prompt "
             "each layer keeps (SnapKV, H2O: evicted after prefill, window 32 / half heavy half recent) or reads per "
             "decode step (Quest: pages of 16, layers 0-1 dense; SentenceKV: whole sentences chosen by the query's "
             "similarity to each sentence's mean key, plus 4 sinks and 16 recent tokens, prompt KV offloaded). "
             "\"sentence\": the same scores, whole sentences kept (max over the sentence), topped up with single "
             "tokens to the budget.", "",
             "| rule | " + " | ".join(f"{f:.0%} kept" for f in fracs) + " | " +
             " | ".join(f"{f:.0%} of dense" for f in fracs) + " |",
             "|---|" + "---:|" * (2 * len(fracs))]
    for n in names:
        row = {r["fraction"]: r for r in grid if r["recipe"] == n}
        lines.append(f"| {n} | " + " | ".join(f"{row[f]['passkey']:.0%}" for f in fracs) + " | " +
                     " | ".join(f"{row[f]['of_dense']:.0%}" if row[f]["of_dense"] is not None else "-" for f in fracs)
                     + " |")
    if speed:
        T = speed[0]["context"]
        lines += ["", f"Decode at {T} tokens, 10% budgets, greedy {args.new_tokens} tokens, batch 1: device KV is what "
                  "stays on the model's device (with the policies' state), host KV what SentenceKV offloaded, moved "
                  "the KV rows copied out of the host store per generated token (all layers; on this CPU the copy "
                  "stays in host memory, on a GPU it crosses to the device), read the fraction of cached keys each "
                  "step attends to, agree the tokens equal to dense.", "",
                  "| recipe | decode tok/s | decode × | device KV MiB | host KV MiB | moved KiB/token | read | agree | "
                  "TTFT s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in speed:
            lines.append(f"| {r['recipe']} | {r['decode_tok_s']:.2f} | {r['decode_speedup']:.2f} | {r['kv_mib']:.1f} | "
                         f"{r['host_mib']:.1f} | {r['moved_kib_per_token']:.0f} | {r['read']:.2f} | "
                         f"{r['agreement']:.0%} | {r['ttft_s']:.1f} |")
    save("sparse_sentence", lines, {"dense_passkey": dense, "grid": grid, "speed": speed})
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n in names:
        rows = sorted((r for r in grid if r["recipe"] == n), key=lambda r: r["fraction"])
        ax.plot([100 * r["fraction"] for r in rows], [100 * r["passkey"] for r in rows], marker="o", label=n,
                linestyle="-" if "sentence" in n or n == "SentenceKV" else "--")
    ax.axhline(100 * dense, color="black", linewidth=1, label="dense")
    ax.set_xlabel("% of prompt kept / read")
    ax.set_ylabel("passkey accuracy %")
    ax.set_xticks([5, 10, 25])
    ax.legend(fontsize=8)
    ax.set_title("token vs sentence granularity (SmolLM2-135M, ~1k tokens)")
    save_figure(plt, fig, "sparse_sentence")


def write(speed, quality, args, n_pk, cal=None) -> None:
    RESULTS.mkdir(exist_ok=True)
    dense_pk = next(q["passkey"] for q in quality if q["recipe"] == "dense")
    lines = ["# KV selection and sparse attention vs dense — SmolLM2-135M-Instruct (fp32, CPU)", "",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}. One run, dense in the "
             f"same process. Greedy {args.new_tokens} new tokens after a passkey prompt (batch 1), or 32 per sequence "
             "for 4 prompts (batch 4). "
             "Budgets are 25% of the prompt: SnapKV window 32 / pool 5; PyramidKV = SnapKV with per-layer budgets; "
             "StreamingLLM 4 sinks + recent; H2O 12.5% heavy + 12.5% recent; TOVA the current query's attention, evicting "
             "during decode; Quest pages of 16 (p8: of 8), layers "
             "0-1 dense; DELTA layers 0-1 full, selection at layers 2, 10 and 20 (5 of 30 layers read everything), "
             "recent 32." + ("" if cal is None else
             f" DELTA cal.: selection at {', '.join(map(str, cal.selection_layers))} (skimfx.calibrate_delta on two 4k "
             "passkey prompts of other seeds, 10% budget), 25% budget."), "",
             "- decode ×: decode tokens/s relative to dense (batch 4: 32 new tokens per sequence, all sequences counted). KV: bytes resident after decode (with the policies' "
             "state), relative to dense. read: keys read / keys cached over the decode steps. agree: the 64 tokens "
             "equal to dense, position by position.", "",
             "| context | batch | recipe | decode tok/s | decode × | KV MiB | KV / dense | read | agree | TTFT s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in speed:
        lines.append(f"| {r['context']} | {r['batch']} | {r['recipe']} | {r['decode_tok_s']:.2f} | {r['decode_speedup']:.2f} | "
                     f"{r['kv_mib']:.1f} | {r['kv_ratio']:.2f} | {r['attended']:.2f} | {r['agreement']:.0%} | "
                     f"{r['ttft_s']:.1f} |")
    lines += ["", f"Passkey retrieval, {n_pk} prompts of ~{quality[0]['prompt_tokens']} tokens "
              "(needle depths 0, 0.25, 0.5, 0.75, 1), 25% budgets:", "",
              "| recipe | passkey | of dense | KV MiB (batch) | read |", "|---|---:|---:|---:|---:|"]
    for q in quality:
        rel = q["passkey"] / dense_pk if dense_pk else float("nan")
        lines.append(f"| {q['recipe']} | {q['passkey']:.0%} | {rel:.0%} | {q['kv_mib']:.1f} | {q['attended']:.2f} |")
    (RESULTS / "sparse.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "sparse.json").write_text(json.dumps({"speed": speed, "quality": quality}, indent=1))
    print("\n".join(lines))
    finish("sparse")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["recipe"] for r in speed):
        rows = [r for r in speed if r["recipe"] == name and r["batch"] == 1]
        a.plot([r["context"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o", label=name,
               color="black" if name == "dense" else None)
    a.set_xlabel("context tokens")
    a.set_ylabel("decode tokens/s (batch 1)")
    a.set_xscale("log", base=2)
    a.legend(fontsize=8)
    a.set_title("decode speed")
    longest = max(r["context"] for r in speed)
    for r in speed:
        if r["context"] == longest and r["batch"] == 1:
            b.scatter(r["decode_speedup"], r["agreement"], color="black" if r["recipe"] == "dense" else None)
            b.annotate(r["recipe"], (r["decode_speedup"], r["agreement"]), fontsize=8, xytext=(3, 3),
                       textcoords="offset points")
    b.set_xlabel(f"decode speedup vs dense at {longest} tokens")
    b.set_ylabel("agreement of 64 tokens with dense")
    b.set_title("fidelity vs speed")
    fig.tight_layout()
    fig.savefig(RESULTS / "sparse.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
