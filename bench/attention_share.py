"""How much of a decode step is attention, and so the most any KV selection can gain, on this machine.

Dense decode time per token on SmolLM2-135M-Instruct (batch 1, greedy) at a short context and at
1k..8k tokens. Whatever a KV policy does, a step still runs every projection, MLP and the LM head; the
cheapest it could be is the step at the short context, where attention costs almost nothing. So
``t(L) / t(short)`` bounds the decode speed-up of *any* sparse attention or eviction at context L.
DELTA (5 of 30 layers full) at 25% and 10% budgets runs next to it in the same process, with its
agreement with dense over the same 64 tokens.

    python bench/attention_share.py              # about 15 minutes on 2 cores
    python bench/attention_share.py --quick      # 64 / 1k / 2k tokens

Writes bench/results/attention_share.md and .json (attention_share_cuda.* with ``--device cuda``; bench/gpu.sh
runs it there in bf16 when the embedded model is installed).
"""
from __future__ import annotations

import argparse
import platform

import torch

import skimfx
from _results import agreement, save
from skimfx.eval import passkey_prompts

POLICIES = {"DELTA 25%": "delta:budget=0.25", "DELTA 10%": "delta:budget=0.1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", help="folder for the table (default bench/results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = (1024, 2048) if args.quick else (1024, 2048, 4096, 8000)
    policy_lengths = (2048,) if args.quick else (4096, 8000)
    model, tok = skimfx.load_model("smollm2-135m", dtype=getattr(torch, args.dtype), device=args.device)
    dense = skimfx.compile(model, tokenizer=tok)
    policies = {name: skimfx.compile(model, r, tokenizer=tok) for name, r in POLICIES.items()}

    def run(cm, ids):
        """(tokens, seconds per decoded token): the fastest of ``--repeats`` runs (this machine's timing
        varies by +-10% between runs of one configuration; the minimum is the least disturbed)."""
        cm.generate([ids[:16]], max_new_tokens=4, stop_tokens=[])                      # warm-up
        best = None
        for _ in range(args.repeats):
            g = cm.generate([ids], max_new_tokens=args.new_tokens, stop_tokens=[])
            t = g.stats.decode_s / g.stats.decode_tokens
            best = (g.tokens[0], t) if best is None or t < best[1] else best
        return best

    short = tok("Write a short story about a lighthouse keeper.").input_ids
    _, t_short = run(dense, short)
    rows = [{"context": len(short), "recipe": "dense", "ms_per_token": 1000 * t_short, "bound": 1.0,
             "speedup": 1.0, "agreement": 1.0}]
    print(f"{len(short):>5} dense {1000 * t_short:.1f} ms/token", flush=True)
    for L in lengths:
        ids = passkey_prompts(tok, L - args.new_tokens - 8, depths=(0.5,), keys_per_depth=1, seed=1)[0].ids
        ref, t = run(dense, ids)
        bound = t / t_short
        rows.append({"context": len(ids), "recipe": "dense", "ms_per_token": 1000 * t, "bound": bound,
                     "speedup": 1.0, "agreement": 1.0})
        print(f"{len(ids):>5} dense {1000 * t:.1f} ms/token, bound {bound:.2f}x", flush=True)
        if L not in policy_lengths:
            continue
        for name, cm in policies.items():
            out, tp = run(cm, ids)
            rows.append({"context": len(ids), "recipe": name, "ms_per_token": 1000 * tp, "bound": bound,
                         "speedup": t / tp, "agreement": agreement(out, ref)})
            print(f"{len(ids):>5} {name} {1000 * tp:.1f} ms/token ({t / tp:.2f}x, bound {bound:.2f}x) agreement "
                  f"{rows[-1]['agreement']:.0%}", flush=True)

    where = (f"{platform.machine()}, {args.threads} threads" if args.device == "cpu" else
             f"{torch.cuda.get_device_name()}")
    lines = [f"# Attention's share of a decode step — SmolLM2-135M-Instruct ({args.dtype}, {args.device})", "",
             f"Machine: {where}, torch {torch.__version__}. One process, batch 1, "
             f"greedy {args.new_tokens} new tokens after a passkey prompt, the fastest of {args.repeats} runs of each "
             "configuration. bound = dense time per token at this context "
             f"/ at {len(short)} tokens: the most any KV selection can speed decoding up here, since every projection, "
             "MLP and the LM head still run. DELTA: layers 0-1 full, selection at 2, 10, 20, recent 32.", "",
             "| context | recipe | ms / token | × dense | bound | share of bound | agreement |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = (r["speedup"] - 1) / (r["bound"] - 1) if r["bound"] > 1.001 and r["recipe"] != "dense" else None
        lines.append(f"| {r['context']} | {r['recipe']} | {r['ms_per_token']:.1f} | {r['speedup']:.2f} | "
                     f"{r['bound']:.2f} | {'-' if gain is None else f'{gain:.0%}'} | {r['agreement']:.0%} |")
    lines += ["", "share of bound: the part of the possible gain (bound - 1) the policy realises."]
    save("attention_share" if args.device == "cpu" else f"attention_share_{args.device}", lines, rows, args.out)


if __name__ == "__main__":
    main()
