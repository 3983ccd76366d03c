"""RMSNorm (+ residual add), gated activations and RoPE: Triton (interpreted) vs reference vs a
literal definition in plain torch, on awkward shapes and strided inputs."""
import importlib
import math

import pytest
import torch

from skimfx.kernels import _triton
from skimfx.kernels._triton import HAS_TRITON
from skimfx.kernels.activation import glu, glu_ref, glu_triton
from skimfx.kernels.norm import (add_rms_norm, add_rms_norm_ref, add_rms_norm_triton, rms_norm, rms_norm_ref,
                                 rms_norm_triton)
from skimfx.kernels.rope import rope, rope_ref, rope_triton

# the package re-exports functions named like their modules (``rope``), so modules come from importlib
norm_mod, act_mod, rope_mod = (importlib.import_module(f"skimfx.kernels.{m}") for m in ("norm", "activation", "rope"))
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.float16]
EPS = 1e-6

NORM_N = [1, 7, 64, 576, 640, 1000]
LEADS = [(1,), (3, 5), (2, 1, 13)]


def close(a, b, dtype):
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, **TOL[dtype])


# ---------------------------------------------------------------------------------------------- RMSNorm
def literal_rms_norm(x, w, eps, offset):
    xf = x.float()
    y = xf / torch.sqrt((xf ** 2).mean(-1, keepdim=True) + eps) * (w.float() + offset)
    return y.to(x.dtype)


def literal_add_rms_norm(x, r, w, eps, offset):
    h = (r.float() + x.float()).to(x.dtype)
    return h, literal_rms_norm(h, w, eps, offset)


def norm_inputs(lead, N, dtype, layout="contiguous", seed=0):
    """x, residual [*lead, N] and weight [N]; ``layout`` "transposed" makes x and residual transposed
    views (no single row stride: the kernel wrapper must copy), "sliced" makes them the first N columns
    of wider rows (one row stride, no copy), "strided" takes every other column (copy)."""
    g = torch.Generator().manual_seed(seed)

    def make():
        if layout == "transposed" and len(lead) >= 2:
            return torch.randn(lead[1], lead[0], *lead[2:], N, generator=g).to(dtype).transpose(0, 1)
        if layout == "sliced":
            return torch.randn(*lead, N + 5, generator=g).to(dtype)[..., :N]
        if layout == "strided":
            return torch.randn(*lead, 2 * N, generator=g).to(dtype)[..., ::2]
        return torch.randn(*lead, N, generator=g).to(dtype)

    x, r = make(), make()
    w = (1.0 + 0.5 * torch.randn(N, generator=g)).to(dtype)
    return x, r, w


@pytest.mark.parametrize("N", NORM_N)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_reference_matches_literal(N, lead, dtype, offset):
    x, r, w = norm_inputs(lead, N, dtype)
    x0, r0 = x.clone(), r.clone()
    close(rms_norm_ref(x, w, EPS, offset), literal_rms_norm(x, w, EPS, offset), dtype)
    h, y = add_rms_norm_ref(x, r, w, EPS, offset)
    lh, ly = literal_add_rms_norm(x, r, w, EPS, offset)
    assert torch.equal(h, lh)
    close(y, ly, dtype)
    assert torch.equal(x, x0) and torch.equal(r, r0)          # the in-place tricks never touch inputs


@needs_triton
@pytest.mark.parametrize("N", NORM_N)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_triton(N, lead, dtype):
    offset = float(N % 2)          # both the plain and Gemma's (1 + w) scale across the N values
    x, r, w = norm_inputs(lead, N, dtype)
    y = rms_norm_triton(x, w, EPS, offset)
    close(y, literal_rms_norm(x, w, EPS, offset), dtype)
    close(y, rms_norm_ref(x, w, EPS, offset), dtype)
    h, y = add_rms_norm_triton(x, r, w, EPS, offset)
    lh, ly = literal_add_rms_norm(x, r, w, EPS, offset)
    assert torch.equal(h, lh)
    close(y, ly, dtype)
    close(y, add_rms_norm_ref(x, r, w, EPS, offset)[1], dtype)


@needs_triton
@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_triton_strided_inputs(layout, dtype):
    x, r, w = norm_inputs((3, 5), 640, dtype, layout)
    assert not x.is_contiguous()
    for offset in (0.0, 1.0):
        y = rms_norm_triton(x, w, EPS, offset)
        assert y.is_contiguous()
        close(y, literal_rms_norm(x, w, EPS, offset), dtype)
    # residual in another layout than x, and a weight that is itself a strided view
    w2 = torch.stack([w, w], 1)[:, 0]
    h, y = add_rms_norm_triton(x, r.contiguous(), w2, EPS, 1.0)
    lh, ly = literal_add_rms_norm(x, r, w, EPS, 1.0)
    assert torch.equal(h, lh) and h.is_contiguous()
    close(y, ly, dtype)


@needs_triton
def test_rms_norm_triton_mixed_dtypes():
    """fp32 weight with half activations (HF keeps some norms in fp32), and an fp32 residual stream
    with an fp16 x: h comes back in x's dtype."""
    x, r, w = norm_inputs((2, 7), 576, torch.float16)
    w32, r32 = w.float(), r.float()
    close(rms_norm_triton(x, w32, EPS), literal_rms_norm(x, w32, EPS, 0.0), torch.float16)
    h, y = add_rms_norm_triton(x, r32, w32, EPS, 1.0)
    href, yref = add_rms_norm_ref(x, r32, w32, EPS, 1.0)
    assert torch.equal(h, href) and h.dtype == torch.float16
    close(y, yref, torch.float16)


def test_rms_norm_dispatch_and_errors():
    x, r, w = norm_inputs((2, 3), 64, torch.float32)
    assert torch.equal(rms_norm(x, w, EPS, 1.0), rms_norm_ref(x, w, EPS, 1.0))          # CPU: the reference
    for a, b in zip(add_rms_norm(x, r, w, EPS), add_rms_norm_ref(x, r, w, EPS)):
        assert torch.equal(a, b)
    for fn in (rms_norm_ref, rms_norm_triton):
        with pytest.raises(ValueError, match=r"weight must be \[N\]"):
            fn(x, torch.ones(63), EPS)
        with pytest.raises(ValueError, match=r"weight must be \[N\]"):
            fn(x, torch.ones(2, 64), EPS)
        with pytest.raises(ValueError, match="floating-point"):
            fn(torch.ones(2, 64, dtype=torch.long), w, EPS)
    for fn in (add_rms_norm_ref, add_rms_norm_triton):
        with pytest.raises(ValueError, match="residual must have x's shape"):
            fn(x, r[:1], w, EPS)
        with pytest.raises(ValueError, match="residual must be a floating-point"):
            fn(x, r.long(), w, EPS)
        with pytest.raises(ValueError, match=r"weight must be \[N\]"):
            fn(x, r, torch.ones(65), EPS)


# ---------------------------------------------------------------------------------------------- GLU
def literal_glu(gate, up, activation):
    g, u = gate.float(), up.float()
    if activation == "silu":
        a = g / (1.0 + torch.exp(-g))
    elif activation == "gelu_tanh":
        a = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    else:
        a = 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))
    return (a * u).to(gate.dtype)


def glu_inputs(lead, I, dtype, layout, seed=0):
    """gate, up [*lead, I]: "merged" = the two halves of one [*lead, 2I] tensor (HF's merged gate_up
    projection), "transposed" = transposed views, else contiguous."""
    g = torch.Generator().manual_seed(seed)
    if layout == "merged":
        gu = (2 * torch.randn(*lead, 2 * I, generator=g)).to(dtype)
        return gu[..., :I], gu[..., I:]
    if layout == "transposed" and len(lead) >= 2:
        shape = (lead[1], lead[0], *lead[2:], I)
        return ((2 * torch.randn(shape, generator=g)).to(dtype).transpose(0, 1),
                torch.randn(shape, generator=g).to(dtype).transpose(0, 1))
    return (2 * torch.randn(*lead, I, generator=g)).to(dtype), torch.randn(*lead, I, generator=g).to(dtype)


ACTS = ["silu", "gelu_tanh", "gelu"]
GLU_I = [1, 7, 64, 576, 640, 1000]


@pytest.mark.parametrize("I", GLU_I)
@pytest.mark.parametrize("layout", ["contiguous", "merged", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_glu_reference_matches_literal(I, layout, dtype, activation):
    gate, up = glu_inputs((3, 5), I, dtype, layout)
    g0, u0 = gate.clone(), up.clone()
    y = glu_ref(gate, up, activation)
    assert y.is_contiguous()
    close(y, literal_glu(gate, up, activation), dtype)
    assert torch.equal(gate, g0) and torch.equal(up, u0)


GLU_TRITON_CASES = [  # lead, I, layout
    ((1,), 1, "contiguous"), ((3, 5), 7, "merged"), ((2, 1, 13), 64, "contiguous"), ((1,), 576, "merged"),
    ((3, 5), 640, "transposed"), ((2, 1, 3), 1000, "merged"), ((1, 1), 1000, "contiguous"),
]


@needs_triton
@pytest.mark.parametrize("lead,I,layout", GLU_TRITON_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_glu_triton(lead, I, layout, dtype, activation):
    gate, up = glu_inputs(lead, I, dtype, layout)
    y = glu_triton(gate, up, activation)
    assert y.is_contiguous()
    close(y, literal_glu(gate, up, activation), dtype)
    close(y, glu_ref(gate, up, activation), dtype)


@needs_triton
def test_glu_triton_extreme_inputs():
    """Large |gate| saturates the sigmoids to exactly 0 and 1, without inf or nan on the way."""
    gate = torch.tensor([[-200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0]])
    up = torch.full_like(gate, 1.5)
    for a in ACTS:
        y = glu_triton(gate, up, a)
        assert torch.isfinite(y).all()
        close(y, literal_glu(gate, up, a), torch.float32)


def test_glu_dispatch_and_errors():
    gate, up = glu_inputs((2, 3), 16, torch.float32, "merged")
    assert torch.equal(glu(gate, up, "silu"), glu_ref(gate, up, "silu"))
    for fn in (glu_ref, glu_triton):
        with pytest.raises(ValueError, match="valid names are silu, gelu_tanh, gelu"):
            fn(gate, up, "relu")
        with pytest.raises(ValueError, match="one shape"):
            fn(gate, up[..., :15], "silu")
    with pytest.raises(ValueError, match="floating-point"):
        glu_triton(gate.long(), up.long(), "gelu")


# ---------------------------------------------------------------------------------------------- RoPE
def literal_rope(x, cos, sin):
    """HF's apply_rotary_pos_emb in fp32: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    xf, c, s = x.float(), cos.float()[:, None], sin.float()[:, None]
    rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * c + rot * s).to(x.dtype)


def rope_inputs(B, Hq, Hkv, T, D, cos_b, dtype, seed=0):
    """q as the transpose of a [B, T, Hq, D] projection (HF's layout), k as a slice of a wider cache
    row, cos/sin as angles of real positions (batch dim 1 or B)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, T + 3, D, generator=g).to(dtype)[:, :, 2:T + 2]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.arange(T).float()[None, :] + 5 * torch.arange(cos_b).float()[:, None]      # [cos_b, T]
    ang = torch.cat([pos[..., None] * inv] * 2, dim=-1)                                    # [cos_b, T, D]
    return q, k, ang.cos().to(dtype), ang.sin().to(dtype)


def test_rope_literal_is_the_per_element_rotation():
    B, H, T, D = 2, 3, 4, 6
    x, cos, sin = torch.randn(B, H, T, D), torch.randn(B, T, D), torch.randn(B, T, D)
    ref = torch.empty(B, H, T, D)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for i in range(D):
                    j, sign = (i + D // 2, -1.0) if i < D // 2 else (i - D // 2, 1.0)
                    ref[b, h, t, i] = x[b, h, t, i] * cos[b, t, i] + sign * x[b, h, t, j] * sin[b, t, i]
    torch.testing.assert_close(literal_rope(x, cos, sin), ref)
    torch.testing.assert_close(rope_ref(x, x, cos, sin)[0], ref)


ROPE_SHAPES = [  # B, Hq, Hkv, T, D, cos batch
    (1, 9, 3, 37, 64, 1), (2, 4, 4, 1, 8, 2), (3, 9, 3, 1, 256, 1), (2, 4, 4, 6, 256, 2), (2, 9, 3, 5, 8, 2),
    (1, 4, 4, 37, 8, 1), (2, 8, 1, 3, 64, 1),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,cos_b", ROPE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_reference_matches_literal(B, Hq, Hkv, T, D, cos_b, dtype):
    q, k, cos, sin = rope_inputs(B, Hq, Hkv, T, D, cos_b, dtype)
    q0, k0 = q.clone(), k.clone()
    qo, ko = rope_ref(q, k, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous()
    close(qo, literal_rope(q, cos, sin), dtype)
    close(ko, literal_rope(k, cos, sin), dtype)
    assert torch.equal(q, q0) and torch.equal(k, k0)


@needs_triton
@pytest.mark.parametrize("B,Hq,Hkv,T,D,cos_b", ROPE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_triton(B, Hq, Hkv, T, D, cos_b, dtype):
    q, k, cos, sin = rope_inputs(B, Hq, Hkv, T, D, cos_b, dtype)
    qo, ko = rope_triton(q, k, cos, sin)
    assert qo.shape == (B, Hq, T, D) and ko.shape == (B, Hkv, T, D)
    assert qo.is_contiguous() and ko.is_contiguous()
    close(qo, literal_rope(q, cos, sin), dtype)
    close(ko, literal_rope(k, cos, sin), dtype)
    rq, rk = rope_ref(q, k, cos, sin)
    close(qo, rq, dtype)
    close(ko, rk, dtype)


@needs_triton
def test_rope_triton_strided_everything():
    """Contiguous q, k with last-dim stride 2, and cos/sin as strided views (fp32 tables with fp16
    q/k, an expanded batch dim of stride 0)."""
    B, Hq, Hkv, T, D = 2, 4, 2, 5, 16
    q = torch.randn(B, Hq, T, D).half()
    k = torch.randn(B, Hkv, T, 2 * D).half()[..., ::2]
    cos = torch.randn(1, T, 2 * D)[..., 1::2].expand(B, T, D)
    sin = torch.randn(T, B, D).transpose(0, 1)
    qo, ko = rope_triton(q, k, cos, sin)
    close(qo, literal_rope(q, cos, sin), torch.float16)
    close(ko, literal_rope(k, cos, sin), torch.float16)


def test_rope_dispatch_and_errors():
    q, k, cos, sin = rope_inputs(2, 4, 2, 5, 8, 1, torch.float32)
    for a, b in zip(rope(q, k, cos, sin), rope_ref(q, k, cos, sin)):
        assert torch.equal(a, b)
    for fn in (rope_ref, rope_triton):
        with pytest.raises(ValueError, match="head dim must be even"):
            fn(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
        with pytest.raises(ValueError, match="does not fit"):
            fn(q, k[:, :, :4], cos, sin)                                      # T
        with pytest.raises(ValueError, match="does not fit"):
            fn(q, k[:1], cos, sin)                                            # B
        with pytest.raises(ValueError, match="does not fit"):
            fn(q, k[..., :6], cos, sin)                                       # D
        with pytest.raises(ValueError, match=r"must both be \[B=2 or 1, T=5, D=8\]"):
            fn(q, k, cos[:, :4], sin[:, :4])
        with pytest.raises(ValueError, match=r"must both be \[B=2 or 1"):
            fn(q, k, cos.expand(3, 5, 8), sin.expand(3, 5, 8))
        with pytest.raises(ValueError, match=r"must both be \[B=2 or 1"):
            fn(q, k, cos, sin[:, :, :6])
        with pytest.raises(ValueError, match=r"must be \[B, H, T, D\]"):
            fn(q[0], k[0], cos, sin)
        with pytest.raises(ValueError, match=r"must be \[B, H, T, D\]"):
            fn(q, k, cos[0], sin[0])
        with pytest.raises(ValueError, match="one floating-point dtype"):
            fn(q, k.half(), cos, sin)


# ---------------------------------------------------------------------------------------------- launch configs
def next_pow2(n):
    return 1 << max(n - 1, 0).bit_length()


@needs_triton
@pytest.mark.parametrize("name", ["norm", "activation", "rope"])
def test_autotune_configs(name, monkeypatch):
    """One config under the interpreter; on a GPU the whole filtered list, distinct configs, which the
    per-shape pruning never empties."""
    mod = {"norm": norm_mod, "activation": act_mod, "rope": rope_mod}[name]
    assert _triton.interpreting() and len(mod._configs()) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = mod._configs()
    assert len(configs) > 4 and len({(tuple(c.kwargs.items()), c.num_warps) for c in configs}) == len(configs)
    if mod is norm_mod:
        for N in (1, 576, 4096, 65536):
            kept = mod._prune(configs, {"N": N})
            assert len(kept) == 1 or all(c.kwargs["ROWS"] * next_pow2(N) <= mod._MAX_TILE for c in kept)
            assert kept
    elif mod is act_mod:
        for I in (1, 576, 14336):
            kept = mod._prune(configs, {"I": I})
            assert kept and all(c.kwargs["BLOCK_I"] <= max(256, next_pow2(I)) for c in kept)
    else:
        for hq, hkv, d in ((1, 1, 64), (9, 3, 64), (32, 8, 128), (8, 1, 512)):
            kept = mod._prune(configs, {"HQ": hq, "HKV": hkv, "D": d})
            assert kept and all(c.kwargs["BLOCK_H"] <= next_pow2(hq) for c in kept)
