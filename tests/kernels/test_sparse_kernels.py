"""Sparse decode attention, Quest page metadata/scores and KV compaction: Triton (interpreted) vs
reference vs a literal per-element computation, on awkward shapes."""
import pytest
import torch

from skimfx.kernels import (HAS_TRITON, attention_ref, gather_kv_ref, gather_kv_triton, page_minmax_ref,
                            page_minmax_triton, page_scores_ref, page_scores_triton, sparse_attention_queries,
                            sparse_attention_queries_ref, sparse_attention_ref, sparse_attention_triton)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make_index(B, Hkv, S, K, kv_len, shared, pad, seed=0):
    """Distinct slots per row (random subset of each sequence's valid slots), then ``pad`` entries of -1
    or out-of-range slots to check that padding reads nothing."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        heads = []
        for _ in range(1 if shared else Hkv):
            n = min(K, int(kv_len[b]))
            r = torch.randperm(int(kv_len[b]), generator=g)[:n]
            fill = torch.tensor([-1, S + 5, int(kv_len[b])] * K)[:K + pad - n]
            heads.append(torch.cat([r, fill]))
        rows.append(torch.stack(heads))
    idx = torch.stack(rows)
    return idx[:, 0] if shared else idx


def literal_sparse(q, k, v, index, kv_len, scale, softcap=None):
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D)
    for b in range(B):
        for h in range(Hq):
            row = index[b] if index.dim() == 2 else index[b, h // G]
            slots = [int(j) for j in row if 0 <= j < kv_len[b]]
            if not slots:
                continue
            s = torch.stack([scale * q[b, h].float() @ k[b, h // G, j].float() for j in slots])
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            p = torch.softmax(s, 0)
            out[b, h] = sum(pj * v[b, h // G, j].float() for pj, j in zip(p, slots))
    return out


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_sparse_reference_matches_literal(shared, softcap):
    B, Hq, Hkv, S, D, K = 3, 6, 2, 37, 8, 11
    q, k, v = torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kv_len = torch.tensor([37, 20, 5])
    idx = make_index(B, Hkv, S, K, kv_len, shared, pad=3)
    torch.testing.assert_close(sparse_attention_ref(q, k, v, idx, kv_len, 0.3, softcap),
                               literal_sparse(q, k, v, idx, kv_len, 0.3, softcap), atol=1e-5, rtol=1e-5)


def test_sparse_with_every_slot_equals_dense_attention():
    B, Hq, Hkv, S, D = 2, 9, 3, 50, 64
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kv_len = torch.tensor([50, 31])
    idx = torch.arange(S)[None, None].expand(B, Hkv, S).flip(-1).contiguous()     # order must not matter
    dense = attention_ref(q, k, v, kv_len - 1, kv_len, 0.125)[:, :, 0]
    torch.testing.assert_close(sparse_attention_ref(q[:, :, 0], k, v, idx, kv_len, 0.125), dense,
                               atol=1e-5, rtol=1e-5)


SPARSE_SHAPES = [  # B, Hq, Hkv, S, D, K
    (1, 9, 3, 300, 64, 77), (2, 8, 8, 129, 48, 129), (3, 4, 1, 1000, 80, 300), (2, 16, 4, 70, 256, 33),
    (1, 12, 3, 5000, 64, 1100),
]


@needs_triton
@pytest.mark.parametrize("shape", SPARSE_SHAPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_triton_matches_reference(shape, shared, dtype):
    B, Hq, Hkv, S, D, K = shape
    torch.manual_seed(0)
    q = torch.randn(B, Hq, D).to(dtype)
    k, v = torch.randn(B, Hkv, S, D).to(dtype), torch.randn(B, Hkv, S, D).to(dtype)
    kv_len = torch.tensor([S - 7 * b for b in range(B)])
    idx = make_index(B, Hkv, S, K, kv_len, shared, pad=5)
    out = sparse_attention_triton(q, k, v, idx, kv_len, D ** -0.5, None)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v, idx, kv_len, D ** -0.5, None), **TOL[dtype])


@needs_triton
def test_sparse_triton_softcap_and_int32_index():
    B, Hq, Hkv, S, D, K = 2, 8, 2, 200, 64, 70
    q, k, v = torch.randn(B, Hq, D) * 3, torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kv_len = torch.tensor([200, 123])
    idx = make_index(B, Hkv, S, K, kv_len, False, pad=0).to(torch.int32)
    torch.testing.assert_close(sparse_attention_triton(q, k, v, idx, kv_len, 0.125, 5.0),
                               sparse_attention_ref(q, k, v, idx, kv_len, 0.125, 5.0), **TOL[torch.float32])


def test_sparse_rejects_bad_shapes():
    q, k = torch.randn(2, 6, 8), torch.randn(2, 4, 10, 8)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_attention_ref(q, k, k, torch.zeros(2, 4, 3, dtype=torch.long), torch.tensor([10, 10]), 1.0)
    k = torch.randn(2, 2, 10, 8)
    with pytest.raises(ValueError, match="index must be"):
        sparse_attention_ref(q, k, k, torch.zeros(2, 3, 3, dtype=torch.long), torch.tensor([10, 10]), 1.0)
    with pytest.raises(ValueError, match="integer"):
        sparse_attention_ref(q, k, k, torch.zeros(2, 3), torch.tensor([10, 10]), 1.0)


# ---------------------------------------------------------------------------------------------- Quest
def literal_pages(k, kv_len, ps):
    B, H, S, D = k.shape
    P = -(-S // ps)
    kmin, kmax = torch.zeros(B, H, P, D), torch.zeros(B, H, P, D)
    for b in range(B):
        for p in range(P):
            slots = [j for j in range(p * ps, min(S, (p + 1) * ps)) if j < kv_len[b]]
            if slots:
                kmin[b, :, p] = k[b, :, slots].float().amin(1)
                kmax[b, :, p] = k[b, :, slots].float().amax(1)
    return kmin, kmax


@pytest.mark.parametrize("ps", [1, 5, 16])
def test_page_minmax_reference_matches_literal(ps):
    k = torch.randn(2, 3, 43, 8)
    kv_len = torch.tensor([43, 17])
    kmin, kmax = page_minmax_ref(k, kv_len, ps)
    lmin, lmax = literal_pages(k, kv_len, ps)
    torch.testing.assert_close(kmin, lmin)
    torch.testing.assert_close(kmax, lmax)
    # a page range equals the same slice of the full computation
    pmin, pmax = page_minmax_ref(k, kv_len, ps, 1, 3)
    torch.testing.assert_close(pmin, lmin[:, :, 1:3])
    torch.testing.assert_close(pmax, lmax[:, :, 1:3])


def test_page_score_bounds_every_key_of_the_page():
    """Quest's score is an upper bound of q·k for every key in the page (max over the group)."""
    B, Hq, Hkv, S, D, ps = 2, 6, 2, 64, 16, 16
    q, k = torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D)
    kv_len = torch.tensor([64, 40])
    kmin, kmax = page_minmax_ref(k, kv_len, ps)
    sc = page_scores_ref(q, kmin, kmax, kv_len, ps)
    qk = torch.einsum("bkgd,bksd->bkgs", q.view(B, Hkv, 3, D), k).amax(2)        # [B, Hkv, S]
    for b in range(B):
        for p in range(-(-int(kv_len[b]) // ps)):
            hi = min(int(kv_len[b]), (p + 1) * ps)
            assert (qk[b, :, p * ps:hi].amax(-1) <= sc[b, :, p] + 1e-5).all()
    assert torch.isinf(sc[1, :, 3]).all() and (sc[1, :, 3] < 0).all()           # page past kv_len


def literal_page_scores(q, kmin, kmax, kv_len, ps):
    """Quest's bound as written: sum_d max(q_d kmin_d, q_d kmax_d), max over the GQA group."""
    B, Hq, D = q.shape
    Hkv, P = kmin.shape[1], kmin.shape[2]
    qg = q.view(B, Hkv, Hq // Hkv, 1, D)
    s = torch.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None]).sum(-1).amax(2)
    n_pages = (kv_len + ps - 1) // ps
    return s.masked_fill(torch.arange(P)[None, None] >= n_pages[:, None, None], float("-inf"))


def test_page_scores_reference_matches_literal_for_one_and_many_queries():
    """The reference's two matmuls (relu(q)·kmax + min(q, 0)·kmin) are the bound's sum; T queries per
    sequence (each with its own cache length) score as T single-query calls."""
    B, Hq, Hkv, P, D, ps, T = 2, 6, 2, 9, 16, 4, 5
    kmin = torch.randn(B, Hkv, P, D)
    kmax = kmin + torch.rand(B, Hkv, P, D)
    q = torch.randn(B, Hq, T, D)
    kv_len = torch.tensor([[30 + t for t in range(T)], [9 + 2 * t for t in range(T)]])
    many = page_scores_ref(q, kmin, kmax, kv_len, ps)
    assert many.shape == (B, Hkv, T, P)
    for t in range(T):
        one = page_scores_ref(q[:, :, t], kmin, kmax, kv_len[:, t], ps)
        torch.testing.assert_close(one, literal_page_scores(q[:, :, t], kmin, kmax, kv_len[:, t], ps),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(many[:, :, t], one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_sparse_attention_for_many_queries_equals_one_call_per_query(softcap):
    """T queries per sequence, each with its own slot set and cache length (a verification of drafts), give
    what T single-query reads give, padding entries and a query with no slot at all included."""
    B, Hq, Hkv, S, D, K, T = 3, 6, 2, 40, 8, 9, 4
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kv_len = torch.tensor([[37, 38, 39, 40], [20, 21, 21, 21], [5, 6, 7, 8]])
    index = torch.stack([make_index(B, Hkv, S, K, kv_len[:, t], False, pad=2, seed=t) for t in range(T)], dim=2)
    index[2, 1, 3] = -1                                                               # one (b, head, t) reads nothing
    got = sparse_attention_queries_ref(q, k, v, index, kv_len, 0.3, softcap)
    assert torch.equal(got, sparse_attention_queries(q, k, v, index, kv_len, 0.3, softcap))   # CPU: the reference
    for t in range(T):
        want = sparse_attention_ref(q[:, :, t], k, v, index[:, :, t], kv_len[:, t], 0.3, softcap)
        torch.testing.assert_close(got[:, :, t], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"kv_len \[B, T\]"):
        sparse_attention_queries_ref(q, k, v, index, kv_len[:, 0], 0.3)


@needs_triton
@pytest.mark.parametrize("B,H,S,D,ps,rng", [(1, 3, 300, 64, 16, None), (2, 2, 77, 48, 16, (1, 4)),
                                            (3, 1, 130, 80, 7, None), (2, 4, 33, 256, 16, (2, 3))])
def test_page_minmax_triton(B, H, S, D, ps, rng):
    k = torch.randn(B, H, S, D)
    kv_len = torch.tensor([S - 11 * b for b in range(B)])
    args = (ps,) + (tuple(rng) if rng else ())
    for a, r in zip(page_minmax_triton(k, kv_len, *args), page_minmax_ref(k, kv_len, *args)):
        torch.testing.assert_close(a, r)


@needs_triton
@pytest.mark.parametrize("B,Hq,Hkv,P,D,ps", [(1, 9, 3, 19, 64, 16), (2, 8, 8, 40, 48, 16), (3, 4, 1, 70, 256, 5)])
def test_page_scores_triton(B, Hq, Hkv, P, D, ps):
    q = torch.randn(B, Hq, D)
    kmin = torch.randn(B, Hkv, P, D)
    kmax = kmin + torch.rand(B, Hkv, P, D)
    kv_len = torch.tensor([P * ps - 3 - 9 * b for b in range(B)])
    torch.testing.assert_close(page_scores_triton(q, kmin, kmax, kv_len, ps),
                               page_scores_ref(q, kmin, kmax, kv_len, ps), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- compaction
def test_gather_kv_reference():
    src = torch.randn(2, 3, 10, 4)
    idx = torch.tensor([[[9, 0, 4], [1, 2, 3], [5, 5, 7]], [[0, 1, 2], [9, 8, 7], [3, 3, 3]]])
    out = gather_kv_ref(src, idx)
    for b in range(2):
        for h in range(3):
            for i in range(3):
                assert torch.equal(out[b, h, i], src[b, h, idx[b, h, i]])
    shared = gather_kv_ref(src, idx[:, 0])
    assert torch.equal(shared[:, 2], src[:, 2][torch.arange(2)[:, None], idx[:, 0]])


@needs_triton
@pytest.mark.parametrize("B,H,S,D,K,shared", [(1, 3, 300, 64, 77, False), (2, 8, 65, 48, 65, True),
                                              (3, 1, 1000, 256, 130, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_kv_triton(B, H, S, D, K, shared, dtype):
    src = torch.randn(B, H, S, D).to(dtype)
    idx = torch.randint(0, S, (B, K) if shared else (B, H, K))
    assert torch.equal(gather_kv_triton(src, idx), gather_kv_ref(src, idx))
    with pytest.raises(ValueError, match="index must be"):
        gather_kv_triton(src, torch.zeros(B + 1, K, dtype=torch.long))


def test_sparse_reference_reads_a_slice_of_a_larger_cache():
    """The runtime passes a length-slice of the cache buffer; rows must be addressed in the buffer."""
    B, Hq, Hkv, cap, S, D = 2, 6, 3, 40, 25, 8
    buf_k, buf_v = torch.randn(B, Hkv, cap, D), torch.randn(B, Hkv, cap, D)
    q = torch.randn(B, Hq, D)
    kv_len = torch.tensor([25, 19])
    idx = make_index(B, Hkv, S, 9, kv_len, False, pad=2)
    got = sparse_attention_ref(q, buf_k[:, :, :S], buf_v[:, :, :S], idx, kv_len, 0.3)
    want = literal_sparse(q, buf_k[:, :, :S].contiguous(), buf_v[:, :, :S].contiguous(), idx, kv_len, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
