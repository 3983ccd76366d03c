"""Fused vs unfused graph (and HF generate) on the embedded models: prefill time, decode tokens/s,
and equality.

Both programs compile the same model object in this process (``skimfx.compile(model)`` and
``skimfx.compile(model, fuse=False)``) and run the same prompts as HF's own ``generate``, alternating,
best of ``--repeats``. Equality is checked on the same inputs: the largest logit difference between
fused and unfused over the prompt, and the share of greedy tokens equal to the unfused run's.

    python bench/fuse.py                              # SmolLM2-135M and Gemma3-270M, 512 and 2048 tokens
    python bench/fuse.py --models smollm2-135m --lengths 512
    python bench/fuse.py --device cuda --dtype bfloat16 --random-weights   # GPU machine without the GGUFs

``--random-weights`` builds the named model's architecture (same config) with random weights and
random prompts: speed does not depend on the weights, and fused/unfused equality is still checked.

Writes bench/results/fuse.md (+ .json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import skimfx
from _results import finish, load_model
from e2e_dense import prompt_ids, run_hf    # the same prompt text and HF timing as the dense benchmark

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per program (best tokens/s kept)")
    ap.add_argument("--prefill-repeats", type=int, default=9, help="interleaved prefills per program (median kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models.split(","):
        model, tok = load_model(name, args.random_weights, args.device, dtype)
        progs = {"unfused": skimfx.compile(model, tokenizer=tok, fuse=False), "fused": skimfx.compile(model, tokenizer=tok)}
        counts = {k: v for k, v in progs["fused"].program.history if k.startswith("fuse.")}
        for n in map(int, args.lengths.split(",")):
            ids = (torch.tensor([prompt_ids(tok, n)]) if tok is not None else
                   torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                   ).to(args.device)
            best = {k: dict(prefill=float("inf"), decode=0.0) for k in (*progs, "hf")}
            gens, logits = {}, {}
            with torch.inference_mode():
                for k, cm in progs.items():
                    logits[k] = cm(ids).logits
                logits["hf"] = model(ids).logits.float()
                # prefill: many short interleaved runs, the median (one prefill is ~1 s and noisy here)
                ttfts = {k: [] for k in best}
                for _ in range(args.prefill_repeats):
                    for k, cm in progs.items():
                        ttfts[k].append(cm.generate(input_ids=ids, max_new_tokens=1, stop_tokens=[]).stats.ttft_s)
                    ttfts["hf"].append(run_hf(model, ids, 2)[0])
                for k, ts in ttfts.items():
                    best[k]["prefill"] = sorted(ts)[len(ts) // 2]
                for _ in range(args.repeats):
                    for k, cm in progs.items():       # alternate, so drift hits all alike
                        g = cm.generate(input_ids=ids, max_new_tokens=args.new_tokens, stop_tokens=[])
                        best[k]["decode"] = max(best[k]["decode"], g.stats.decode_tokens_per_s)
                        gens[k] = g.tokens[0]
                    best["hf"]["decode"] = max(best["hf"]["decode"], run_hf(model, ids, args.new_tokens)[1])
            same = sum(a == b for a, b in zip(gens["fused"], gens["unfused"])) / max(1, len(gens["unfused"]))
            rows.append(dict(model=name, prompt=n, prefill_hf_s=best["hf"]["prefill"], decode_hf=best["hf"]["decode"],
                             prefill_unfused_s=best["unfused"]["prefill"],
                             prefill_fused_s=best["fused"]["prefill"], decode_unfused=best["unfused"]["decode"],
                             decode_fused=best["fused"]["decode"],
                             max_logit_diff=(logits["fused"] - logits["unfused"]).abs().max().item(),
                             hf_logit_diff=(logits["fused"].float() - logits["hf"]).abs().max().item(),
                             hf_top1=(logits["fused"].argmax(-1) == logits["hf"].argmax(-1)).float().mean().item(),
                             token_agreement=same, counts=counts))
            print(rows[-1], flush=True)
    where = (f"{args.device}" + (f", {torch.get_num_threads()} threads" if args.device == "cpu" else
                                 f" ({torch.cuda.get_device_name()})") + f", {args.dtype}")
    lines = [f"# Fused vs unfused graph vs HF generate ({where})", "",
             f"Same model object, same prompts ({'random weights and tokens' if args.random_weights else 'Python license text'}),"
             f" interleaved: prefill time is the median of {args.prefill_repeats} runs, decode the best of {args.repeats} runs "
             f"of {args.new_tokens} greedy tokens. Speedups are fused vs unfused. vs HF: the fused program's prompt logits "
             "against the HF model's own forward on the same ids (largest difference, share of positions with the same argmax).", "",
             "| model | prompt | HF prefill (s) | prefill unfused (s) | prefill fused (s) | speedup | HF decode (tok/s) | "
             "decode unfused (tok/s) | decode fused (tok/s) | speedup | max logit diff | tokens equal | vs HF: max diff | "
             "vs HF: argmax equal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['prompt']} | {r['prefill_hf_s']:.3f} | {r['prefill_unfused_s']:.3f} | "
                     f"{r['prefill_fused_s']:.3f} | "
                     f"{r['prefill_unfused_s'] / r['prefill_fused_s']:.2f}x | {r['decode_hf']:.1f} | {r['decode_unfused']:.1f} | "
                     f"{r['decode_fused']:.1f} | {r['decode_fused'] / r['decode_unfused']:.2f}x | "
                     f"{r['max_logit_diff']:.1e} | {100 * r['token_agreement']:.0f}% | {r['hf_logit_diff']:.1e} | "
                     f"{100 * r['hf_top1']:.1f}% |")
    lines += ["", "Rewrites: " + "; ".join(f"{m}: " + ", ".join(f"{k.removeprefix('fuse.')} {v}" for k, v in c.items())
                                        for m, c in {r["model"]: r["counts"] for r in rows}.items())]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "fuse" if args.device == "cpu" else f"fuse_{args.device}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    finish(stem, out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
