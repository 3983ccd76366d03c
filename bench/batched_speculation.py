"""Batched self-speculation against the same prompts speculated one at a time, on short copy-heavy prompts
where per-step overhead, not compute, bounds a decode step (SmolLM2-135M, ~600-token essay prompts).

For each recipe (lookahead drafts alone, over Quest, over H2O which evicts at every draft token), batch B
decodes once with the batch's drafts verified together (``batched=true``) and once prompt by prompt
(``batched=false``), interleaved over --repeats rounds; the table gives both decode times (summed over the
rounds), their ratio, and whether both equal the recipe without speculation, answer by answer.
``bench/compose.py`` has the same comparison at 4k tokens on the 0.5B model.
"""
from __future__ import annotations

import argparse

import torch

from _results import save
from compose import first_difference, reuse_prompts

import skimfx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batches", default="4,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = skimfx.load_model("smollm2-135m")
    budget = max(16, args.length // 4)
    recipes = {"lookahead": "", "Quest 25% + lookahead": f"quest:token_budget={budget}",
               "H2O 25% + lookahead": f"h2o:heavy={budget // 2},recent={budget - budget // 2}"}
    spec = "selfspeculative:draft=lookahead"
    prompts = [p for seed in range(3) for _, p in reuse_prompts(tok, args.length, seed=seed)]
    eos = [tok.eos_token_id]
    rows = []
    for label, base in recipes.items():
        plain = skimfx.compile(model, base or None, tokenizer=tok)
        together = skimfx.compile(model, f"{base}+{spec}" if base else spec, tokenizer=tok)
        one_by_one = skimfx.compile(model, (f"{base}+{spec}" if base else spec) + ",batched=false", tokenizer=tok)
        for cm in (plain, together, one_by_one):
            cm.generate(prompts[:2], max_new_tokens=4)                       # warm-up
        for B in map(int, args.batches.split(",")):
            batch = prompts[:B]
            want = plain.generate(batch, max_new_tokens=args.new_tokens, stop_tokens=eos)
            t_together = t_one = 0.0
            for _ in range(args.repeats):
                g = together.generate(batch, max_new_tokens=args.new_tokens, stop_tokens=eos)
                o = one_by_one.generate(batch, max_new_tokens=args.new_tokens, stop_tokens=eos)
                t_together += g.stats.decode_s
                t_one += o.stats.decode_s
            rows.append({"recipe": label, "batch": B, "decode_s_together": t_together, "decode_s_one_by_one": t_one,
                         "ratio": t_one / t_together, "plain_decode_s": want.stats.decode_s * args.repeats,
                         "tokens": g.stats.decode_tokens,
                         "together_vs_plain": [first_difference(a, b) for a, b in zip(g.tokens, want.tokens)],
                         "one_by_one_vs_plain": [first_difference(a, b) for a, b in zip(o.tokens, want.tokens)]})
            print(rows[-1], flush=True)

    def equal(firsts):
        return f"{sum(f is None for f in firsts)}/{len(firsts)}"

    lines = [f"# Batched self-speculation: SmolLM2-135M, {min(map(len, prompts))}-{max(map(len, prompts))}-token "
             "copy-heavy prompts",
             "",
             f"Greedy, up to {args.new_tokens} new tokens (stops at EOS); decode times summed over {args.repeats} "
             "interleaved rounds. Ratio: prompt by prompt over verified together (>1 = batching pays).",
             "",
             "| recipe | batch | decode s, verified together | decode s, prompt by prompt | ratio | decode s without "
             "speculation (batched) | answers equal to the recipe without speculation (together / one by one) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['batch']} | {r['decode_s_together']:.1f} | {r['decode_s_one_by_one']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['plain_decode_s']:.1f} | {equal(r['together_vs_plain'])} / "
                     f"{equal(r['one_by_one_vs_plain'])} |")
    save("batched_speculation", lines, {"rows": rows, "recipes": recipes, "length": args.length,
                                        "new_tokens": args.new_tokens})


if __name__ == "__main__":
    main()
