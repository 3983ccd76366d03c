"""skimfx's KV policies against NVIDIA kvpress's presses on the same model and prompts.

Same model (SmolLM2-135M-Instruct, fp32, the weights skimfx caches), same passkey prompts, the same kept count
per layer. Pairs whose rules coincide: SnapKV / SnapKVPress, StreamingLLM / StreamingLLMPress,
ExpectedAttention / ExpectedAttentionPress, AdaKV over ExpectedAttention / AdaKVPress(ExpectedAttentionPress),
DuoAttention (prompt only, ``evict_during_decode=false``) / DuoAttentionPress given skimfx's calibrated head
pattern. For each: the overlap of the prompt positions each implementation keeps, per layer and KV head; the
passkey accuracy of both and the agreement of their greedy tokens (with each other and with dense); and the
KV bytes each really holds after the prompt. kvpress's head-wise presses (AdaKV, DuoAttention) only mask the
evicted keys, so their cache stays at dense size; skimfx stores such layers as head groups. skimfx's bytes
are what its cache allocated after prefill (the kept tokens plus room for the generated ones); kvpress's are
its DynamicCache's tensors after prefill (which then grow by concatenation). DuoAttention with the paper's
rolling window (skimfx's default) is reported for quality and bytes only (kvpress has no such mode).

kvpress needs transformers < 5.3, so it runs in a separate environment; this script drives it:

    python3 -m venv /tmp/kvp && /tmp/kvp/bin/pip install torch==2.13.0 "kvpress==0.5.5" "transformers<5.3" accelerate
    python bench/kvpress_compare.py --kvpress-python /tmp/kvp/bin/python           # full run
    python bench/kvpress_compare.py --kvpress-python /tmp/kvp/bin/python --quick   # 1 prompt, 8 tokens, one ratio

The kvpress half (``--side kvpress``) imports only torch, transformers and kvpress.
Writes bench/results/kvpress_compare.{md,json} (``--quick``: bench/results/quick/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("snapkv", "streamingllm", "expected_attention", "adakv", "duo_attention")


# ---------------------------------------------------------------------------------------------- kvpress side
def run_kvpress(spec_path: str, out_path: str) -> None:
    import torch
    from kvpress import (AdaKVPress, DuoAttentionPress, ExpectedAttentionPress, SnapKVPress,
                         StreamingLLMPress)
    from kvpress.utils import compute_n_kept
    from transformers import AutoModelForCausalLM, DynamicCache

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    kept: dict[int, list] = {}

    def recording(cls):
        """A scorer press that records, per layer, the positions its top-k keeps per KV head."""
        class Recording(cls):
            def compress(self, module, hidden_states, keys, values, attentions, kwargs):
                scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
                n = compute_n_kept(keys.shape[2], self.compression_ratio)
                kept[module.layer_idx] = scores.topk(n, dim=-1).indices.sort(-1).values[0].tolist()
                return super().compress(module, hidden_states, keys, values, attentions, kwargs)
        return Recording

    def masking(cls):
        """A head-wise press (it masks keys): the kept positions per KV head are the unmasked ones."""
        class Masking(cls):
            def compress(self, module, hidden_states, keys, values, attentions, kwargs):
                out = super().compress(module, hidden_states, keys, values, attentions, kwargs)
                H, n = keys.shape[1], keys.shape[2]
                keep = torch.ones(H, n, dtype=torch.bool)
                masked = getattr(module, "masked_key_indices", None)
                if masked is not None:
                    _, heads, seq = masked
                    keep[heads.cpu(), seq.cpu()] = False
                kept[module.layer_idx] = [torch.nonzero(row).flatten().tolist() for row in keep]
                return out
        return Masking

    class GivenPattern(masking(DuoAttentionPress)):
        """DuoAttentionPress with skimfx's calibrated head pattern (the press would download its own)."""

        def post_init_from_model(self, model):
            self.sink_size, self.recent_size = spec["duo"]["sinks"], spec["duo"]["recent"]
            self.streaming_mask = torch.tensor(spec["duo"]["masks"][str(self.head_compression_ratio)])

    presses = {
        "snapkv": lambda r: recording(SnapKVPress)(compression_ratio=r, window_size=spec["window"], kernel_size=5),
        "streamingllm": lambda r: recording(StreamingLLMPress)(compression_ratio=r, n_sink=spec["sinks"]),
        "expected_attention": lambda r: recording(ExpectedAttentionPress)(compression_ratio=r),
        "adakv": lambda r: masking(AdaKVPress)(press=ExpectedAttentionPress(compression_ratio=r)),
        "duo_attention": lambda r: GivenPattern(head_compression_ratio=r),
    }
    out = []
    for method in spec["methods"]:
        for ratio in spec["ratios"]:
            for pi, ids in enumerate(spec["prompts"]):
                kept.clear()
                press = presses[method](ratio)
                cache = DynamicCache()
                x = torch.tensor([ids])
                with torch.no_grad():
                    with press(model):
                        logits = model(x, past_key_values=cache).logits[0, -1]
                    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
                    toks = [int(logits.argmax())]
                    n = len(ids)
                    for i in range(spec["new_tokens"] - 1):
                        logits = model(torch.tensor([[toks[-1]]]), past_key_values=cache,
                                       position_ids=torch.tensor([[n + i]])).logits[0, -1]
                        toks.append(int(logits.argmax()))
                out.append({"method": method, "ratio": ratio, "prompt": pi, "tokens": toks, "kv_bytes": nbytes,
                            "kept": {str(l): v for l, v in kept.items()}})
                print(f"kvpress {method} ratio {ratio} prompt {pi}: kept {len(kept[0][0])} of {n}", flush=True)
    Path(out_path).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- skimfx side
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["skimfx", "kvpress"], default="skimfx")
    ap.add_argument("--spec")
    ap.add_argument("--out")
    ap.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ratios", default="0.5,0.75,0.9", help="kvpress compression ratios (fraction evicted); for "
                    "DuoAttention the fraction of heads that stream")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--duo-sinks", type=int, default=64)
    ap.add_argument("--duo-recent", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 prompt, 8 new tokens, one ratio (a smoke test)")
    ap.add_argument("--reuse-kvpress", action="store_true", help="reuse the kvpress side's output of the last run "
                    "with the same settings (kept next to the results as .kvpress_out.json)")
    args = ap.parse_args()
    if args.side == "kvpress":
        run_kvpress(args.spec, args.out)
        return
    if not args.kvpress_python:
        sys.exit("give --kvpress-python (a python with kvpress and transformers<5.3 installed; see the docstring)")
    if args.quick:
        args.prompts, args.new_tokens, args.ratios = 1, 8, "0.75"

    import torch

    import skimfx
    from skimfx import AdaKV, DuoAttention, ExpectedAttention, SnapKV, StreamingLLM
    from skimfx.eval.passkey import passkey_correct, passkey_prompts
    from skimfx.models import cache_root

    torch.set_num_threads(args.threads)
    model, tok = skimfx.load_model("smollm2-135m")
    depths = [i / max(1, args.prompts - 1) for i in range(args.prompts)]
    pk = passkey_prompts(tok, args.length, depths=depths, keys_per_depth=1, seed=7)
    prompts = [p.ids for p in pk]
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    sinks = 4
    info = skimfx.compile(model).info

    # DuoAttention's head pattern: skimfx's calibration on the shipped reference texts, the same for both sides
    t0 = time.time()
    duo_cal = skimfx.calibrate_duo(model, tokenizer=tok, tokens=1024 if args.quick else 4096,
                                   sinks=args.duo_sinks, recent=args.duo_recent)
    duo_seconds = time.time() - t0
    duo_masks = {}
    for r in ratios:
        mask = [[False] * info.num_kv_heads for _ in range(info.num_layers)]
        for l, pol in duo_cal.recipe(streaming=r).policies(info).items():
            for h in pol.streaming:
                mask[l][h] = True
        duo_masks[str(r)] = mask

    spec = {"model_dir": str(cache_root() / "smollm2-135m"), "prompts": prompts, "ratios": ratios, "window": args.window,
            "sinks": sinks, "methods": methods, "new_tokens": args.new_tokens, "threads": args.threads,
            "duo": {"sinks": args.duo_sinks, "recent": args.duo_recent, "masks": duo_masks}}
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, kvp_path = out_dir / ".kvpress_spec.json", out_dir / ".kvpress_out.json"
    t0 = time.time()
    same = args.reuse_kvpress and kvp_path.exists() and spec_path.exists() and \
        json.loads(spec_path.read_text()) == json.loads(json.dumps(spec))
    if not same:
        spec_path.write_text(json.dumps(spec))
        subprocess.run([args.kvpress_python, __file__, "--side", "kvpress", "--spec", str(spec_path), "--out",
                        str(kvp_path)], check=True)
    kvp = json.loads(kvp_path.read_text())
    print(f"kvpress side: {time.time() - t0:.0f} s" + (" (reused)" if same else ""))

    dense_cm = skimfx.compile(model, tokenizer=tok)
    dense = [dense_cm.generate([p], max_new_tokens=args.new_tokens, stop_tokens=[]) for p in prompts]
    dense_acc = sum(passkey_correct(tok, p, d.tokens[0]) for p, d in zip(pk, dense)) / len(pk)

    def recipe_for(method: str, ratio: float, n_kept: int, roll: bool = False):
        if method == "snapkv":
            return SnapKV(budget=n_kept, window=args.window)
        if method == "streamingllm":
            return StreamingLLM(recent=n_kept - sinks, sinks=sinks, evict_during_decode=False)
        if method == "expected_attention":
            return ExpectedAttention(budget=n_kept)
        if method == "adakv":
            return AdaKV(budget=n_kept, scorer="expected_attention")
        return duo_cal.recipe(streaming=ratio, evict_during_decode=roll)

    rows = []
    variants = [(m, False) for m in methods] + ([("duo_attention", True)] if "duo_attention" in methods else [])
    for method, roll in variants:
        for ratio in ratios:
            ref = [r for r in kvp if r["method"] == method and r["ratio"] == ratio]
            overlaps, agree_kvp, agree_ours, agree_theirs = [], [], [], []
            acc_ours = acc_theirs = 0
            ours_bytes = theirs_bytes = dense_bytes = 0
            kept_ours = kept_theirs = total = 0
            for r in ref:
                ids = prompts[r["prompt"]]
                n_kept = sum(map(len, r["kept"]["0"])) // len(r["kept"]["0"])      # per KV head on average (AdaKV)
                g = skimfx.compile(model, recipe_for(method, ratio, n_kept, roll), tokenizer=tok).generate(
                    [ids], max_new_tokens=args.new_tokens, stop_tokens=[])
                for layer in range(info.num_layers):
                    theirs_layer = r["kept"].get(str(layer))
                    mine_layer = g.stats.kv_kept.get(layer, [[list(range(len(ids)))] * info.num_kv_heads])[0]
                    for h, mine in enumerate(mine_layer):
                        theirs = theirs_layer[h] if theirs_layer is not None else list(range(len(ids)))
                        kept_ours += len(mine)
                        kept_theirs += len(theirs)
                        total += len(ids)
                        if not roll:
                            overlaps.append(len(set(theirs) & set(mine)) / max(1, len(set(theirs) | set(mine))))
                ours, d = g.tokens[0], dense[r["prompt"]]
                agree_kvp.append(_agree(ours, r["tokens"]))
                agree_ours.append(_agree(ours, d.tokens[0]))
                agree_theirs.append(_agree(r["tokens"], d.tokens[0]))
                acc_ours += passkey_correct(tok, pk[r["prompt"]], ours)
                acc_theirs += passkey_correct(tok, pk[r["prompt"]], r["tokens"])
                ours_bytes += g.stats.kv_prefill_bytes
                theirs_bytes += r["kv_bytes"]
                dense_bytes += d.stats.kv_prefill_bytes
            n = len(ref)
            kvp_dense = sum(len(prompts[r["prompt"]]) for r in ref) * info.num_layers * 2 * info.num_kv_heads * \
                info.head_dim * 4
            rows.append({"method": method + (" (rolling)" if roll else ""), "ratio": ratio, "prompts": n,
                         "kept_fraction_skimfx": kept_ours / total, "kept_fraction_kvpress": kept_theirs / total,
                         "index_overlap_mean": sum(overlaps) / len(overlaps) if overlaps else None,
                         "index_overlap_min": min(overlaps) if overlaps else None,
                         "exact_heads": sum(o == 1.0 for o in overlaps) / len(overlaps) if overlaps else None,
                         "passkey_skimfx": acc_ours / n, "passkey_kvpress": acc_theirs / n, "passkey_dense": dense_acc,
                         "token_agreement_with_kvpress": sum(agree_kvp) / n,
                         "skimfx_agreement_with_dense": sum(agree_ours) / n,
                         "kvpress_agreement_with_dense": sum(agree_theirs) / n,
                         "kv_bytes_skimfx": ours_bytes / n, "kv_bytes_skimfx_dense": dense_bytes / n,
                         "kv_bytes_kvpress": theirs_bytes / n, "kv_bytes_kvpress_dense": kvp_dense / n})
            print(rows[-1], flush=True)
    write(rows, args, out_dir, duo_seconds)


def _agree(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy continuations agree (position by position)."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n


def write(rows, args, out_dir: Path, duo_seconds: float) -> None:
    import platform

    import torch

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    lines = ["# skimfx vs kvpress on SmolLM2-135M-Instruct (fp32)", "",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; kvpress 0.5.5 "
             f"(transformers<5.3, separate environment). {args.prompts} passkey prompts of ~{args.length} tokens, "
             f"greedy {args.new_tokens} tokens. SnapKV window {args.window}, pool 5; StreamingLLM 4 sinks; "
             "ExpectedAttention 512 future positions, 4 sinks; AdaKV over ExpectedAttention, safeguard 0.2; "
             f"DuoAttention {args.duo_sinks} sinks + {args.duo_recent} recent, the head pattern from skimfx's "
             f"calibrate_duo on the shipped reference texts ({duo_seconds:.0f} s), given to both. skimfx is given "
             "the same kept count per layer as kvpress (ratio: the fraction evicted; for DuoAttention the fraction "
             "of heads that stream). kvpress compresses the prompt only, so skimfx's StreamingLLM and DuoAttention "
             "run with evict_during_decode=false in the compared rows; \"(rolling)\" is skimfx's DuoAttention with "
             "the paper's decode-time window.", "",
             "Index overlap: Jaccard of the prompt positions kept by kvpress and by skimfx, per layer and KV head "
             "(exact: share of (layer, head) pairs with identical sets). KV after prefill: bytes held, as a share "
             "of the same implementation's dense cache (skimfx: allocated, with room for the generated tokens; "
             "kvpress: its cache tensors). Agreement: position-by-position equality of greedy continuations.", "",
             "| method | ratio | kept skimfx / kvpress | index overlap (min) | exact heads | passkey skimfx / kvpress "
             "(dense) | tokens = kvpress | = dense skimfx / kvpress | KV skimfx | KV kvpress |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ov = "—" if r["index_overlap_mean"] is None else f"{r['index_overlap_mean']:.4f} ({r['index_overlap_min']:.4f})"
        lines.append(
            f"| {r['method']} | {r['ratio']:g} | {r['kept_fraction_skimfx']:.1%} / {r['kept_fraction_kvpress']:.1%} | "
            f"{ov} | {pct(r['exact_heads'])} | {r['passkey_skimfx']:.0%} / {r['passkey_kvpress']:.0%} "
            f"({r['passkey_dense']:.0%}) | {r['token_agreement_with_kvpress']:.1%} | "
            f"{r['skimfx_agreement_with_dense']:.1%} / {r['kvpress_agreement_with_dense']:.1%} | "
            f"{r['kv_bytes_skimfx'] / 2**20:.2f} MiB ({r['kv_bytes_skimfx'] / r['kv_bytes_skimfx_dense']:.0%}) | "
            f"{r['kv_bytes_kvpress'] / 2**20:.2f} MiB ({r['kv_bytes_kvpress'] / r['kv_bytes_kvpress_dense']:.0%}) |")
    (out_dir / "kvpress_compare.md").write_text("\n".join(lines) + "\n")
    (out_dir / "kvpress_compare.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    from _results import finish

    finish("kvpress_compare", out=out_dir)


if __name__ == "__main__":
    main()
