"""Decode step time: skimfx eager (the interpreted Program) vs skimfx captured (one compiled step; a CUDA
graph on a GPU) vs HF eager vs HF static cache + torch.compile, in one process.

Two tables:
1. Host overhead: a 30-layer Llama with tiny dims (hidden 64, 4/2 heads, head dim 16, vocab 512,
   random weights): compute is ~0, so ms per step is what the runtime itself costs, batch 1 and 4.
2. SmolLM2-135M-Instruct (the embedded model; ``--random-weights`` for its architecture) at the given
   contexts and batch sizes, dense and the KV policies with a captured step (DELTA, Quest, SnapKV at 25%):
   ms per step, tokens/s, the ratio to dense in the same mode, and the teacher-forced top-1 agreement of
   each policy's captured step with dense over the same tokens (quality next to every speed number).

Timing: each configuration generates ``--new-tokens`` greedy tokens after a prompt, once to warm up (the
compile happens there and is reported apart), then ``--repeats`` times; the fastest run counts. ms per
step = decode time / decode steps (the prefill is excluded). HF: generate with N and with 2N new tokens;
the difference over N steps (prefill and the first token cancel).

    python bench/decode_step.py --quick                      # host-overhead table + SmolLM2 at 512 (CPU: ~10 min)
    python bench/decode_step.py                              # + 4k (CPU: ~30 min: each shape compiles once)
    python bench/decode_step.py --device cuda --dtype bfloat16 --contexts 512,4096,16384,32768 --batch 1,64

Writes bench/results/decode_step.md and .json (decode_step_cuda.* with ``--device cuda``).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch
import transformers as tf

import skimfx
from _results import load_model, save
from skimfx.eval import logit_agreement, teacher_forced_logits

POLICIES = {"dense": None, "DELTA 25%": "delta:budget=0.25", "Quest 25%": "quest:token_budget=0.25",
            "SnapKV 25%": "snapkv:budget=0.25"}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def skimfx_step_ms(cm, prompts, n, mode, repeats) -> tuple[float, float, list]:
    """(ms per decode step, warm-up seconds, the tokens) for ``cm.generate(..., decode=mode)``."""
    t0 = time.perf_counter()
    g = cm.generate(prompts, max_new_tokens=n, decode=mode, stop_tokens=[])
    warm = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        g = cm.generate(prompts, max_new_tokens=n, decode=mode, stop_tokens=[])
        best = min(best, g.stats.decode_s / max(1, n - 1))
    return best * 1e3, warm, g.tokens


def hf_step_ms(model, prompts, n, repeats, static: bool, device) -> tuple[float, float]:
    """(ms per decode step, warm-up seconds) of HF generate (equal-length prompts), dynamic cache or
    static cache + torch.compile of the forward."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"

    def run(k):
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        _sync(device)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    run(n), run(2 * n)
    warm = time.perf_counter() - t0
    best = min(run(2 * n) - run(n) for _ in range(repeats))
    return best / n * 1e3, warm


def _hf_static(model, ps, n, repeats, dev) -> float:
    with _compiled_hf(model) as m:
        return hf_step_ms(m, ps, n, repeats, True, dev)[0]


def tiny_llama(device, dtype):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def prompts_of(length, batch, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="contexts 512 only, 1 repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--no-hf-compile", action="store_true", help="skip HF static cache + torch.compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    captured = "graph" if torch.device(dev).type == "cuda" else "compiled"
    contexts = [512] if args.quick else [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    repeats = 1 if args.quick else args.repeats
    n = args.new_tokens
    rows, lines = [], []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines += [f"# Decode step: skimfx eager vs captured vs HF ({dev}, {args.dtype})", "",
              f"Commit {commit}, torch {torch.__version__}, {platform.machine()}, {args.threads} threads"
              + (f", {torch.cuda.get_device_name()}" if dev.startswith("cuda") else "")
              + f". Greedy {n} new tokens, fastest of {repeats}; ms per decode step (prefill excluded). skimfx "
              f"captured = decode='{captured}' (one torch.compile'd step{', replayed as a CUDA graph' if captured == 'graph' else ''}); "
              "its compile time is the warm-up column.", ""]

    # 1. host overhead
    model = tiny_llama(dev, dtype)
    cm = skimfx.compile(model)
    lines += ["## Host overhead: 30-layer Llama, hidden 64 (compute ~0)", "",
              "| batch | context | skimfx eager ms | skimfx captured ms | HF eager ms | HF static+compile ms | "
              "eager / captured | captured warm-up s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for B in sorted(set([1, 4] + batches)):
        ps = prompts_of(64, B, 512)
        e, _, te = skimfx_step_ms(cm, ps, n, "eager", repeats)
        c, warm, tc = skimfx_step_ms(cm, ps, n, captured, repeats)
        h, _ = hf_step_ms(model, ps, n, repeats, False, dev)
        hs = float("nan") if args.no_hf_compile else _hf_static(model, ps, n, repeats, dev)
        rows.append(dict(table="overhead", batch=B, context=64, eager_ms=e, captured_ms=c, hf_ms=h, hf_static_ms=hs,
                         warmup_s=warm, same_tokens=te == tc))
        lines.append(f"| {B} | 64 | {e:.2f} | {c:.2f} | {h:.2f} | {hs:.2f} | {e / c:.1f}x | {warm:.0f} |")
    lines.append("")

    # 2. SmolLM2-135M
    model, tok = load_model("smollm2-135m", args.random_weights, dev, dtype)
    vocab = model.config.vocab_size
    lines += ["## SmolLM2-135M" + (" (random weights)" if args.random_weights else ""), "",
              "| batch | context | recipe | skimfx eager ms | skimfx captured ms | captured tok/s | vs dense captured | "
              "HF eager ms | HF static+compile ms | captured vs HF eager | top-1 vs dense (forced) | warm-up s |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = [p.strip() for p in args.policies.split(",")]
    for B in batches:
        for T in contexts:
            ps = prompts_of(T, B, vocab)
            h, _ = hf_step_ms(model, ps, n, repeats, False, dev)
            hs = float("nan") if args.no_hf_compile else _hf_static(model, ps, n, repeats, dev)
            dense_c, ref_tokens, ref_logits = None, None, None
            for name in names:
                cm = skimfx.compile(model, POLICIES[name], tokenizer=tok)
                e, _, _ = skimfx_step_ms(cm, ps, n, "eager", repeats)
                c, warm, toks = skimfx_step_ms(cm, ps, n, captured, repeats)
                if name == "dense":
                    dense_c, ref_tokens = c, toks
                    ref_logits = teacher_forced_logits(cm.program, ps, ref_tokens)
                    top1 = 1.0
                else:
                    top1 = logit_agreement(ref_logits, teacher_forced_logits(cm.program, ps, ref_tokens))["top1"]
                rel = dense_c / c if dense_c else float("nan")
                rows.append(dict(table="smollm2", batch=B, context=T, recipe=name, eager_ms=e, captured_ms=c,
                                 tok_s=B * 1e3 / c, vs_dense=rel, hf_ms=h, hf_static_ms=hs, top1=top1, warmup_s=warm))
                lines.append(f"| {B} | {T} | {name} | {e:.1f} | {c:.1f} | {B * 1e3 / c:.1f} | {rel:.2f}x | {h:.1f} | "
                             f"{hs:.1f} | {h / c:.2f}x | {top1:.0%} | {warm:.0f} |")
    lines += ["", "top-1 (forced): the policy's eager step fed dense's tokens, its argmax against dense's at every step "
              "(the captured step gives the eager step's logits to fp32 rounding: tests/runtime/test_static_step.py)."]
    stem = "decode_step" + ("_cuda" if dev.startswith("cuda") else "")
    save(stem, lines, rows, args.out)


_HF_FORWARD: dict = {}


class _compiled_hf:
    """``with _compiled_hf(model) as m``: the HF model with its forward compiled (fullgraph, as HF documents
    for the static cache), compiled once per model; the eager forward is put back on exit."""

    def __init__(self, model):
        self.model = model
        if id(model) not in _HF_FORWARD:
            _HF_FORWARD[id(model)] = (model.forward, torch.compile(model.forward, fullgraph=True))

    def __enter__(self):
        self.model.forward = _HF_FORWARD[id(self.model)][1]
        return self.model

    def __exit__(self, *exc):
        self.model.forward = _HF_FORWARD[id(self.model)][0]


if __name__ == "__main__":
    main()
