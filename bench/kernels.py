"""Kernel microbenchmarks: every skimfx op over a shape sweep, its baselines in the same run.

For each op and shape: time, achieved GB/s and TFLOP/s from the bytes the op must move and the FLOPs
it must do (counted from the shapes, not measured), and the fraction of the device's roofline
(``max(bytes / peak_bandwidth, flops / peak_flops) / time``). Baselines: the torch reference, the
unfused eager op sequence the fuse pass replaces (RMSNorm, GLU, RoPE), torch SDPA for attention, and
flash-attn where it is importable.

Timing: on CUDA ``triton.testing.do_bench`` (median); on CPU pytest-benchmark (this file is also
its test module; the script runs pytest on itself and reads the JSON). Device peaks: a table for
known GPUs, otherwise measured here (a large copy and a large matmul).

    python bench/kernels.py                    # full sweep on this device -> bench/results/kernels_<device>.md
    python bench/kernels.py --check            # also check every Triton kernel against its reference
    python bench/kernels.py --quick --out /tmp/k   # tiny shapes (what the test suite runs)

``--check`` on CUDA compares Triton against the fp32 reference in fp16 and bf16; on CPU it needs
``TRITON_INTERPRET=1`` and uses the quick shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
ARGS_ENV = "SKIMFX_BENCH_KERNELS"

# Known peaks (dense, no sparsity): HBM bytes/s and 16-bit tensor-core FLOP/s.
GPU_PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12),
             "L40S": (0.864e12, 362e12), "A10": (0.6e12, 125e12), "4090": (1.0e12, 165e12)}


@dataclass
class Case:
    op: str
    shape: str
    bytes: float
    flops: float
    impls: dict[str, Callable[[], object]]
    check: tuple[Callable[[], object], Callable[[], object]] | None = None  # (triton, fp32 reference)
    key: str = field(init=False)

    def __post_init__(self):
        self.key = f"{self.op}[{self.shape}]"


def _flash_attn():
    try:
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
        return flash_attn_func, flash_attn_with_kvcache
    except Exception:
        return None


def cases(device: str, dtype: torch.dtype, quick: bool, gpu_shapes: bool | None = None,
          with_triton: bool | None = None) -> list[Case]:
    """The sweep: shapes of the embedded models (SmolLM2: hidden 576, 9/3 heads of 64) and, on a GPU,
    of an 8B Llama (hidden 4096, 32/8 heads of 128). ``gpu_shapes`` / ``with_triton`` (the Triton
    check of each case) default to what ``device`` can run."""
    from skimfx import kernels as K
    from skimfx.kernels.attention import attention_flops

    gpu = device == "cuda" if gpu_shapes is None else gpu_shapes
    e = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, generator=g)

    def f32(*ts):
        return [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in ts]

    tr = K.HAS_TRITON and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    tr = tr if with_triton is None else with_triton
    out: list[Case] = []

    # ---- RMSNorm / residual RMSNorm
    rows_n = [(4, 96)] if quick else ([(1, 576), (512, 576), (4096, 576)] if not gpu else
                                        [(1, 4096), (4096, 4096), (16384, 4096), (16384, 8192)])
    for rows, n in rows_n:
        x, res, w = r(rows, n), r(rows, n), r(n)

        def unfused(x=x, w=w):
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

        def unfused_add(x=x, res=res, w=w):
            h = res + x
            hf = h.float()
            return h, w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

        out.append(Case("rms_norm", f"{rows}x{n}", 2 * rows * n * e + n * e, 4 * rows * n,
                        {"skimfx": lambda x=x, w=w: K.rms_norm(x, w, 1e-6), "eager unfused": unfused},
                        (lambda x=x, w=w: K.rms_norm_triton(x, w, 1e-6),
                         lambda x=x, w=w: K.rms_norm_ref(*f32(x, w), 1e-6)) if tr else None))
        out.append(Case("add_rms_norm", f"{rows}x{n}", 4 * rows * n * e + n * e, 5 * rows * n,
                        {"skimfx": lambda x=x, res=res, w=w: K.add_rms_norm(x, res, w, 1e-6),
                         "eager unfused": unfused_add},
                        (lambda x=x, res=res, w=w: K.add_rms_norm_triton(x, res, w, 1e-6),
                         lambda x=x, res=res, w=w: K.add_rms_norm_ref(*f32(x, res, w), 1e-6)) if tr else None))

    # ---- SwiGLU on a merged gate/up projection (the fused graph's layout)
    rows_i = [(4, 80)] if quick else ([(1, 1536), (512, 1536), (4096, 1536)] if not gpu else
                                        [(1, 14336), (4096, 14336), (16384, 14336)])
    for rows, i in rows_i:
        gu = r(rows, 2 * i)
        gate, up = gu[:, :i], gu[:, i:]
        out.append(Case("glu(silu)", f"{rows}x{i}", 3 * rows * i * e, 6 * rows * i,
                        {"skimfx": lambda gate=gate, up=up: K.glu(gate, up, "silu"),
                         "eager unfused": lambda gate=gate, up=up: F.silu(gate) * up},
                        (lambda gate=gate, up=up: K.glu_triton(gate, up, "silu"),
                         lambda gate=gate, up=up: K.glu_ref(*f32(gate, up), "silu")) if tr else None))

    # ---- linear: decode-shaped GEMMs (a few rows times every weight), the CPU path of kernels.linear
    mats = [(96, 80)] if quick else ([(3072, 576), (576, 1536)] if not gpu else [(28672, 4096), (4096, 14336)])
    ms = [1, 4] if quick else [1, 2, 4, 16, 512]
    for n_out, k_in in mats:
        w = r(n_out, k_in)
        for m in ms:
            x = r(m, k_in)
            out.append(Case("linear", f"{m}x{k_in}->{n_out}", (n_out * k_in + m * (k_in + n_out)) * e,
                            2 * m * n_out * k_in,
                            {"skimfx": lambda x=x, w=w: K.linear(x, w), "torch F.linear": lambda x=x, w=w: F.linear(x, w)}))

    # ---- RoPE of q and k (q, k as the transposed views the projections give)
    heads = [(9, 3, 64)] if not gpu else [(32, 8, 128)]
    lens = [5] if quick else ([1, 512, 4096] if not gpu else [1, 4096, 16384])
    for hq, hkv, d in heads[:1] if quick else heads:
        d = 16 if quick else d
        for t in lens:
            q = r(1, t, hq, d).transpose(1, 2)
            k = r(1, t, hkv, d).transpose(1, 2)
            cos, sin = r(1, t, d), r(1, t, d)

            def unfused_rope(q=q, k=k, cos=cos, sin=sin):
                c, s = cos.unsqueeze(1), sin.unsqueeze(1)

                def rot(x):
                    h = x.shape[-1] // 2
                    return torch.cat((-x[..., h:], x[..., :h]), -1)
                return q * c + rot(q) * s, k * c + rot(k) * s

            out.append(Case("rope(q,k)", f"T={t},{hq}/{hkv}x{d}", 2 * (hq + hkv) * t * d * e + 2 * t * d * e,
                            3 * (hq + hkv) * t * d,
                            {"skimfx": lambda q=q, k=k, cos=cos, sin=sin: K.rope(q, k, cos, sin),
                             "eager unfused": unfused_rope},
                            (lambda q=q, k=k, cos=cos, sin=sin: K.rope_triton(q, k, cos, sin),
                             lambda q=q, k=k, cos=cos, sin=sin: K.rope_ref(*f32(q, k, cos, sin))) if tr else None))

    # ---- exit confidence: LM head + online softmax (SmolLM2: hidden 576, vocab 49152) vs full logits + softmax
    for rows, hdim, vocab in ([(2, 40, 700)] if quick else [(1, 576, 49152), (8, 576, 49152)]):
        h, wt = r(rows, hdim), r(vocab, hdim) / 8

        def logits_softmax(h=h, wt=wt):
            p = torch.softmax(F.linear(h, wt).float(), -1)
            return p.topk(2, dim=-1)

        out.append(Case("exit_confidence", f"N={rows},{hdim}x{vocab}", vocab * hdim * e + rows * hdim * e,
                        2 * rows * vocab * hdim,
                        {"skimfx": lambda h=h, wt=wt: K.exit_confidence(h, wt), "logits+softmax+topk": logits_softmax},
                        (lambda h=h, wt=wt: K.exit_confidence_triton(h, wt),
                         lambda h=h, wt=wt: K.exit_confidence_ref(*f32(h, wt))) if tr else None))

    fa = _flash_attn() if device == "cuda" else None
    attn_heads = [(6, 2, 16)] if quick else ([(9, 3, 64)] if not gpu else [(9, 3, 64), (32, 8, 128)])

    # ---- prefill attention (causal, GQA)
    for hq, hkv, d in attn_heads:
        for t in ([37] if quick else [512, 2048] if not gpu else [2048, 8192]):
            q, k, v = r(1, hq, t, d), r(1, hkv, t, d), r(1, hkv, t, d)
            zero, full = torch.zeros(1, dtype=torch.int32, device=device), torch.full((1,), t, device=device,
                                                                                      dtype=torch.int32)
            sc = d ** -0.5
            impls = {"skimfx": lambda q=q, k=k, v=v, zero=zero, full=full, sc=sc: K.attention(q, k, v, zero, full, sc),
                     "torch SDPA": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                       enable_gqa=True)}
            if fa:
                qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                impls["flash-attn"] = lambda qt=qt, kt=kt, vt=vt: fa[0](qt, kt, vt, causal=True)
            out.append(Case("attention prefill", f"T={t},{hq}/{hkv}x{d}", (2 * hq + 2 * hkv) * t * d * e,
                            attention_flops(t, t, hq, d), impls,
                            (lambda q=q, k=k, v=v, zero=zero, full=full, sc=sc: K.attention_triton(q, k, v, zero, full, sc),
                             lambda q=q, k=k, v=v, zero=zero, full=full, sc=sc: K.attention_ref(*f32(q, k, v), zero, full, sc))
                            if tr else None))

    # ---- decode attention: dense, and sparse over 25% of the cache (one index set per KV head)
    for hq, hkv, d in attn_heads:
        for b, s in ([(2, 70)] if quick else [(1, 4096), (4, 16384)] if not gpu else [(1, 32768), (16, 8192), (64, 8192)]):
            q1, k, v = r(b, hq, 1, d), r(b, hkv, s, d), r(b, hkv, s, d)
            pos = torch.full((b,), s - 1, device=device, dtype=torch.int32)
            kvl = torch.full((b,), s, device=device, dtype=torch.int32)
            sc = d ** -0.5
            impls = {"skimfx": lambda q1=q1, k=k, v=v, pos=pos, kvl=kvl, sc=sc: K.attention(q1, k, v, pos, kvl, sc),
                     "torch SDPA": lambda q1=q1, k=k, v=v: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)}
            if fa:
                qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q1, k, v))
                kvl32 = kvl.clone()
                impls["flash-attn"] = lambda qt=qt, kt=kt, vt=vt, kvl32=kvl32: fa[1](qt, kt, vt, cache_seqlens=kvl32)
            out.append(Case("attention decode", f"B={b},S={s},{hq}/{hkv}x{d}", 2 * b * hkv * s * d * e,
                            4 * b * hq * s * d, impls,
                            (lambda q1=q1, k=k, v=v, pos=pos, kvl=kvl, sc=sc: K.attention_triton(q1, k, v, pos, kvl, sc),
                             lambda q1=q1, k=k, v=v, pos=pos, kvl=kvl, sc=sc: K.attention_ref(*f32(q1, k, v), pos, kvl, sc))
                            if tr else None))
            n = s // 4
            idx = torch.stack([torch.stack([torch.randperm(s, device=device, generator=g)[:n].sort().values
                                            for _ in range(hkv)]) for _ in range(b)]).to(torch.int32)
            qs = q1[:, :, 0]
            out.append(Case("sparse decode 25%", f"B={b},S={s},{hq}/{hkv}x{d}", 2 * b * hkv * n * d * e + idx.numel() * 4,
                            4 * b * hq * n * d,
                            {"skimfx": lambda qs=qs, k=k, v=v, idx=idx, kvl=kvl, sc=sc: K.sparse_attention(qs, k, v, idx, kvl, sc),
                             "torch gather+SDPA": lambda qs=qs, k=k, v=v, idx=idx, kvl=kvl, sc=sc: K.sparse_attention_ref(
                                 qs, k, v, idx, kvl, sc)},
                            (lambda qs=qs, k=k, v=v, idx=idx, kvl=kvl, sc=sc: K.sparse_attention_triton(qs, k, v, idx, kvl, sc),
                             lambda qs=qs, k=k, v=v, idx=idx, kvl=kvl, sc=sc: K.sparse_attention_ref(*f32(qs, k, v), idx, kvl, sc))
                            if tr else None))
            out.append(Case("gather_kv 25%", f"B={b},S={s},{hkv}x{d}", 2 * b * hkv * n * d * e + idx.numel() * 4, 0,
                            {"skimfx": lambda k=k, idx=idx: K.gather_kv(k, idx),
                             "torch gather": lambda k=k, idx=idx: torch.gather(
                                 k, 2, idx.long()[..., None].expand(-1, -1, -1, k.shape[-1]))},
                            (lambda k=k, idx=idx: K.gather_kv_triton(k, idx), lambda k=k, idx=idx: K.gather_kv_ref(k, idx))
                            if tr else None))
            page = 16
            kmin, kmax = K.page_minmax_ref(k, kvl, page)
            pages = kmin.shape[2]
            out.append(Case("quest page_scores", f"B={b},S={s},{hq}/{hkv}x{d}", 2 * b * hkv * pages * d * 4,
                            4 * b * hq * pages * d,
                            {"skimfx": lambda qs=qs, kmin=kmin, kmax=kmax, kvl=kvl: K.page_scores(qs, kmin, kmax, kvl, page),
                             "torch reference": lambda qs=qs, kmin=kmin, kmax=kmax, kvl=kvl: K.page_scores_ref(
                                 qs, kmin, kmax, kvl, page)},
                            (lambda qs=qs, kmin=kmin, kmax=kmax, kvl=kvl: K.page_scores_triton(qs, kmin, kmax, kvl, page),
                             lambda qs=qs, kmin=kmin, kmax=kmax, kvl=kvl: K.page_scores_ref(qs.float(), kmin, kmax, kvl, page))
                            if tr else None))
            # SnapKV / PromptDistill scoring: a window of 32 queries against the whole prompt
            w = 4 if quick else 32
            qw = r(b, hq, w, d)
            qpos = torch.full((b,), s - w, device=device, dtype=torch.int32)
            kw = dict(softmax=True, heads="mean", pool="avg", pool_kernel=5)
            out.append(Case("token_scores", f"B={b},W={w},S={s},{hq}/{hkv}x{d}", b * hkv * s * d * e * 2,
                            2 * 2 * b * hq * w * s * d,
                            {"skimfx": lambda qw=qw, k=k, qpos=qpos, kvl=kvl, sc=sc: K.token_scores(qw, k, qpos, kvl, sc, **kw),
                             "torch reference": lambda qw=qw, k=k, qpos=qpos, kvl=kvl, sc=sc: K.token_scores_ref(
                                 qw, k, qpos, kvl, sc, **kw)},
                            (lambda qw=qw, k=k, qpos=qpos, kvl=kvl, sc=sc: K.token_scores_triton(qw, k, qpos, kvl, sc, **kw),
                             lambda qw=qw, k=k, qpos=qpos, kvl=kvl, sc=sc: K.token_scores_ref(*f32(qw, k), qpos, kvl, sc, **kw))
                            if tr else None))
    if device != "cuda":  # on CPU the skimfx path *is* the torch reference: drop the duplicate column
        for c in out:
            c.impls.pop("torch reference", None)
    return out


# ------------------------------------------------------------------------------------------ device peaks

def device_peaks(device: str, dtype: torch.dtype) -> tuple[str, float, float, str]:
    """(name, bytes/s, FLOP/s, where the numbers come from)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, (bw, fl) in GPU_PEAKS.items():
            if key in name:
                return name, bw, fl, "datasheet"
        from triton.testing import do_bench
        x = torch.empty(2 ** 28, device="cuda", dtype=torch.uint8)
        bw = 2 * x.numel() / (do_bench(lambda: x.clone()) * 1e-3)
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        fl = 2 * 8192 ** 3 / (do_bench(lambda: a @ a) * 1e-3)
        return name, bw, fl, "measured"
    x = torch.empty(2 ** 27, dtype=torch.uint8)
    y = torch.empty_like(x)
    a = torch.randn(1536, 1536)
    bws, fls = [], []
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        bws.append(2 * x.numel() / (time.perf_counter() - t))
        t = time.perf_counter()
        a @ a
        fls.append(2 * 1536 ** 3 / (time.perf_counter() - t))
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)", max(bws), max(fls), \
        "measured (copy, fp32 matmul)"


# ------------------------------------------------------------------------------------------ timing

def _options() -> dict:
    return json.loads(os.environ.get(ARGS_ENV, "{}"))


def _pytest_cases():
    opts = _options()
    if not opts:
        return []
    return [(c.key, name, fn) for c in cases("cpu", getattr(torch, opts["dtype"]), opts["quick"])
            for name, fn in c.impls.items()]


_PYTEST_CASES = _pytest_cases()


def pytest_generate_tests(metafunc):
    if "kernel_case" in metafunc.fixturenames:
        metafunc.parametrize("kernel_case", _PYTEST_CASES, ids=[f"{k}|{n}" for k, n, _ in _PYTEST_CASES])


def test_kernel(benchmark, kernel_case):
    key, name, fn = kernel_case
    benchmark.extra_info.update(case=key, impl=name)
    with torch.inference_mode():
        benchmark(fn)


def time_cpu(args) -> dict[tuple[str, str], float]:
    import pytest

    os.environ[ARGS_ENV] = json.dumps({"dtype": args.dtype, "quick": args.quick})
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        rc = pytest.main([__file__, "-q", "-p", "no:cacheprovider", f"--benchmark-json={report}",
                          "--benchmark-warmup=on", "--benchmark-disable-gc", "--benchmark-columns=median,rounds",
                          f"--benchmark-max-time={0.05 if args.quick else 0.5}",
                          f"--benchmark-min-rounds={2 if args.quick else 5}"])
        if rc != 0:
            raise SystemExit(f"pytest-benchmark run failed (exit {rc})")
        data = json.loads(report.read_text())
    return {(b["extra_info"]["case"], b["extra_info"]["impl"]): b["stats"]["median"] for b in data["benchmarks"]}


STARTED = time.perf_counter()


def _why(e: Exception) -> str:
    """An exception in one table cell: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def time_cuda(all_cases: list[Case], budget_s: float | None = None) -> dict[tuple[str, str], float | str]:
    """(case, impl) -> seconds, or the reason it has no time: an error (a kernel that fails to build on this
    Triton is reported in the table, and the sweep goes on) or the time budget (counted from the start of
    the script, checks included) running out."""
    from triton.testing import do_bench

    out = {}
    for c in all_cases:
        for name, fn in c.impls.items():
            if budget_s is not None and time.perf_counter() - STARTED > budget_s:
                out[(c.key, name)] = f"not timed: --time-budget {budget_s:.0f} s spent"
                continue
            try:
                out[(c.key, name)] = do_bench(fn, return_mode="median") * 1e-3
            except Exception as e:  # noqa: BLE001 - one failing impl must not lose the sweep
                out[(c.key, name)] = _why(e)
                print(f"{c.key} {name}: {out[(c.key, name)]}", file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------------------ correctness

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}   # max |err| / max(1, max |ref|)


def check(all_cases: list[Case], dtype: torch.dtype) -> list[dict]:
    rows = []
    for c in all_cases:
        if c.check is None:
            continue
        try:
            got, ref = c.check[0](), c.check[1]()
        except Exception as e:  # noqa: BLE001 - reported as a failed check, the others still run
            rows.append(dict(op=c.op, shape=c.shape, dtype=str(dtype).replace("torch.", ""), rel_err=float("nan"),
                             ok=False, error=_why(e)))
            print(f"check {c.key}: {rows[-1]['error']}", file=sys.stderr, flush=True)
            continue
        got = got if isinstance(got, tuple) else (got,)
        ref = ref if isinstance(ref, tuple) else (ref,)
        err = max((a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())
                  for a, b in zip(got, ref))
        rows.append(dict(op=c.op, shape=c.shape, dtype=str(dtype).replace("torch.", ""), rel_err=err,
                         ok=bool(err <= TOL[dtype])))
    return rows


# ------------------------------------------------------------------------------------------ targets

def targets(rows: list[dict]) -> list[str]:
    """The GPU targets, read off the measured rows: sparse decode >= 70% of HBM bandwidth, RMSNorm and
    SwiGLU >= 80%, prefill attention >= 400 TFLOP/s at head dim 128 (>= 0.8x SDPA at head dim 64)."""
    def best(op, impl="skimfx", shape_has=""):
        rs = [r for r in rows if r["op"] == op and r["impl"] == impl and shape_has in r["shape"]]
        return max(rs, key=lambda r: r["roofline"]) if rs else None

    out = []
    for op, need in (("sparse decode 25%", 0.70), ("rms_norm", 0.80), ("add_rms_norm", 0.80), ("glu(silu)", 0.80)):
        r = best(op)
        if r:
            out.append(f"{op}: best {100 * r['roofline']:.0f}% of roofline at {r['shape']} "
                       f"({'met' if r['roofline'] >= need else 'NOT met'}, target {100 * need:.0f}%)")
    r = best("attention prefill", shape_has="x128")
    if r:
        out.append(f"prefill attention, head dim 128: {r['tflops']:.0f} TFLOP/s at {r['shape']} "
                   f"({'met' if r['tflops'] >= 400 else 'NOT met'}, target 400)")
    for r in [r for r in rows if r["op"] == "attention prefill" and r["impl"] == "torch SDPA" and "x64" in r["shape"]]:
        ours = next((x for x in rows if x["op"] == r["op"] and x["shape"] == r["shape"] and x["impl"] == "skimfx"), None)
        if ours is None:
            continue
        ratio = r["us"] / ours["us"]
        out.append(f"prefill attention, head dim 64, {r['shape']}: {ratio:.2f}x SDPA's speed "
                   f"({'met' if ratio >= 0.8 else 'NOT met'}, target 0.8x)")
    return out


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="timing dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds")
    ap.add_argument("--check", action="store_true", help="check Triton vs reference (fp16 and bf16 on CUDA)")
    ap.add_argument("--ops", help="comma-separated op names to run (default: all), e.g. 'attention decode,sparse decode 25%%'")
    ap.add_argument("--check-dtypes", default="float16,bfloat16", help="CUDA: the dtypes --check runs in")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-budget", type=float, help="CUDA: time no new case once the script has run this many seconds")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def chosen(cs: list[Case]) -> list[Case]:
        if not args.ops:
            return cs
        ops = {o.strip() for o in args.ops.split(",")}
        unknown = ops - {c.op for c in cs}
        if unknown:
            ap.error(f"--ops: unknown {sorted(unknown)}; the ops are {sorted({c.op for c in cs})}")
        return [c for c in cs if c.op in ops]

    with torch.inference_mode():
        checks = []
        if args.check:
            for dt in ((getattr(torch, d) for d in args.check_dtypes.split(",")) if args.device == "cuda" else
                       (torch.float32,)):
                checks += check(chosen(cases(args.device, dt, args.quick or args.device != "cuda")), dt)
        all_cases = chosen(cases(args.device, dtype, args.quick))
        name, peak_bw, peak_fl, src = device_peaks(args.device, dtype)
    times = time_cuda(all_cases, args.time_budget) if args.device == "cuda" else time_cpu(args)

    rows, missing = [], []
    for c in all_cases:
        bound = max(c.bytes / peak_bw, c.flops / peak_fl)
        base = times.get((c.key, "skimfx"))
        base = base if isinstance(base, float) else None
        for impl in c.impls:
            t = times[(c.key, impl)]
            if not isinstance(t, float):
                missing.append(f"{c.key} {impl}: {t}")
                continue
            rows.append(dict(op=c.op, shape=c.shape, impl=impl, us=t * 1e6, gbps=c.bytes / t / 1e9,
                             tflops=c.flops / t / 1e12, roofline=bound / t, vs_skimfx=t / base if base else None))
    tag = "cuda" if args.device == "cuda" else "cpu"
    lines = [f"# Kernel microbenchmarks ({tag})", "",
             f"Device: {name}; dtype {args.dtype}; peaks {peak_bw / 1e9:.0f} GB/s, {peak_fl / 1e12:.2f} TFLOP/s "
             f"({src}). Timer: {'triton.testing.do_bench (median)' if tag == 'cuda' else 'pytest-benchmark (median)'}."
             f" Bytes and FLOPs are what each op must move / compute, counted from its shapes.", "",
             "| op | shape | impl | time (us) | GB/s | TFLOP/s | % of roofline | time / skimfx |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['us']:.1f} | {r['gbps']:.1f} | {r['tflops']:.3f} | "
                     f"{100 * r['roofline']:.1f} | {'-' if r['vs_skimfx'] is None else format(r['vs_skimfx'], '.2f')} |")
    if missing:
        lines += ["", "Not timed:", ""] + [f"- {m}" for m in missing]
    if tag == "cuda":
        lines += ["", "Targets (H100-class):", ""] + [f"- {t}" for t in targets(rows)]
    if checks:
        lines += ["", "Triton vs fp32 reference (max |err| / max(1, max |ref|)):", "",
                  "| op | shape | dtype | rel. error | ok |", "|---|---|---|---:|---|"]
        lines += [f"| {c['op']} | {c['shape']} | {c['dtype']} | {c['rel_err']:.2e} | "
                  f"{'yes' if c['ok'] else 'NO' + (': ' + c['error'] if 'error' in c else '')} |" for c in checks]
    text = "\n".join(lines) + "\n"
    (out_dir / f"kernels_{tag}.md").write_text(text)
    (out_dir / f"kernels_{tag}.json").write_text(json.dumps(dict(device=name, dtype=args.dtype, peak_bw=peak_bw,
                                                                 peak_flops=peak_fl, rows=rows, checks=checks), indent=1))
    print(text)
    from _results import finish

    finish(f"kernels_{tag}", out_dir)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
