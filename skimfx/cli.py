"""Command line: ``skimfx demo | generate | show``.

    skimfx demo                                    # SmolLM2-135M: skimfx vs HF on one prompt
    skimfx generate --model smollm2-135m --prompt "Why is the sky blue?"
    skimfx show --model gemma3-270m                # the Program before and after the passes
"""
from __future__ import annotations

import argparse
import sys
import time

DEMO_PROMPT = "Explain in three sentences what a KV cache is in a transformer and why it speeds up generation."


def _load(name: str):
    import skimfx

    t = time.perf_counter()
    model, tok = skimfx.load_model(name)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    cm = skimfx.compile(model, tokenizer=tok)
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
    _, tok, cm, load_s, compile_s = _load(args.model)
    ids = _encode(tok, args.prompt, args.chat)
    pieces: list[int] = []

    def stream(_b: int, t: int) -> None:
        pieces.append(t)
        text = tok.decode(pieces, skip_special_tokens=True)
        prev = tok.decode(pieces[:-1], skip_special_tokens=True)
        sys.stdout.write(text[len(prev):])
        sys.stdout.flush()

    g = cm.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, callback=stream)
    print()
    print(f"[{args.model}] load {load_s:.1f} s, compile {compile_s:.1f} s; {g.stats}; "
          f"{len(g.tokens[0])} new tokens, finish: {g.finish_reasons[0]}", file=sys.stderr)


def cmd_show(args) -> None:
    import skimfx
    from skimfx.passes import PassManager, default_passes

    model, _ = skimfx.load_model(args.model)
    program = skimfx.capture(model)
    print("== captured ==")
    print(program)
    program = PassManager(default_passes())(program)
    print("\n== after passes ==")
    print(program)


def cmd_demo(args) -> None:
    import torch

    model, tok, cm, load_s, compile_s = _load(args.model)
    ids = _encode(tok, args.prompt, None)
    print(f"model {args.model}: load {load_s:.1f} s, compile {compile_s:.1f} s, prompt {len(ids)} tokens\n")
    g = cm.generate(ids, max_new_tokens=args.max_new_tokens)
    with torch.inference_mode():
        t = time.perf_counter()
        hf = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)
        hf_s = time.perf_counter() - t
    hf_tokens = hf[0, len(ids):].tolist()
    agree = sum(a == b for a, b in zip(g.tokens[0], hf_tokens)) / max(1, len(hf_tokens))
    print("answer:", tok.decode(g.tokens[0], skip_special_tokens=True).strip(), "\n")
    s = g.stats
    total = s.ttft_s + s.decode_s
    rows = [("run", "TTFT ms", "decode tok/s", "KV MiB", "total s", "agreement with HF"),
            ("HF dense", "", "", "", f"{hf_s:.2f}", "-"),
            ("skimfx dense", f"{s.ttft_s * 1e3:.0f}", f"{s.decode_tokens_per_s:.1f}", f"{s.kv_bytes / 2**20:.1f}",
             f"{total:.2f}", f"{agree:.0%}")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="skimfx", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    from .models import EMBEDDED

    d = sub.add_parser("demo", help="run skimfx and HF on the embedded model and compare")
    d.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(fn=cmd_demo)

    g = sub.add_parser("generate", help="generate text with a compiled embedded model")
    g.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: when the tokenizer has one)")
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("show", help="print the Program before and after the passes")
    s.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    s.set_defaults(fn=cmd_show)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"skimfx: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
