"""DELTA's select layers: the default placement against ``skimfx.calibrate_delta``'s, same budgets.

Both read the whole cache in 5 of 30 layers (layers 0-1 full plus three select layers), so a decode
step costs the same; what the placement changes is which token set each reuse layer reads. Measured:
passkey retrieval at ~1k tokens (needle depths 0..1, four keys each, as bench/sparse.py) and, on one
passkey prompt at 4k and 8k, the teacher-forced agreement with dense over dense's own 64 tokens
(top-1: dense's next token predicted; KL(dense || DELTA) in nats). Dense in the same process.

    python bench/delta_placement.py --delta-calibration cal.pt   # about 10 minutes (+10 to calibrate)

The calibration (``--delta-calibration FILE``: loaded, or made and saved) runs on passkey prompts of
other seeds than the ones measured here. Writes bench/results/delta_placement.md / .json.
"""
from __future__ import annotations

import argparse
import platform

import torch

import skimfx
from _results import delta_calibration, save
from skimfx.eval import logit_agreement, passkey_correct, passkey_prompts, teacher_forced_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta-calibration", required=True, help="DeltaCalibration file (made here when missing)")
    ap.add_argument("--passkey-prompts", type=int, default=20)
    ap.add_argument("--lengths", default="4096,8000", help="contexts of the teacher-forced agreement")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="folder for the table (default bench/results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = skimfx.load_model("smollm2-135m")
    dense = skimfx.compile(model, tokenizer=tok)
    cal = delta_calibration(args.delta_calibration, dense, tok)
    variants = {"dense": None}
    for b in (0.25, 0.1):
        variants[f"DELTA {b:.0%}"] = skimfx.Delta(budget=b)
        variants[f"DELTA {b:.0%} cal."] = cal.recipe(budget=b)
    compiled = {name: dense if r is None else skimfx.compile(model, r, tokenizer=tok) for name, r in variants.items()}

    rows = {name: {"recipe": name} for name in variants}
    prompts = passkey_prompts(tok, 1000, depths=tuple(i / 4 for i in range(5)),
                              keys_per_depth=max(1, args.passkey_prompts // 5), seed=0)
    for name, cm in compiled.items():
        g = cm.generate([p.ids for p in prompts], max_new_tokens=24)
        rows[name]["passkey"] = sum(passkey_correct(tok, p, t) for p, t in zip(prompts, g.tokens)) / len(prompts)
        print(f"passkey {name:<16} {rows[name]['passkey']:.0%}", flush=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    for L in lengths:
        ids = [passkey_prompts(tok, L - args.new_tokens - 8, depths=(0.5,), keys_per_depth=1, seed=11)[0].ids]
        cont = dense.generate(ids, max_new_tokens=args.new_tokens, stop_tokens=[]).tokens
        ref = teacher_forced_logits(dense.program, ids, cont)
        for name, cm in compiled.items():
            if name == "dense":
                continue
            a = logit_agreement(ref, teacher_forced_logits(cm.program, ids, cont))
            rows[name][f"top1_{L}"], rows[name][f"kl_{L}"] = a["top1"], a["kl"]
            print(f"{L} {name:<16} top-1 {a['top1']:.0%} KL {a['kl']:.3f}", flush=True)

    sel = ", ".join(map(str, cal.selection_layers))
    lines = ["# DELTA select-layer placement: default vs calibrated — SmolLM2-135M-Instruct (fp32, cpu)", "",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}. Default: layers 0-1 "
             f"full, selection at 2, 10, 20. Calibrated (`skimfx.calibrate_delta`, 10% budget, two 4k passkey "
             f"prompts of other seeds, {len(cal.tried)} placements in {cal.seconds:.0f} s): layers "
             f"0-{cal.full_layers - 1} full, selection at {sel}. Both: 5 of 30 layers read the whole cache, recent 32.",
             "", "| recipe | passkey ~1k | " + " | ".join(f"top-1 {L} | KL {L}" for L in lengths) + " |",
             "|---|---:|" + "---:|---:|" * len(lengths)]
    for r in rows.values():
        cells = [f"{r['passkey']:.0%}"]
        for L in lengths:
            cells += ["-", "-"] if r["recipe"] == "dense" else [f"{r[f'top1_{L}']:.0%}", f"{r[f'kl_{L}']:.3f}"]
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
    lines += ["", f"passkey: {len(prompts)} prompts of ~1k tokens, 24 greedy tokens. top-1 / KL: one passkey prompt "
              f"(seed 11) at each context, dense's {args.new_tokens} greedy tokens fed to both."]
    save("delta_placement", lines, list(rows.values()), args.out)


if __name__ == "__main__":
    main()
