"""skimfx's SnapKV and StreamingLLM against NVIDIA kvpress's SnapKVPress / StreamingLLMPress.

Same model (SmolLM2-135M-Instruct, fp32, the weights skimfx caches), same prompts, same kept count
per layer: for every layer and KV head, the overlap of the prompt positions each implementation
keeps, and the agreement of the greedy tokens generated from the compressed caches (plus each one's
agreement with dense).

kvpress needs transformers < 5.3, so it runs in a separate environment; this script drives it:

    python3 -m venv /tmp/kvp && /tmp/kvp/bin/pip install torch==2.13.0 "kvpress==0.5.5" "transformers<5.3" accelerate
    python bench/kvpress_compare.py --kvpress-python /tmp/kvp/bin/python

The kvpress half (``--side kvpress``) imports only torch, transformers and kvpress.
Writes bench/results/kvpress_compare.{md,json}.
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


# ---------------------------------------------------------------------------------------------- kvpress side
def run_kvpress(spec_path: str, out_path: str) -> None:
    import torch
    from kvpress import SnapKVPress, StreamingLLMPress
    from kvpress.utils import compute_n_kept
    from transformers import AutoModelForCausalLM, DynamicCache

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    kept: dict[int, list] = {}

    def recording(cls):
        class Recording(cls):
            def compress(self, module, hidden_states, keys, values, attentions, kwargs):
                scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
                n = compute_n_kept(keys.shape[2], self.compression_ratio)
                idx = scores.topk(n, dim=-1).indices.sort(-1).values
                kept[module.layer_idx] = idx[0].tolist()
                return super().compress(module, hidden_states, keys, values, attentions, kwargs)
        return Recording

    presses = {"snapkv": lambda r: recording(SnapKVPress)(compression_ratio=r, window_size=spec["window"], kernel_size=5),
               "streamingllm": lambda r: recording(StreamingLLMPress)(compression_ratio=r, n_sink=spec["sinks"])}
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
                    toks = [int(logits.argmax())]
                    n = len(ids)
                    for i in range(spec["new_tokens"] - 1):
                        logits = model(torch.tensor([[toks[-1]]]), past_key_values=cache,
                                       position_ids=torch.tensor([[n + i]])).logits[0, -1]
                        toks.append(int(logits.argmax()))
                out.append({"method": method, "ratio": ratio, "prompt": pi, "tokens": toks,
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
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ratios", default="0.5,0.75", help="kvpress compression ratios (fraction evicted)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.side == "kvpress":
        run_kvpress(args.spec, args.out)
        return
    if not args.kvpress_python:
        sys.exit("give --kvpress-python (a python with kvpress and transformers<5.3 installed; see the docstring)")

    import torch

    import skimfx
    from skimfx import SnapKV, StreamingLLM
    from skimfx.eval.passkey import passkey_prompts
    from skimfx.models import cache_root

    torch.set_num_threads(args.threads)
    model, tok = skimfx.load_model("smollm2-135m")
    depths = [i / max(1, args.prompts - 1) for i in range(args.prompts)]
    prompts = [p.ids for p in passkey_prompts(tok, args.length, depths=depths, keys_per_depth=1, seed=7)]
    ratios = [float(r) for r in args.ratios.split(",")]
    sinks = 4
    spec = {"model_dir": str(cache_root() / "smollm2-135m"), "prompts": prompts, "ratios": ratios, "window": args.window,
            "sinks": sinks, "methods": ["snapkv", "streamingllm"], "new_tokens": args.new_tokens, "threads": args.threads}
    RESULTS.mkdir(exist_ok=True)
    spec_path, kvp_path = RESULTS / ".kvpress_spec.json", RESULTS / ".kvpress_out.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.time()
    subprocess.run([args.kvpress_python, __file__, "--side", "kvpress", "--spec", str(spec_path), "--out", str(kvp_path)],
                   check=True)
    kvp = json.loads(kvp_path.read_text())
    spec_path.unlink()
    kvp_path.unlink()
    print(f"kvpress side: {time.time() - t0:.0f} s")

    dense = skimfx.compile(model, tokenizer=tok).generate(prompts, max_new_tokens=args.new_tokens, stop_tokens=[])
    rows = []
    for method in spec["methods"]:
        for ratio in ratios:
            ref = [r for r in kvp if r["method"] == method and r["ratio"] == ratio]
            overlaps, agree_kvp, agree_dense_ours, agree_dense_kvp = [], [], [], []
            for r in ref:
                ids = prompts[r["prompt"]]
                n_kept = len(r["kept"]["0"][0])
                recipe = (SnapKV(budget=n_kept, window=args.window) if method == "snapkv"
                          else StreamingLLM(recent=n_kept - sinks, sinks=sinks, evict_during_decode=False))
                g = skimfx.compile(model, recipe, tokenizer=tok).generate([ids], max_new_tokens=args.new_tokens,
                                                                          stop_tokens=[])
                for layer, heads in g.stats.kv_kept.items():
                    for h, mine in enumerate(heads[0]):
                        theirs = set(r["kept"][str(layer)][h])
                        overlaps.append(len(theirs & set(mine)) / len(theirs))
                ours = g.tokens[0]
                d = dense.tokens[r["prompt"]]
                agree_kvp.append(_agree(ours, r["tokens"]))
                agree_dense_ours.append(_agree(ours, d))
                agree_dense_kvp.append(_agree(r["tokens"], d))
            rows.append({"method": method, "kept_fraction": round(1 - ratio, 3), "prompts": len(ref),
                         "index_overlap_mean": sum(overlaps) / len(overlaps), "index_overlap_min": min(overlaps),
                         "exact_heads": sum(o == 1.0 for o in overlaps) / len(overlaps),
                         "token_agreement_with_kvpress": sum(agree_kvp) / len(agree_kvp),
                         "skimfx_agreement_with_dense": sum(agree_dense_ours) / len(agree_dense_ours),
                         "kvpress_agreement_with_dense": sum(agree_dense_kvp) / len(agree_dense_kvp)})
            print(rows[-1], flush=True)
    write(rows, args)


def _agree(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy continuations agree, up to the first difference counted
    position by position (both are teacher-free, so after a divergence they usually stay apart)."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n


def write(rows, args) -> None:
    import platform

    import torch
    lines = ["# skimfx vs kvpress — SnapKV and StreamingLLM on SmolLM2-135M-Instruct (fp32)", "",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; kvpress 0.5.5 "
             f"(transformers<5.3, separate environment). {args.prompts} passkey prompts of ~{args.length} tokens, "
             f"greedy {args.new_tokens} tokens. SnapKV window {args.window}, pool 5; StreamingLLM 4 sinks. skimfx "
             "is given the same kept count per layer as kvpress. kvpress compresses the prompt only, so skimfx's "
             "StreamingLLM runs with evict_during_decode=false here (its default keeps evicting during decode).", "",
             "Index overlap: |kept by kvpress ∩ kept by skimfx| / |kept|, per layer and KV head (exact heads: share "
             "of (layer, head) pairs with identical sets). Token agreement: position-by-position equality of the "
             "greedy continuations.", "",
             "| method | kept | index overlap mean | min | exact heads | tokens = kvpress | skimfx = dense | kvpress = dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['kept_fraction']:.0%} | {r['index_overlap_mean']:.4f} | "
                     f"{r['index_overlap_min']:.4f} | {r['exact_heads']:.1%} | {r['token_agreement_with_kvpress']:.1%} | "
                     f"{r['skimfx_agreement_with_dense']:.1%} | {r['kvpress_agreement_with_dense']:.1%} |")
    (RESULTS / "kvpress_compare.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "kvpress_compare.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    from _results import finish

    finish("kvpress_compare")


if __name__ == "__main__":
    main()
