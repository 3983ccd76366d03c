"""Fused vs unfused graph on the embedded models: prefill time, decode tokens/s, and equality.

Both programs compile the same model object in this process (``skimfx.compile(model)`` and
``skimfx.compile(model, fuse=False)``) and run the same prompts, alternating, best of ``--repeats``.
Equality is checked on the same inputs: the largest logit difference over the prompt, and whether the
greedy tokens agree.

    python bench/fuse.py                              # SmolLM2-135M and Gemma3-270M, 512 and 2048 tokens
    python bench/fuse.py --models smollm2-135m --lengths 512

Writes bench/results/fuse.md (+ .json).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import skimfx

RESULTS = Path(__file__).parent / "results"


def prompt(tok, n: int) -> torch.Tensor:
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(errors="ignore")
    ids = tok(text).input_ids
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor([ids[:n]])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model, tok = skimfx.load_model(name)
        progs = {"unfused": skimfx.compile(model, tokenizer=tok, fuse=False), "fused": skimfx.compile(model, tokenizer=tok)}
        counts = {k: v for k, v in progs["fused"].program.history if k.startswith("fuse.")}
        for n in map(int, args.lengths.split(",")):
            ids = prompt(tok, n)
            best = {k: dict(prefill=float("inf"), decode=0.0) for k in progs}
            gens, logits = {}, {}
            with torch.inference_mode():
                for k, cm in progs.items():
                    logits[k] = cm(ids).logits
                for _ in range(args.repeats):
                    for k, cm in progs.items():       # alternate, so drift hits both alike
                        g = cm.generate(input_ids=ids, max_new_tokens=args.new_tokens, stop_tokens=[])
                        best[k]["prefill"] = min(best[k]["prefill"], g.stats.ttft_s)
                        best[k]["decode"] = max(best[k]["decode"], g.stats.decode_tokens_per_s)
                        gens[k] = g.tokens[0]
            same = sum(a == b for a, b in zip(gens["fused"], gens["unfused"])) / max(1, len(gens["unfused"]))
            rows.append(dict(model=name, prompt=n, prefill_unfused_s=best["unfused"]["prefill"],
                             prefill_fused_s=best["fused"]["prefill"], decode_unfused=best["unfused"]["decode"],
                             decode_fused=best["fused"]["decode"],
                             max_logit_diff=(logits["fused"] - logits["unfused"]).abs().max().item(),
                             token_agreement=same, counts=counts))
            print(rows[-1], flush=True)
    lines = ["# Fused vs unfused graph (CPU, fp32, 2 threads)", "",
             f"Same model object, same prompts (Python license text), alternating, best of {args.repeats}; "
             f"{args.new_tokens} greedy tokens.", "",
             "| model | prompt | prefill unfused (s) | prefill fused (s) | speedup | decode unfused (tok/s) | "
             "decode fused (tok/s) | speedup | max logit diff | tokens equal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['prompt']} | {r['prefill_unfused_s']:.3f} | {r['prefill_fused_s']:.3f} | "
                     f"{r['prefill_unfused_s'] / r['prefill_fused_s']:.2f}x | {r['decode_unfused']:.1f} | "
                     f"{r['decode_fused']:.1f} | {r['decode_fused'] / r['decode_unfused']:.2f}x | "
                     f"{r['max_logit_diff']:.1e} | {100 * r['token_agreement']:.0f}% |")
    lines += ["", "Rewrites: " + "; ".join(f"{m}: " + ", ".join(f"{k.removeprefix('fuse.')} {v}" for k, v in c.items())
                                        for m, c in {r["model"]: r["counts"] for r in rows}.items())]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuse.md").write_text(text)
    (out / "fuse.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
