"""token_scores: Triton (interpreted) vs reference vs a literal per-element computation; top-k."""
import math

import pytest
import torch
import torch.nn.functional as F

from skimfx.kernels import HAS_TRITON, token_scores_ref, token_scores_triton
from skimfx.runtime.selection import topk_tokens

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def make(B, Hq, Hkv, W, S, D, ragged):
    q = torch.randn(B, Hq, W, D)
    k = torch.randn(B, Hkv, S, D)
    kv_len = torch.tensor([S - (3 * b if ragged else 0) for b in range(B)])
    return q, k, kv_len - W, kv_len           # the window is the last W tokens of each sequence


def literal(q, k, q_pos, kv_len, scale, softmax, heads, pool, kernel):
    """One sequence, one head, one query at a time."""
    B, Hq, W, D = q.shape
    S = k.shape[2]
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, S)
    for b in range(B):
        for h in range(Hq):
            for i in range(W):
                p = int(q_pos[b]) + i
                vis = [j for j in range(S) if j <= p and j < kv_len[b]]
                s = torch.stack([scale * q[b, h, i] @ k[b, h // G, j] for j in vis])
                w = torch.softmax(s, 0) if softmax else s
                for j, x in zip(vis, w):
                    out[b, h, j] += x
    r = {"sum": out.sum(1), "mean": out.mean(1), "max": out.amax(1), "none": out}[heads]
    if pool:
        rr = r.reshape(-1, 1, S)
        rr = F.avg_pool1d(rr, kernel, 1, kernel // 2) if pool == "avg" else rr
        r = rr.reshape(r.shape)
    valid = torch.arange(S)[None] < kv_len[:, None]
    return r.masked_fill(~(valid if heads != "none" else valid[:, None]), float("-inf"))


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("heads", ["sum", "mean", "max", "none"])
def test_reference_matches_literal(softmax, heads):
    q, k, qp, kl = make(2, 6, 2, 3, 23, 8, ragged=True)
    pool = "avg" if heads != "max" else None
    torch.testing.assert_close(token_scores_ref(q, k, qp, kl, 0.3, softmax=softmax, heads=heads, pool=pool),
                               literal(q, k, qp, kl, 0.3, softmax, heads, pool, 5), atol=1e-5, rtol=1e-5)


SHAPES = [(1, 9, 3, 1, 100, 64), (2, 9, 3, 8, 257, 64), (3, 4, 1, 32, 300, 256), (2, 8, 8, 5, 77, 48),
          (2, 12, 3, 17, 129, 64)]


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("softmax,heads,pool", [(False, "sum", "avg"), (False, "mean", None), (True, "sum", "avg"),
                                                (True, "max", "max"), (True, "none", "avg"), (False, "none", "max")])
def test_triton_matches_reference(shape, softmax, heads, pool):
    B, Hq, Hkv, W, S, D = shape
    q, k, qp, kl = make(B, Hq, Hkv, W, S, D, ragged=B > 1)
    scale = 1 / math.sqrt(D)
    got = token_scores_triton(q, k, qp, kl, scale, softmax=softmax, heads=heads, pool=pool)
    ref = token_scores_ref(q, k, qp, kl, scale, softmax=softmax, heads=heads, pool=pool)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=2e-4, rtol=2e-4)


def test_topk_keeps_last_tokens_sorted_and_ragged():
    scores = torch.tensor([[9.0, 1, 8, 2, 7, 3, 0, 0], [1.0, 9, 2, 8, 0, 0, 0, 0]])
    idx, kept = topk_tokens(scores, keep=4, lengths=[8, 5], keep_last=2)
    assert kept == [4, 4]
    assert idx[0].tolist() == [0, 2, 6, 7]           # two best (9, 8) + the last two
    assert idx[1].tolist() == [1, 2, 3, 4]           # 9, 8 + last two of a length-5 sequence (3, 4)
    idx, kept = topk_tokens(scores, keep=6, lengths=[8, 3], keep_last=1)
    assert kept == [6, 3] and idx[1].tolist() == [0, 1, 2, 2, 2, 2]   # short row padded with its last index
    with pytest.raises(ValueError, match="keep must be >= 1"):
        topk_tokens(scores, keep=0, lengths=[8, 5])


def test_bad_arguments():
    q, k, qp, kl = make(1, 4, 2, 2, 10, 8, ragged=False)
    with pytest.raises(ValueError, match="heads must be one of"):
        token_scores_ref(q, k, qp, kl, 1.0, heads="median")
    with pytest.raises(ValueError, match="pool_kernel must be odd"):
        token_scores_ref(q, k, qp, kl, 1.0, pool="avg", pool_kernel=4)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decode_attention_scores_is_attention_and_scores_in_one_pass(softcap):
    """DELTA's select layers: the output equals cached decode attention, the probabilities equal
    token_scores(softmax, heads="sum") (0 instead of -inf past each sequence's keys)."""
    from skimfx.kernels import attention_ref, decode_attention_scores, decode_attention_scores_ref

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, D = 3, 9, 3, 70, 16
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    kv_len = torch.tensor([70, 41, 1])
    out, p = decode_attention_scores_ref(q, k, v, kv_len, 0.25, softcap)
    torch.testing.assert_close(out, attention_ref(q, k, v, kv_len - 1, kv_len, 0.25, None, softcap))
    assert p.shape == (B, S) and bool((p[1, 41:] == 0).all()) and bool((p[2, 1:] == 0).all())
    torch.testing.assert_close(p.sum(-1), torch.full((B,), float(Hq)))               # each head's softmax sums to 1
    if softcap is None:
        ref = token_scores_ref(q, k, kv_len - 1, kv_len, 0.25, softmax=True, heads="sum")
        torch.testing.assert_close(p, ref.clamp(min=0.0))
    got = decode_attention_scores(q, k, v, kv_len, 0.25, softcap)                    # the dispatcher on CPU
    assert torch.equal(got[0], out) and torch.equal(got[1], p)


@needs_triton
def test_decode_attention_scores_triton_matches_reference():
    from skimfx.kernels.token_scores import decode_attention_scores_ref, decode_attention_scores_triton

    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, S, D = 2, 9, 3, 133, 64
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    kv_len = torch.tensor([133, 60])
    out, p = decode_attention_scores_triton(q, k, v, kv_len, 0.125)
    ref_out, ref_p = decode_attention_scores_ref(q, k, v, kv_len, 0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(p, ref_p, atol=2e-4, rtol=2e-4)
