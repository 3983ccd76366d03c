"""skimfx dense vs HF dense on SmolLM2-135M-Instruct: TTFT and decode tokens/s, side by side.

Both run in this process on the same prompts, alternating, best of ``--repeats``. HF runs its own
``generate`` (SDPA attention, DynamicCache); its first-token time is taken from a streamer callback.
The generated tokens of the two are compared (greedy, so they must agree).

    python bench/e2e_dense.py                       # 512, 1k, 2k, 4k prompt tokens
    python bench/e2e_dense.py --lengths 512 --new-tokens 16

Writes bench/results/e2e_dense.md (+ .json) and prints the same table, then a profile of one skimfx
prefill saying which ops dominate.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import skimfx
from _results import finish

RESULTS = Path(__file__).parent / "results"

# Real prose for the prompt: the Python license text, which every CPython install ships.
def prompt_ids(tok, n: int) -> list[int]:
    import sysconfig

    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    text = lic.read_text(errors="ignore") if lic.exists() else "The quick brown fox jumps over the lazy dog. " * 200
    ids = tok(text).input_ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


class _FirstTokenTimer:
    """A generate streamer that records when the prompt arrives and when the first new token does."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(time.perf_counter())

    def end(self):
        self.calls.append(time.perf_counter())


def run_hf(model, ids: list[int] | torch.Tensor, new_tokens: int):
    """HF ``generate``: (TTFT s, decode tokens/s, new tokens of the first row); ``ids`` a token list or
    a [B, T] tensor on the model's device."""
    x = ids if torch.is_tensor(ids) else torch.tensor([ids])
    timer = _FirstTokenTimer()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=timer, pad_token_id=0)
        t_end = time.perf_counter()
    t_first = timer.calls[1]                     # calls[0] is the prompt itself
    ttft = t_first - t0
    decode_s = t_end - t_first
    return ttft, (new_tokens - 1) / decode_s, out[0, x.shape[1]:].tolist()


def run_skimfx(cm, ids: list[int], new_tokens: int):
    g = cm.generate(ids, max_new_tokens=new_tokens, stop_tokens=[])
    return g.stats.ttft_s, g.stats.decode_tokens_per_s, g.tokens[0], g.stats.kv_bytes


def profile_prefill(cm, ids: list[int]) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cm.generate(ids, max_new_tokens=1, stop_tokens=[])
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows)
    rows.sort(key=lambda r: -r[1])
    return [(k, t / total) for k, t in rows[:6]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok = skimfx.load_model("smollm2-135m")
    t = time.perf_counter()
    cm = skimfx.compile(model, tokenizer=tok)
    compile_s = time.perf_counter() - t
    run_skimfx(cm, prompt_ids(tok, 64), 4)        # warm both paths
    run_hf(model, prompt_ids(tok, 64), 4)

    rows = []
    for n in args.lengths:
        ids = prompt_ids(tok, n)
        best = {"hf": [float("inf"), 0.0], "skimfx": [float("inf"), 0.0]}
        for _ in range(args.repeats):
            ttft, tps, hf_tokens = run_hf(model, ids, args.new_tokens)
            best["hf"] = [min(best["hf"][0], ttft), max(best["hf"][1], tps)]
            ttft, tps, sk_tokens, kv = run_skimfx(cm, ids, args.new_tokens)
            best["skimfx"] = [min(best["skimfx"][0], ttft), max(best["skimfx"][1], tps)]
        agree = sum(a == b for a, b in zip(hf_tokens, sk_tokens)) / len(hf_tokens)
        row = dict(prompt_tokens=n, hf_ttft_s=best["hf"][0], skimfx_ttft_s=best["skimfx"][0],
                   ttft_ratio=best["hf"][0] / best["skimfx"][0],
                   hf_decode_tps=best["hf"][1], skimfx_decode_tps=best["skimfx"][1],
                   decode_ratio=best["skimfx"][1] / best["hf"][1], token_agreement=agree,
                   skimfx_kv_mib=kv / 2**20)
        rows.append(row)
        print(row, flush=True)

    prof = profile_prefill(cm, prompt_ids(tok, 2048))
    lines = [
        "# skimfx dense vs HF dense — SmolLM2-135M-Instruct (fp32)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Greedy, {args.new_tokens} new tokens, best of {args.repeats}, same process. "
        f"Compile (capture + passes): {compile_s:.1f} s.",
        "Speed ratios are skimfx / HF (TTFT ratio = HF TTFT / skimfx TTFT, so > 1 means skimfx is faster).",
        "",
        "| prompt tokens | HF TTFT (s) | skimfx TTFT (s) | TTFT ratio | HF decode tok/s | skimfx decode tok/s "
        "| decode ratio | tokens equal to HF | skimfx KV MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']} | {r['hf_ttft_s']:.3f} | {r['skimfx_ttft_s']:.3f} | {r['ttft_ratio']:.2f} "
                     f"| {r['hf_decode_tps']:.1f} | {r['skimfx_decode_tps']:.1f} | {r['decode_ratio']:.2f} "
                     f"| {r['token_agreement']:.0%} | {r['skimfx_kv_mib']:.1f} |")
    lines += ["", "Where skimfx's prefill time goes (2048-token prompt, self CPU time by op):", ""]
    lines += [f"- `{k}`: {f:.0%}" for k, f in prof]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "e2e_dense.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "e2e_dense.json").write_text(json.dumps(dict(rows=rows, profile=prof, compile_s=compile_s), indent=1))
    finish("e2e_dense")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
