"""How much of a decode step is attention, and so the most any KV selection can gain, on this machine.

Dense decode time per token on SmolLM2-135M-Instruct (batch 1, greedy) at a short context and at
1k..8k tokens. Whatever a KV policy does, a step still runs every projection, MLP and the LM head; the
cheapest it could be is the step at the short context, where attention costs almost nothing. So
``t(L) / t(short)`` bounds the decode speed-up of *any* sparse attention or eviction at context L.
DELTA (5 of 30 layers full) at 25% and 10% budgets runs next to it in the same process, with its
agreement with dense over the same 64 tokens.

    python bench/attention_share.py              # about 15 minutes on 2 cores
    python bench/attention_share.py --quick      # 64 / 1k / 2k tokens
    python bench/attention_share.py --batch 4 --lengths 4096   # 4 sequences a step
    python bench/attention_share.py --delta-calibration cal.pt  # + DELTA with calibrated select layers
    python bench/attention_share.py --device cuda --dtype bfloat16 --random-weights --batch 32   # GPU, no GGUF

``--delta-calibration FILE`` adds DELTA rows whose select layers come from ``skimfx.calibrate_delta``
(loaded from FILE, or run and saved there: on two 4k passkey prompts with other seeds than the ones
measured here, 10% budget, about 10 minutes).

Agreement is measured two ways on the same 64 tokens: "agreement" compares each free-running
generation with dense's position by position (one differing token usually ends the match for good),
"top-1 (forced)" / "KL" feed dense's own tokens to both and compare the next-token predictions at every
step (how often the policy would pick dense's token given the same text).

``--random-weights`` runs SmolLM2's architecture with random weights on random token prompts (a GPU machine
without the GGUF package): the times are the real model's, the quality columns are left out.

Writes bench/results/attention_share.md and .json (attention_share_cuda.* with ``--device cuda``; bench/gpu.sh
runs it there in bf16 when the embedded model is installed).
"""
from __future__ import annotations

import argparse
import platform

import torch

import skimfx
from _results import agreement, delta_calibration, load_model, save
from skimfx.eval import logit_agreement, passkey_prompts, teacher_forced_logits

POLICIES = {"DELTA 25%": "delta:budget=0.25", "DELTA 10%": "delta:budget=0.1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (passkeys at different depths)")
    ap.add_argument("--lengths", help="comma-separated contexts (default 1k, 2k, 4k, 8k); policies run at >= 4k")
    ap.add_argument("--delta-calibration", help="DeltaCalibration file (made here when missing): adds DELTA rows "
                    "with calibrated select layers")
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2's architecture, random weights and "
                    "prompts: times only")
    ap.add_argument("--out", help="folder for the table (default bench/results)")
    args = ap.parse_args()
    if args.random_weights and args.delta_calibration:
        ap.error("--delta-calibration needs the real weights: leave out --random-weights")
    torch.set_num_threads(args.threads)
    lengths = (1024, 2048) if args.quick else (1024, 2048, 4096, 8000)
    if args.lengths:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    policy_lengths = [L for L in lengths if L >= (2048 if args.quick else 4096)]
    B = args.batch
    depths = (0.5,) if B == 1 else tuple((i + 1) / (B + 1) for i in range(B))
    model, tok = load_model("smollm2-135m", args.random_weights, args.device, getattr(torch, args.dtype))
    rng = torch.Generator().manual_seed(1)

    def random_ids(n: int) -> list[int]:
        return torch.randint(0, model.config.vocab_size, (n,), generator=rng).tolist()
    dense = skimfx.compile(model, tokenizer=tok)
    policies = {name: skimfx.compile(model, r, tokenizer=tok) for name, r in POLICIES.items()}
    cal = delta_calibration(args.delta_calibration, dense, tok) if args.delta_calibration else None
    if cal is not None:
        for b in (0.25, 0.1):
            policies[f"DELTA {b:.0%} cal."] = skimfx.compile(model, cal.recipe(budget=b), tokenizer=tok)

    def run_all(cms: dict, prompts) -> dict:
        """name -> (tokens per sequence, seconds per decode step): the fastest of ``--repeats`` runs. The
        repeats go round the configurations (dense, policy, policy, ..., dense, ...) so that a slow spell
        of this machine (its timing varies by +-10-15%) hits every configuration alike."""
        best = {}
        for cm in cms.values():
            cm.generate([p[:16] for p in prompts], max_new_tokens=4, stop_tokens=[])     # warm-up
        for _ in range(args.repeats):
            for name, cm in cms.items():
                g = cm.generate(prompts, max_new_tokens=args.new_tokens, stop_tokens=[])
                t = g.stats.decode_s / (g.stats.decode_tokens / len(prompts))
                if name not in best or t < best[name][1]:
                    best[name] = (g.tokens, t)
        return best

    short = [tok("Write a short story about a lighthouse keeper.").input_ids if tok else random_ids(9)] * B
    _, t_short = run_all({"dense": dense}, short)["dense"]
    same = {"agreement": 1.0, "top1_forced": 1.0, "kl": 0.0} if tok else {"agreement": None, "top1_forced": None, "kl": None}
    rows = [{"context": len(short[0]), "batch": B, "recipe": "dense", "ms_per_token": 1000 * t_short, "bound": 1.0,
             "speedup": 1.0, **same}]
    print(f"{len(short[0]):>5} dense {1000 * t_short:.1f} ms/step", flush=True)
    for L in lengths:
        prompts = ([random_ids(L - args.new_tokens - 8) for _ in range(B)] if tok is None else
                   [p.ids for p in passkey_prompts(tok, L - args.new_tokens - 8, depths=depths, keys_per_depth=1,
                                                   seed=1)])
        timed = run_all({"dense": dense, **(policies if L in policy_lengths else {})}, prompts)
        ref, t = timed["dense"]
        bound = t / t_short
        n = max(map(len, prompts))
        rows.append({"context": n, "batch": B, "recipe": "dense", "ms_per_token": 1000 * t, "bound": bound,
                     "speedup": 1.0, **same})
        print(f"{n:>5} dense {1000 * t:.1f} ms/step, bound {bound:.2f}x", flush=True)
        if L not in policy_lengths:
            continue
        ref_logits = teacher_forced_logits(dense.program, prompts, ref) if tok else None
        for name, cm in policies.items():
            out, tp = timed[name]
            forced = (logit_agreement(ref_logits, teacher_forced_logits(cm.program, prompts, ref)) if tok else
                      {"top1": None, "kl": None})                     # random weights: no quality to speak of
            rows.append({"context": n, "batch": B, "recipe": name, "ms_per_token": 1000 * tp, "bound": bound,
                         "speedup": t / tp, "agreement": sum(map(agreement, out, ref)) / B if tok else None,
                         "top1_forced": forced["top1"], "kl": forced["kl"]})
            print(f"{n:>5} {name} {1000 * tp:.1f} ms/step ({t / tp:.2f}x, bound {bound:.2f}x)" +
                  (f" agreement {rows[-1]['agreement']:.0%}, forced top-1 {forced['top1']:.0%}, KL {forced['kl']:.3f}"
                   if tok else ""), flush=True)

    where = (f"{platform.machine()}, {args.threads} threads" if args.device == "cpu" else
             f"{torch.cuda.get_device_name()}")
    what = "random token prompts" if tok is None else "a passkey prompt" if B == 1 else f"{B} passkey prompts"
    lines = [f"# Attention's share of a decode step — SmolLM2-135M-Instruct{' architecture, random weights' if tok is None else ''}"
             f" ({args.dtype}, {args.device})", "",
             f"Machine: {where}, torch {torch.__version__}. One process, batch {B}, "
             f"greedy {args.new_tokens} new tokens after {what}, "
             f"the fastest of {args.repeats} runs of each configuration (runs taken in turn across the configurations). bound = dense time per step at this context "
             f"/ at {len(short[0])} tokens: the most any KV selection can speed decoding up here, since every "
             "projection, MLP and the LM head still run. DELTA: layers 0-1 full, selection at 2, 10, 20, recent 32." +
             ("" if cal is None else f" DELTA cal.: layers 0-{cal.full_layers - 1} full, selection at "
              f"{', '.join(map(str, cal.selection_layers))} (skimfx.calibrate_delta on two 4k passkey prompts of other "
              f"seeds, 10% budget: KL {cal.kl:.4f} against the default placement's {cal.default_kl:.4f})."), "",
             "| context | recipe | ms / step | × dense | bound | share of bound | agreement | top-1 (forced) | KL |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    for r in rows:
        gain = (r["speedup"] - 1) / (r["bound"] - 1) if r["bound"] > 1.001 and r["recipe"] != "dense" else None
        lines.append(f"| {r['context']} | {r['recipe']} | {r['ms_per_token']:.1f} | {r['speedup']:.2f} | "
                     f"{r['bound']:.2f} | {'-' if gain is None else f'{gain:.0%}'} | {pct(r['agreement'])} | "
                     f"{pct(r['top1_forced'])} | {'-' if r['kl'] is None else format(r['kl'], '.3f')} |")
    lines += ["", "share of bound: the part of the possible gain (bound - 1) the policy realises. agreement: the "
              "free-running tokens equal to dense's, position by position. top-1 (forced) / KL: dense's tokens fed to "
              "both; the share of steps whose next-token argmax equals dense's, and the mean KL(dense || policy) in "
              "nats."]
    stem = "attention_share" + ("" if args.device == "cpu" else f"_{args.device}") + ("" if B == 1 else f"_b{B}")
    save(stem, lines, rows, args.out)


if __name__ == "__main__":
    main()
