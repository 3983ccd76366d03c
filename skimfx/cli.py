"""Command line: ``skimfx demo | generate | bench | eval | show | compress``.

    skimfx demo                                    # SmolLM2-135M: dense vs the recipes on one long prompt
    skimfx generate --model smollm2-135m --prompt "Why is the sky blue?" --recipe promptdistill:layers=14,keep=256
    skimfx bench --lengths 1024,4096 --recipe delta:budget=0.25 --recipe snapkv:budget=0.25
    skimfx eval --task passkey --recipe promptdistill:layers=14,keep=250 --recipe gemfilter:layer=14,keep=250
    skimfx show --model gemma3-270m --recipe gemfilter:layer=6,keep=128
    skimfx compress --recipe gemfilter:layer=14,keep=512 --prompt-file doc.txt   # kept ids for any engine
"""
from __future__ import annotations

import argparse
import sys
import time

DEMO_RECIPES = ("promptdistill:layers=14,keep={q}", "promptdistill:layers=8,keep={q}",
                "gemfilter:layer=14,keep={q}", "snapkv:budget=0.25", "delta:budget=0.25")


def _load(name: str, recipe: str | None = None):
    import skimfx

    recipes = skimfx.parse_recipe(recipe or "")      # a bad recipe fails before any loading
    t = time.perf_counter()
    model, tok = skimfx.load_model(name)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    cm = skimfx.compile(model, recipes, tokenizer=tok)
    return model, tok, cm, load_s, time.perf_counter() - t


def _encode(tok, prompt: str, chat: bool | None) -> list[int]:
    use_chat = bool(tok.chat_template) if chat is None else chat
    if use_chat:
        if not tok.chat_template:
            raise ValueError("this model's tokenizer has no chat template; drop --chat")
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tok(prompt).input_ids


def cmd_generate(args) -> None:
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue or answer")
    _, tok, cm, load_s, compile_s = _load(args.model, args.recipe)
    workers = getattr(cm.program.decoding, "workers", None)    # hogwild: the prompt tells the workers about each other
    if workers is not None:
        from .recipes.generation import hogwild_prompt

        args.prompt = hogwild_prompt(args.prompt, workers)
    ids = _encode(tok, args.prompt, args.chat)
    pieces: list[int] = []

    def stream(_b: int, t: int) -> None:
        pieces.append(t)
        text = tok.decode(pieces, skip_special_tokens=True)
        prev = tok.decode(pieces[:-1], skip_special_tokens=True)
        sys.stdout.write(text[len(prev):])
        sys.stdout.flush()

    g = cm.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, callback=stream if workers is None else None)
    if workers is not None:              # the workers' tokens interleave: their blocks are printed at the end
        sys.stdout.write(tok.decode(g.tokens[0], skip_special_tokens=True))
    print()
    print(f"[{args.model}] load {load_s:.1f} s, compile {compile_s:.1f} s; {g.stats}; "
          f"{len(g.tokens[0])} new tokens, finish: {g.finish_reasons[0]}", file=sys.stderr)
    for v in getattr(g, "votes", ()):         # shortmk: how the answer above was chosen
        print(f"[vote] answers of the first {len(v.voters)} to finish: {[v.answers[i] for i in v.voters]} -> "
              f"{v.answer!r}; {v.tokens_generated} tokens sampled over {len(v.samples)} chains", file=sys.stderr)


def cmd_show(args) -> None:
    import skimfx
    from skimfx.passes import PassManager, default_passes, final_passes

    recipes = [skimfx.resolve(r) for r in skimfx.parse_recipe(args.recipe or "")]
    model, _ = skimfx.load_model(args.model)
    program = skimfx.capture(model)
    print("== captured ==")
    print(program)
    program = PassManager(default_passes() + [p for r in recipes for p in r.passes(program.info)] + final_passes())(program)
    print("\n== after passes ==")
    print(program)


def measure(compiled: dict, prompts: list[list[int]], max_new_tokens: int, repeats: int,
            stop_tokens=None) -> dict:
    """{configuration: [Generation per repeat]}. Every configuration first runs once unmeasured (first-call
    costs: allocator growth, lazy initialisation, caches of shapes), then ``repeats`` rounds each run every
    configuration once, the order rotated per round, so that no configuration always runs first or right
    after the same neighbour."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    names = list(compiled)
    kw = dict(max_new_tokens=max_new_tokens) | ({} if stop_tokens is None else {"stop_tokens": stop_tokens})
    for name in names:
        compiled[name].generate(prompts, **kw)
    runs: dict = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(compiled[name].generate(prompts, **kw))
    return runs


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _spread(xs: list[float], fmt: str) -> str:
    """``median`` and, with several runs, ``[min-max]``."""
    m = format(_median(xs), fmt)
    return m if len(xs) == 1 else f"{m} [{format(min(xs), fmt)}-{format(max(xs), fmt)}]"


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def cmd_demo(args) -> None:
    from tqdm import tqdm

    import skimfx
    from skimfx.eval import passkey_correct, passkey_prompts

    for r in args.recipe or []:
        skimfx.parse_recipe(r)                   # a bad recipe fails before any loading
    model, tok = skimfx.load_model(args.model)
    prompt = passkey_prompts(tok, args.prompt_tokens, depths=(0.5,), keys_per_depth=1, seed=args.seed)[0]
    quarter = len(prompt.ids) // 4
    recipes = ["dense"] + (args.recipe or [r.format(q=quarter) for r in DEMO_RECIPES])
    print(f"model {args.model}; prompt: {len(prompt.ids)} tokens of filler with a pass key ({prompt.key}) hidden "
          f"in the middle, then 'What is the pass key?'\n")
    compiled = {r: skimfx.compile(model, r, tokenizer=tok)
                for r in tqdm(recipes, desc="compile", unit="recipe", file=sys.stderr)}
    runs = measure(compiled, [prompt.ids], args.max_new_tokens, args.repeats)
    rows = [("recipe", "answer", "correct", "TTFT ms", "decode tok/s", "KV MiB", "KV read", "agreement")]
    dense_tokens = runs["dense"][0].tokens[0]
    for r, gs in runs.items():
        toks = gs[0].tokens[0]
        n = max(len(toks), len(dense_tokens))
        agree = sum(a == b for a, b in zip(toks, dense_tokens)) / n
        answer = tok.decode(toks, skip_special_tokens=True).strip().replace("\n", " ")
        s = gs[0].stats
        rows.append((r, answer[:40], "yes" if passkey_correct(tok, prompt, toks) else "no",
                     _spread([g.stats.ttft_s * 1e3 for g in gs], ".0f"),
                     _spread([g.stats.decode_tokens_per_s for g in gs], ".1f"), f"{s.kv_bytes / 2**20:.1f}",
                     f"{s.attended_fraction:.0%}", f"{agree:.0%}"))
    print(_table(rows))
    print(f"\ntimes: median [min-max] of {args.repeats} interleaved runs after one warm-up run per recipe")


def cmd_bench(args) -> None:
    """Dense and each recipe on the same prompts at each length: speed (warmed up, interleaved, median of
    repeats), memory, fidelity."""
    import skimfx
    from skimfx.eval import passkey_prompts
    from tqdm import tqdm

    lengths = [int(x) for x in args.lengths.split(",")]
    recipes = ["dense"] + (args.recipe or [])
    for r in recipes:
        skimfx.parse_recipe(r)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    model, tok = skimfx.load_model(args.model)
    compiled = {r: skimfx.compile(model, r, tokenizer=tok) for r in recipes}
    rows = [("tokens", "recipe", "TTFT s", "TTFT x", "decode tok/s", "decode x", "KV MiB", "KV read", "agreement")]
    for n in tqdm(lengths, desc="bench", unit="length", file=sys.stderr):
        depths = tuple((i + 1) / (args.batch + 1) for i in range(args.batch))
        prompts = [p.ids for p in passkey_prompts(tok, n, depths=depths, keys_per_depth=1, seed=args.seed)]
        runs = measure(compiled, prompts, args.max_new_tokens, args.repeats, stop_tokens=[])
        base = runs["dense"]
        ttft0 = _median([g.stats.ttft_s for g in base])
        tps0 = _median([g.stats.decode_tokens_per_s for g in base])
        for r, gs in runs.items():
            g = gs[0]
            s = g.stats
            agree = sum(sum(a == b for a, b in zip(x, y)) / len(y) for x, y in zip(g.tokens, base[0].tokens)) / len(prompts)
            ttft = [x.stats.ttft_s for x in gs]
            tps = [x.stats.decode_tokens_per_s for x in gs]
            rows.append((str(len(prompts[0])), r, _spread(ttft, ".3f"), f"{ttft0 / _median(ttft):.2f}",
                         _spread(tps, ".1f"), f"{_median(tps) / tps0:.2f}",
                         f"{s.kv_bytes / 2**20:.1f}", f"{s.attended_fraction:.0%}", f"{agree:.0%}"))
    print(_table(rows))
    print(f"\ntimes: median [min-max] of {args.repeats} interleaved runs after one warm-up run per recipe; "
          "x: ratio of medians to dense (> 1 is faster)")


def cmd_eval(args) -> None:
    import skimfx
    from skimfx.eval import TASKS, evaluate
    from skimfx.eval.run import METRIC

    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; valid tasks: {', '.join(TASKS)}")
    for r in args.recipe or []:
        skimfx.parse_recipe(r)
    model, tok = skimfx.load_model(args.model)
    rows = evaluate(model, tok, args.recipe or [], args.task, length=args.length, n_prompts=args.prompts,
                    out_dir=args.out)
    metric = METRIC.get(args.task, "accuracy")
    table = [("recipe", metric) + (("KL",) if args.task == "agreement" else ()) + ("TTFT s", "KV MiB")]
    for r in rows:
        table.append((r["recipe"], f"{r[metric]:.3f}") + ((f"{r['kl']:.3f}",) if args.task == "agreement" else ())
                     + (f"{r['ttft_s']:.2f}", f"{r['kv_prefill_mib']:.1f}"))
    print(_table(table))
    print(f"\nwrote {args.out}/eval_{args.task}.md, .json and .png")


def cmd_compress(args) -> None:
    """GemFilter's kept token ids of a prompt, as JSON, for an engine's ``prompt_token_ids``."""
    import json

    import skimfx

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give the prompt as --prompt TEXT or --prompt-file PATH (one of them)")
    text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
    from .integrations.compress import gemfilter_recipe

    gemfilter_recipe(args.recipe)                              # a bad recipe fails before any loading
    model, tok = skimfx.load_model(args.model)
    ids = _encode(tok, text, args.chat)
    kept = skimfx.compress_prompt(model, ids, args.recipe, tok, keep=args.keep, fraction=args.fraction)
    json.dump({"model": args.model, "recipe": args.recipe, "prompt_tokens": len(ids), "kept_tokens": len(kept),
               "prompt_token_ids": kept}, sys.stdout)
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="skimfx", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    from .models import EMBEDDED

    d = sub.add_parser("demo", help="dense and the recipes on one long prompt: answer, TTFT, tok/s, KV, agreement")
    d.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    d.add_argument("--prompt-tokens", type=int, default=1000)
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--recipe", action="append", help="recipe string (repeatable); default: a few at 25%% kept")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--repeats", type=int, default=3, help="timed runs per recipe after a warm-up (median reported)")
    d.set_defaults(fn=cmd_demo)

    g = sub.add_parser("generate", help="generate text with a compiled embedded model")
    g.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--recipe", default=None, help="e.g. promptdistill:layers=14,keep=256 (default: dense)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: when the tokenizer has one)")
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("show", help="print the Program before and after the passes")
    s.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    s.add_argument("--recipe", default=None)
    s.set_defaults(fn=cmd_show)

    b = sub.add_parser("bench", help="dense vs recipes at several prompt lengths: TTFT, decode tok/s, KV, agreement")
    b.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    b.add_argument("--lengths", default="1024,2048", help="comma-separated prompt lengths in tokens")
    b.add_argument("--recipe", action="append", help="recipe string (repeatable); dense is always the baseline")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--max-new-tokens", type=int, default=32)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--repeats", type=int, default=3, help="timed runs per recipe after a warm-up (median reported)")
    b.set_defaults(fn=cmd_bench)

    e = sub.add_parser("eval", help="score dense and recipes on a task; table + plot")
    e.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    e.add_argument("--task", required=True, help="passkey | multikey | vartrack | cwe | niah (essays) | "
                   "ruler_niah_single_1, ruler_vt, ... (RULER's generators) | perplexity (the Python license) | "
                   "perplexity_essays (Paul Graham's essays, --prompts windows; long contexts) | agreement")
    e.add_argument("--recipe", action="append", help="recipe string (repeatable); dense is always included")
    e.add_argument("--length", type=int, default=1000, help="prompt tokens")
    e.add_argument("--prompts", type=int, default=10)
    e.add_argument("--out", default="skimfx-eval")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compress", help="GemFilter's kept token ids of a prompt (JSON), to send to any engine")
    c.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    c.add_argument("--recipe", required=True, help="gemfilter:layer=14,keep=512 (granularity=sentence: whole sentences)")
    c.add_argument("--prompt", default=None)
    c.add_argument("--prompt-file", default=None)
    c.add_argument("--keep", type=int, default=None, help="tokens to keep (overrides the recipe's keep)")
    c.add_argument("--fraction", type=float, default=None, help="fraction of the prompt to keep, e.g. 0.25")
    c.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: when the tokenizer has one)")
    c.set_defaults(fn=cmd_compress)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"skimfx: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
