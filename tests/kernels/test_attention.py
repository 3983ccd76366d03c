"""Cached attention: Triton kernels (interpreted on CPU) and the torch reference against plain math."""
import math

import pytest
import torch

from skimfx.kernels import HAS_TRITON, attention_mask, attention_ref, attention_triton

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def naive(q, k, v, q_start, kv_len, scale, window=None, softcap=None):
    """Loop-free but literal: repeat k/v per query head, score, mask, softmax."""
    B, Hq, Tq, D = q.shape
    g = Hq // k.shape[1]
    kr, vr = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = q.float() @ kr.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~attention_mask(Tq, k.shape[2], q_start, kv_len, window), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ vr


def make(B, Hq, Hkv, Tq, past, D, dtype=torch.float32, ragged=False, extra=3):
    """Cache of past+Tq(+extra unused) slots; sequence b has past_b cached tokens before the queries."""
    S = past + Tq + extra
    q = torch.randn(B, Hq, Tq, D, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, dtype=dtype)
    if ragged:
        q_start = torch.tensor([past - (b * 5) % (past + 1) for b in range(B)]).clamp(min=0)
    else:
        q_start = torch.full((B,), past)
    return q, k, v, q_start, q_start + Tq


# (B, Hq, Hkv, Tq, past, D): odd lengths, non-powers of two, GQA groups 1/3/4, head dims 64/80/256
SHAPES = [
    (1, 4, 4, 1, 0, 64),
    (1, 9, 3, 7, 0, 64),
    (2, 9, 3, 33, 17, 64),
    (3, 8, 2, 50, 31, 80),
    (2, 4, 1, 19, 100, 256),
    (3, 12, 4, 1, 77, 64),
    (2, 6, 2, 1, 300, 48),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ragged", [False, True])
def test_reference_matches_naive(shape, ragged):
    B, Hq, Hkv, Tq, past, D = shape
    q, k, v, qs, kl = make(B, Hq, Hkv, Tq, past, D, ragged=ragged)
    scale = 1 / math.sqrt(D)
    torch.testing.assert_close(attention_ref(q, k, v, qs, kl, scale), naive(q, k, v, qs, kl, scale),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 20.0), (16, 30.0)])
def test_reference_window_softcap(window, softcap):
    q, k, v, qs, kl = make(2, 9, 3, 21, 40, 64, ragged=True)
    torch.testing.assert_close(attention_ref(q, k, v, qs, kl, 0.1, window, softcap),
                               naive(q, k, v, qs, kl, 0.1, window, softcap), atol=1e-5, rtol=1e-5)


def test_plain_causal_fast_path_equals_masked():
    q, k, v, qs, kl = make(2, 9, 3, 40, 0, 64, extra=0)
    fast = attention_ref(q, k, v, qs, kl, 0.125)          # is_causal path (S == Tq, start 0)
    torch.testing.assert_close(fast, naive(q, k, v, qs, kl, 0.125), atol=1e-5, rtol=1e-5)


TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ragged", [False, True])
def test_triton_matches_reference(shape, ragged):
    B, Hq, Hkv, Tq, past, D = shape
    q, k, v, qs, kl = make(B, Hq, Hkv, Tq, past, D, ragged=ragged)
    scale = 1 / math.sqrt(D)
    torch.testing.assert_close(attention_triton(q, k, v, qs, kl, scale), attention_ref(q, k, v, qs, kl, scale),
                               **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("Tq", [1, 23])
@pytest.mark.parametrize("window,softcap", [(7, None), (None, 25.0), (70, 50.0)])
def test_triton_window_softcap(Tq, window, softcap):
    q, k, v, qs, kl = make(2, 8, 2, Tq, 150, 64, ragged=True)
    torch.testing.assert_close(attention_triton(q, k, v, qs, kl, 0.125, window, softcap),
                               attention_ref(q, k, v, qs, kl, 0.125, window, softcap), **TOL[torch.float32])


# fp16 only: Triton's CPU interpreter stores bf16 as uint16 and its tl.dot multiplies those
# integers, so bf16 can only be checked where the kernels really run (CUDA).
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16])
@pytest.mark.parametrize("Tq", [1, 17])
def test_triton_half_precision(dtype, Tq):
    q, k, v, qs, kl = make(2, 9, 3, Tq, 45, 64, dtype=dtype)
    out = attention_triton(q, k, v, qs, kl, 0.125)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), attention_ref(q, k, v, qs, kl, 0.125).float(), **TOL[dtype])


@needs_triton
def test_triton_decode_many_splits():
    """A long cache splits the keys across programs; the combine step must merge them exactly."""
    q, k, v, qs, kl = make(1, 9, 3, 1, 2000, 64)
    torch.testing.assert_close(attention_triton(q, k, v, qs, kl, 0.125), attention_ref(q, k, v, qs, kl, 0.125),
                               **TOL[torch.float32])


def test_bad_shapes_are_rejected():
    q, k, v, qs, kl = make(1, 9, 3, 4, 0, 64)
    with pytest.raises(ValueError, match="Hq divisible"):
        attention_triton(q, k[:, :2], v[:, :2], qs, kl, 0.1)
    with pytest.raises(ValueError, match=r"\[B=1\]"):
        attention_triton(q, k, v, qs[None], kl, 0.1)
