"""Property-based checks of every kernel: the torch reference and the Triton kernel (interpreted on
CPU) against a plain torch computation written here, on random shapes, GQA groups, head dims,
position offsets, windows, soft-caps, padded index sets and dtypes; and, wherever a wrapper
validates its inputs, that a malformed input is rejected with a ValueError naming the op."""
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from skimfx.kernels import (HAS_TRITON, add_rms_norm_ref, add_rms_norm_triton, attention_ref, attention_triton,
                            decode_attention_scores_ref, exit_confidence_ref, exit_confidence_triton, gather_kv_ref,
                            gather_kv_triton, glu_ref, glu_triton, linear, page_minmax_ref, page_minmax_triton,
                            page_scores_ref, page_scores_triton, rms_norm_ref, rms_norm_triton, rope_ref,
                            rope_triton, sparse_attention_ref, sparse_attention_triton, token_scores_ref,
                            token_scores_triton)
from skimfx.kernels.token_scores import decode_attention_scores_triton

pytestmark = pytest.mark.slow          # hundreds of generated cases per kernel: the full lane only

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = [pytest.param("ref", id="ref"), pytest.param("triton", id="triton", marks=needs_triton)]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ALL_DTYPES = [F32, F16, BF16]
# Triton's CPU interpreter stores bf16 as uint16 and its tl.dot multiplies those integers, so the
# kernels built on tl.dot (attention, sparse attention, token scores, decode attention scores) are
# checked in bf16 only through their references; the kernels without tl.dot run bf16 under the
# interpreter too.
DOT_DTYPES = {"ref": ALL_DTYPES, "triton": [F32, F16]}
# head dims of the tl.dot kernels: powers of two, multiples of 8 that are not, and an odd one (the
# wrappers accept any D; the kernels pad it to a power of two >= 16 and mask the rest)
DOT_HEAD_DIMS = [16, 24, 33, 64, 80]

# Elementwise kernels (rms_norm, add_rms_norm, glu, rope; linear's rtol): fp32 math and at
# most two roundings to the output dtype (glu's reference rounds the activation before the product),
# each at most half an ulp: rtol is two such roundings with a factor 2 to spare. fp32: only the order
# of the fp32 operations differs from the fp64 computation here. atol covers fp16 subnormals.
ROUNDING_TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=2e-3, atol=1e-5),
                BF16: dict(rtol=1.6e-2, atol=1e-5)}
# Attention outputs (attention, sparse_attention, decode_attention_scores): fp32 scores over D <= 80
# and an fp32 convex combination of v rows (its error does not grow with the key count), then one
# rounding to the output dtype. The Triton kernels also round the softmax probabilities to v's dtype
# before P @ V, which adds up to one rounding of max|v| (randn values, |v| < ~4.5): 2^-11 * 4.5 ~
# 2.2e-3 in fp16. bf16 is checked on the references only (one rounding, 2^-8 relative).
ATTN_TOL = {F32: dict(rtol=2e-5, atol=2e-5), F16: dict(rtol=2e-3, atol=4e-3), BF16: dict(rtol=8e-3, atol=1e-3)}
# Token and page scores are fp32 outputs computed from inputs that fp32 holds exactly: only the fp32
# summation order differs (over D products, W window queries and Hq heads; values stay below ~300).
SCORE_TOL = dict(rtol=1e-4, atol=1e-4)
# Exit confidence: the reference rounds the logits to the input dtype (F.linear in that dtype) before
# the softmax, so a logit may be off by this fraction of the row's largest |logit|; a probability then
# moves by at most twice that (relative), and p <= 1.
LOGIT_ROUNDING = {F32: 1e-6, F16: 2.0 ** -11, BF16: 2.0 ** -8}


def prop_settings(n):
    # derandomized (the same examples on every run, no example database written into the tree); the
    # conftest's autouse seeding fixture is harmless here: every tensor comes from a drawn seed
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def close(got, want, dtype, tol):
    assert got.dtype == dtype, (got.dtype, dtype)
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    torch.testing.assert_close(got.double(), want.double(), **tol)


seeds = st.integers(0, 2 ** 32 - 1)
softcaps = st.one_of(st.none(), st.floats(1.0, 30.0))


def group_heads(draw):
    """(Hq, Hkv): Hq a multiple of Hkv (GQA groups 1..4, MQA when Hkv = 1)."""
    hkv = draw(st.integers(1, 3))
    return hkv * draw(st.sampled_from([1, 2, 3, 4])), hkv


# ============================================================================================ attention
def plain_attention(q, k, v, q_start, kv_len, scale, window=None, softcap=None):
    """Query t of sequence b sits at p = q_start[b] + t and reads keys j <= p, j < kv_len[b] and, with
    a window W, j > p - W; softmax(scale q.k, soft-capped) @ v in fp64 (0 for a query that sees no key)."""
    B, Hq, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    j = torch.arange(S)[None, :]
    for b in range(B):
        p = int(q_start[b]) + torch.arange(Tq)[:, None]
        seen = (j <= p) & (j < int(kv_len[b]))                                 # [Tq, S]
        if window is not None:
            seen &= j > p - window
        qq = q[b].double().view(Hkv, G, Tq, D)
        s = scale * qq @ k[b].double()[:, None].transpose(-1, -2)              # [Hkv, G, Tq, S]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        w = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
        out[b] = (w @ v[b].double()[:, None]).reshape(Hq, Tq, D)
    return out


@st.composite
def attention_cases(draw, dtypes):
    B = draw(st.integers(1, 3))
    Hq, Hkv = group_heads(draw)
    D = draw(st.sampled_from(DOT_HEAD_DIMS))
    return dict(
        B=B, Hq=Hq, Hkv=Hkv, D=D,
        # 1: the decode kernel; 60..80: several 64-query blocks of the prefill kernel
        Tq=draw(st.one_of(st.just(1), st.integers(1, 12), st.integers(60, 80))),
        # per-sequence position offsets; 250..330 puts more than one 256-key split in the decode kernel
        past=draw(st.lists(st.one_of(st.integers(0, 24), st.integers(250, 330)), min_size=B, max_size=B)),
        extra=draw(st.integers(0, 3)),                                  # unused cache slots at the end
        # k, v: a length-slice of a longer cache buffer (what the runtime passes), or transposed
        # [B, S, H, D] buffers
        kv_layout=draw(st.sampled_from(["contiguous", "cache", "bshd"])),
        window=draw(st.one_of(st.none(), st.integers(1, 10))),
        softcap=draw(softcaps),
        scale=draw(st.one_of(st.just(D ** -0.5), st.floats(0.05, 0.6))),
        q_bthd=draw(st.booleans()),                                     # q a transposed [B, T, H, D] view
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(seeds))


def kv_buffer(g, B, H, S, D, dtype, layout):
    if layout == "cache":
        return randn(g, B, H, S + 3, D, dtype=dtype)[:, :, :S]
    if layout == "bshd":
        return randn(g, B, S, H, D, dtype=dtype).transpose(1, 2)
    return randn(g, B, H, S, D, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(40)
@given(data=st.data())
def test_attention_matches_plain_softmax(impl, data):
    c = data.draw(attention_cases(DOT_DTYPES[impl]))
    g, dt = gen(c["seed"]), c["dtype"]
    B, Hq, Hkv, Tq, D = c["B"], c["Hq"], c["Hkv"], c["Tq"], c["D"]
    q_start = torch.tensor(c["past"])
    kv_len = q_start + Tq
    S = int(kv_len.max()) + c["extra"]
    q = randn(g, B, Tq, Hq, D, dtype=dt).transpose(1, 2) if c["q_bthd"] else randn(g, B, Hq, Tq, D, dtype=dt)
    k, v = (kv_buffer(g, B, Hkv, S, D, dt, c["kv_layout"]) for _ in range(2))
    fn = attention_ref if impl == "ref" else attention_triton
    got = fn(q, k, v, q_start, kv_len, c["scale"], c["window"], c["softcap"])
    close(got, plain_attention(q, k, v, q_start, kv_len, c["scale"], c["window"], c["softcap"]), dt, ATTN_TOL[dt])


@st.composite
def cache_ahead_cases(draw):
    B = draw(st.integers(1, 2))
    Hq, Hkv = group_heads(draw)
    return dict(B=B, Hq=Hq, Hkv=Hkv, D=draw(st.sampled_from([16, 33])),
                Tq=draw(st.one_of(st.just(1), st.integers(1, 8))),
                past=draw(st.lists(st.integers(0, 12), min_size=B, max_size=B)),
                ahead=draw(st.lists(st.integers(0, 4), min_size=B, max_size=B)),
                window=draw(st.one_of(st.none(), st.integers(1, 40))),
                softcap=draw(st.one_of(st.none(), st.just(20.0))),
                dtype=draw(st.sampled_from([F32, F16])), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(25)
@given(c=cache_ahead_cases())
# the smallest such input: one decode query at position 0 of a 2-key cache must read key 0 only
@example(c=dict(B=1, Hq=1, Hkv=1, D=16, Tq=1, past=[0], ahead=[1], window=None, softcap=None, dtype=F32, seed=0))
def test_attention_never_reads_keys_past_the_query(impl, c):
    """The cache may hold keys past the newest query (kv_len > q_start + Tq): the causal bound
    j <= q_start + t still applies (module docstring), whatever kv_len says."""
    g, dt = gen(c["seed"]), c["dtype"]
    B, Hq, Hkv, Tq, D = c["B"], c["Hq"], c["Hkv"], c["Tq"], c["D"]
    q_start = torch.tensor(c["past"])
    kv_len = q_start + Tq + torch.tensor(c["ahead"])
    S = int(kv_len.max())
    q, k, v = randn(g, B, Hq, Tq, D, dtype=dt), randn(g, B, Hkv, S, D, dtype=dt), randn(g, B, Hkv, S, D, dtype=dt)
    fn = attention_ref if impl == "ref" else attention_triton
    got = fn(q, k, v, q_start, kv_len, D ** -0.5, c["window"], c["softcap"])
    close(got, plain_attention(q, k, v, q_start, kv_len, D ** -0.5, c["window"], c["softcap"]), dt, ATTN_TOL[dt])


ATTENTION_DEFECTS = ["q_rank", "v_shape", "batch", "head_dim", "hq_not_multiple", "q_start_shape", "kv_len_shape"]


@prop_settings(20)
@given(defect=st.sampled_from(ATTENTION_DEFECTS), hkv=st.integers(2, 3), group=st.integers(1, 3),
       tq=st.integers(1, 4), D=st.sampled_from([16, 24]))
def test_attention_rejects_malformed_inputs(defect, hkv, group, tq, D):
    # attention_ref does not validate its inputs; the Triton wrapper does
    B, S = 2, 8
    q, k, v = torch.zeros(B, hkv * group, tq, D), torch.zeros(B, hkv, S, D), torch.zeros(B, hkv, S, D)
    qs, kl = torch.zeros(B, dtype=torch.long), torch.full((B,), tq)
    if defect == "q_rank":
        q = q[:, :, 0]
    elif defect == "v_shape":
        v = v[:, :, :-1]
    elif defect == "batch":
        k, v = k[:1], v[:1]
    elif defect == "head_dim":
        k, v = k[..., :-1], v[..., :-1]
    elif defect == "hq_not_multiple":
        q = torch.zeros(B, hkv * group + 1, tq, D)
    elif defect == "q_start_shape":
        qs = qs[:1]
    else:
        kl = kl[None]
    with pytest.raises(ValueError, match="attention: "):
        attention_triton(q, k, v, qs, kl, 0.1)


# ===================================================================================== sparse attention
def plain_sparse_attention(q, k, v, index, kv_len, scale, softcap=None):
    """Each query head attends exactly the listed slots of its KV head row; negative slots and slots
    >= kv_len[b] read nothing; a row with no slot at all gives 0."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for kvh in range(Hkv):
            row = index[b] if index.dim() == 2 else index[b, kvh]
            slots = [int(j) for j in row if 0 <= int(j) < int(kv_len[b])]
            if not slots:
                continue
            heads = slice(kvh * G, (kvh + 1) * G)
            s = scale * q[b, heads].double() @ k[b, kvh, slots].double().T     # [G, n]
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            out[b, heads] = torch.softmax(s, -1) @ v[b, kvh, slots].double()
    return out


def padded_index(g, rows_kv_len, K, n_pad, S, dtype):
    """One row per entry of ``rows_kv_len``: distinct valid slots (a random subset of [0, kv_len)),
    at least ``n_pad`` padding entries (negative, == kv_len, >= S), all in a random order."""
    rows = []
    for kv in rows_kv_len:
        n_valid = min(K - n_pad, kv)
        valid = torch.randperm(kv, generator=g)[:n_valid]
        pads = torch.tensor([-1, kv, S + 7, -3])
        pad = pads[torch.randint(0, len(pads), (K - n_valid,), generator=g)]
        row = torch.cat([valid, pad])
        rows.append(row[torch.randperm(K, generator=g)])
    return torch.stack(rows).to(dtype)


@st.composite
def sparse_cases(draw, dtypes):
    B = draw(st.integers(1, 3))
    Hq, Hkv = group_heads(draw)
    S = draw(st.one_of(st.integers(1, 40), st.integers(250, 300)))
    K = draw(st.one_of(st.integers(1, 24), st.integers(257, 300)))    # > 256: several index splits
    D = draw(st.sampled_from(DOT_HEAD_DIMS))
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, K=K, D=D,
                kv_len=draw(st.lists(st.integers(1, S), min_size=B, max_size=B)),
                n_pad=draw(st.integers(0, K)),                          # K: rows of padding only
                shared=draw(st.booleans()),                             # one [B, K] set for all KV heads
                index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                softcap=draw(softcaps),
                scale=draw(st.one_of(st.just(D ** -0.5), st.floats(0.05, 0.6))),
                dtype=draw(st.sampled_from(dtypes)),
                seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(data=st.data())
def test_sparse_attention_matches_plain_softmax_over_listed_slots(impl, data):
    c = data.draw(sparse_cases(DOT_DTYPES[impl]))
    g, dt = gen(c["seed"]), c["dtype"]
    B, Hq, Hkv, S, D, K = c["B"], c["Hq"], c["Hkv"], c["S"], c["D"], c["K"]
    q, k, v = randn(g, B, Hq, D, dtype=dt), randn(g, B, Hkv, S, D, dtype=dt), randn(g, B, Hkv, S, D, dtype=dt)
    kv_len = torch.tensor(c["kv_len"])
    if c["shared"]:
        index = padded_index(g, c["kv_len"], K, c["n_pad"], S, c["index_dtype"])
    else:
        index = padded_index(g, [n for n in c["kv_len"] for _ in range(Hkv)], K, c["n_pad"], S,
                             c["index_dtype"]).view(B, Hkv, K)
    fn = sparse_attention_ref if impl == "ref" else sparse_attention_triton
    got = fn(q, k, v, index, kv_len, c["scale"], c["softcap"])
    close(got, plain_sparse_attention(q, k, v, index, kv_len, c["scale"], c["softcap"]), dt, ATTN_TOL[dt])


SPARSE_DEFECTS = ["q_rank", "v_shape", "batch", "head_dim", "hq_not_multiple", "index_rank", "index_heads",
                  "index_batch", "index_float", "kv_len_shape"]


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(20)
@given(defect=st.sampled_from(SPARSE_DEFECTS), hkv=st.integers(2, 3), group=st.integers(1, 3), K=st.integers(1, 6))
def test_sparse_attention_rejects_malformed_inputs(impl, defect, hkv, group, K):
    B, S, D = 2, 8, 16
    q, k, v = torch.zeros(B, hkv * group, D), torch.zeros(B, hkv, S, D), torch.zeros(B, hkv, S, D)
    index, kv_len = torch.zeros(B, hkv, K, dtype=torch.long), torch.full((B,), S)
    if defect == "q_rank":
        q = q[:, :, None]
    elif defect == "v_shape":
        v = v[:, :, :-1]
    elif defect == "batch":
        k, v = k[:1], v[:1]
    elif defect == "head_dim":
        k, v = k[..., :-1], v[..., :-1]
    elif defect == "hq_not_multiple":
        q = torch.zeros(B, hkv * group + 1, D)
    elif defect == "index_rank":
        index = index[..., None]
    elif defect == "index_heads":
        index = torch.zeros(B, hkv + 1, K, dtype=torch.long)
    elif defect == "index_batch":
        index = index[:1]
    elif defect == "index_float":
        index = index.float()
    else:
        kv_len = kv_len[:1]
    fn = sparse_attention_ref if impl == "ref" else sparse_attention_triton
    with pytest.raises(ValueError, match="sparse_attention: "):
        fn(q, k, v, index, kv_len, 0.1)


# ============================================================================================ gather_kv
@st.composite
def gather_cases(draw):
    return dict(B=draw(st.integers(1, 3)), H=draw(st.integers(1, 4)), S=draw(st.integers(1, 20)),
                D=draw(st.sampled_from([1, 3, 8, 24, 64])),
                K=draw(st.one_of(st.integers(0, 20), st.integers(60, 100))),  # > 64: several row blocks
                shared=draw(st.booleans()), index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                # "cache": a length-slice of a longer buffer (what the runtime passes); "bshd": a
                # transposed [B, S, H, D] buffer, a layout no row stride walks
                layout=draw(st.sampled_from(["contiguous", "cache", "bshd"])),
                dtype=draw(st.sampled_from(ALL_DTYPES)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(c=gather_cases())
def test_gather_kv_copies_the_listed_rows(impl, c):
    # gather_kv defines no padding (every entry must be a slot in [0, S)); repeats and any order are allowed
    g, dt = gen(c["seed"]), c["dtype"]
    B, H, S, D, K = c["B"], c["H"], c["S"], c["D"], c["K"]
    if c["layout"] == "cache":
        src = randn(g, B, H, S + 5, D, dtype=dt)[:, :, :S]
    elif c["layout"] == "bshd":
        src = randn(g, B, S, H, D, dtype=dt).transpose(1, 2)
    else:
        src = randn(g, B, H, S, D, dtype=dt)
    index = torch.randint(0, S, (B, K) if c["shared"] else (B, H, K), generator=g).to(c["index_dtype"])
    want = torch.empty(B, H, K, D, dtype=dt)
    for b in range(B):
        for h in range(H):
            want[b, h] = src[b, h][(index[b] if c["shared"] else index[b, h]).long()]
    got = (gather_kv_ref if impl == "ref" else gather_kv_triton)(src, index)
    assert got.dtype == dt and got.shape == (B, H, K, D)
    assert torch.equal(got, want)                                  # a copy: bit-exact in every dtype


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(15)
@given(defect=st.sampled_from(["src_rank", "index_rank", "index_batch", "index_heads"]), H=st.integers(1, 3),
       K=st.integers(1, 5))
def test_gather_kv_rejects_malformed_inputs(impl, defect, H, K):
    B, S, D = 2, 6, 8
    src, index = torch.zeros(B, H, S, D), torch.zeros(B, H, K, dtype=torch.long)
    if defect == "src_rank":
        src = src[0]
    elif defect == "index_rank":
        index = index[..., None]
    elif defect == "index_batch":
        index = index[:1]
    else:
        index = torch.zeros(B, H + 1, K, dtype=torch.long)
    with pytest.raises(ValueError, match="gather_kv: "):
        (gather_kv_ref if impl == "ref" else gather_kv_triton)(src, index)


# ========================================================================================= Quest pages
def plain_page_minmax(k, kv_len, page_size, first, last):
    """Channel-wise min / max over the slots of each page that are < kv_len[b] (and < S); 0 for a page
    with no such slot."""
    B, H, S, D = k.shape
    kmin, kmax = torch.zeros(B, H, last - first, D), torch.zeros(B, H, last - first, D)
    for b in range(B):
        for p in range(first, last):
            lo, hi = p * page_size, min((p + 1) * page_size, S, int(kv_len[b]))
            if hi > lo:
                kmin[b, :, p - first] = k[b, :, lo:hi].float().amin(1)
                kmax[b, :, p - first] = k[b, :, lo:hi].float().amax(1)
    return kmin, kmax


@st.composite
def page_cases(draw, dtypes):
    S = draw(st.integers(1, 40))
    page_size = draw(st.integers(1, 8))
    P = -(-S // page_size)
    first = draw(st.integers(0, P))
    B = draw(st.integers(1, 3))
    Hq, Hkv = group_heads(draw)
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, page_size=page_size,
                D=draw(st.sampled_from([1, 5, 16, 24, 64])),
                kv_len=draw(st.lists(st.integers(0, S), min_size=B, max_size=B)),
                first=first, last=draw(st.one_of(st.none(), st.integers(first, P))),
                dtype=draw(st.sampled_from(dtypes)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(c=page_cases(ALL_DTYPES))
def test_page_minmax_is_the_min_and_max_of_each_page(impl, c):
    g = gen(c["seed"])
    k = randn(g, c["B"], c["Hkv"], c["S"], c["D"], dtype=c["dtype"])
    kv_len = torch.tensor(c["kv_len"])
    P = -(-c["S"] // c["page_size"])
    last = P if c["last"] is None else c["last"]
    fn = page_minmax_ref if impl == "ref" else page_minmax_triton
    kmin, kmax = fn(k, kv_len, c["page_size"], c["first"], c["last"])
    want_min, want_max = plain_page_minmax(k, kv_len, c["page_size"], c["first"], last)
    for got, want in ((kmin, want_min), (kmax, want_max)):
        assert got.dtype == F32 and got.shape == want.shape
        assert torch.equal(got, want)                              # min / max of fp32 copies: exact


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(15)
@given(defect=st.sampled_from(["k_rank", "kv_len_shape", "page_size_zero", "page_size_float"]),
       page_size=st.integers(1, 4))
def test_page_minmax_rejects_malformed_inputs(impl, defect, page_size):
    k, kv_len = torch.zeros(2, 2, 10, 8), torch.full((2,), 10)
    if defect == "k_rank":
        k = k[0]
    elif defect == "kv_len_shape":
        kv_len = kv_len[:1]
    elif defect == "page_size_zero":
        page_size = 1 - page_size                                  # 0 or negative
    else:
        page_size = float(page_size)
    fn = page_minmax_ref if impl == "ref" else page_minmax_triton
    with pytest.raises(ValueError, match="page_minmax: |page_size must be"):
        fn(k, kv_len, page_size)


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(c=page_cases(ALL_DTYPES))
def test_page_scores_are_quest_bounds_of_every_key(impl, c):
    # page_scores does not validate its inputs (its metadata comes from page_minmax), so there is no
    # rejection property for it
    g, dt, ps = gen(c["seed"]), c["dtype"], c["page_size"]
    B, Hq, Hkv, S, D = c["B"], c["Hq"], c["Hkv"], c["S"], c["D"]
    G = Hq // Hkv
    P = -(-S // ps)
    q, k = randn(g, B, Hq, D, dtype=dt), randn(g, B, Hkv, S, D, dtype=dt)
    kv_len = torch.tensor(c["kv_len"])
    kmin, kmax = plain_page_minmax(k, kv_len, ps, 0, P)
    got = (page_scores_ref if impl == "ref" else page_scores_triton)(q, kmin, kmax, kv_len, ps)
    qd, lo, hi = q.double(), kmin.double(), kmax.double()
    want = torch.full((B, Hkv, P), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(kv_len[b])
        pages = -(-n // ps)                                                    # pages holding a valid slot
        for kvh in range(Hkv):
            qg = qd[b, kvh * G:(kvh + 1) * G, None]                            # [G, 1, D]
            bound = torch.maximum(qg * lo[b, kvh], qg * hi[b, kvh]).sum(-1)     # [G, P]
            want[b, kvh, :pages] = bound.amax(0)[:pages]
            # Quest's point: the score bounds q.k of every valid key of its page, for every head
            s = torch.full((G, P * ps), float("-inf"), dtype=torch.float64)
            s[:, :n] = qg[:, 0] @ k[b, kvh, :n].double().T
            best = s.view(G, P, ps).amax(-1).amax(0)                           # [P]
            assert (best[:pages] <= got[b, kvh, :pages].double() + 1e-4).all()
    close(got, want.float(), F32, SCORE_TOL)


# ======================================================================================== token scores
def plain_token_scores(q, k, q_pos, kv_len, scale, softmax, heads, pool, pool_kernel):
    """Window query i of sequence b sits at q_pos[b] + i and sees keys j <= q_pos[b] + i, j < kv_len[b];
    per key, the sum over the window of softmax(scale q.k) (or of scale q.k), aggregated over heads,
    pooled along the keys (avg: zero padding, / kernel; max: over the valid keys only), -inf from
    kv_len on."""
    B, Hq, W, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    r = torch.zeros(B, Hq, S, dtype=torch.float64)
    j = torch.arange(S)[None, :]
    for b in range(B):
        seen = (j <= int(q_pos[b]) + torch.arange(W)[:, None]) & (j < int(kv_len[b]))   # [W, S]
        for h in range(Hq):
            s = scale * q[b, h].double() @ k[b, h // G].double().T                # [W, S]
            if softmax:
                s = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
            r[b, h] = s.masked_fill(~seen, 0.0).sum(0)
    if heads != "none":
        r = {"sum": r.sum(1), "mean": r.mean(1), "max": r.amax(1)}[heads]
    valid = torch.arange(S)[None] < kv_len[:, None]                               # [B, S]
    valid = valid if heads != "none" else valid[:, None].expand(B, Hq, S)
    if pool is not None and pool_kernel > 1:
        half = pool_kernel // 2
        fill = 0.0 if pool == "avg" else float("-inf")
        padded = torch.full((*r.shape[:-1], S + 2 * half), fill, dtype=torch.float64)
        padded[..., half:half + S] = r.masked_fill(~valid, fill)
        shifted = torch.stack([padded[..., o:o + S] for o in range(pool_kernel)])
        r = shifted.sum(0) / pool_kernel if pool == "avg" else shifted.amax(0)
    return r.masked_fill(~valid, float("-inf"))


@st.composite
def token_score_cases(draw, dtypes):
    B = draw(st.integers(1, 2))
    Hq, Hkv = group_heads(draw)
    S = draw(st.one_of(st.integers(1, 40), st.integers(60, 140)))    # > 64: several key tiles
    W = draw(st.one_of(st.integers(1, 6), st.integers(17, 20)))     # > 16: a wider query tile
    kv_len = draw(st.lists(st.integers(1, S), min_size=B, max_size=B))
    # the window is usually the last W tokens (q_pos = kv_len - W); shifted either way, and for a
    # window longer than the sequence, its first queries sit at negative positions and see nothing
    shift = draw(st.lists(st.integers(-3, 3), min_size=B, max_size=B))
    pool = draw(st.sampled_from([None, "avg", "max"]))
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, W=W, kv_len=kv_len,
                q_pos=[n - W + s for n, s in zip(kv_len, shift)],
                D=draw(st.sampled_from(DOT_HEAD_DIMS)), scale=draw(st.floats(0.01, 0.3)),
                softmax=draw(st.booleans()), heads=draw(st.sampled_from(["sum", "mean", "max", "none"])),
                pool=pool, pool_kernel=draw(st.sampled_from([1, 3, 5, 7])),
                dtype=draw(st.sampled_from(dtypes)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(data=st.data())
def test_token_scores_match_plain_window_sums(impl, data):
    c = data.draw(token_score_cases(DOT_DTYPES[impl]))
    g = gen(c["seed"])
    q = randn(g, c["B"], c["Hq"], c["W"], c["D"], dtype=c["dtype"])
    k = randn(g, c["B"], c["Hkv"], c["S"], c["D"], dtype=c["dtype"])
    q_pos, kv_len = torch.tensor(c["q_pos"]), torch.tensor(c["kv_len"])
    opts = dict(softmax=c["softmax"], heads=c["heads"], pool=c["pool"], pool_kernel=c["pool_kernel"])
    got = (token_scores_ref if impl == "ref" else token_scores_triton)(q, k, q_pos, kv_len, c["scale"], **opts)
    close(got, plain_token_scores(q, k, q_pos, kv_len, c["scale"], **opts), F32, SCORE_TOL)


TOKEN_SCORE_DEFECTS = {"heads": "heads must be", "pool": "pool must be", "pool_kernel": "pool_kernel must be odd",
                       "q_rank": "token_scores: ", "head_dim": "token_scores: ", "hq_not_multiple": "token_scores: ",
                       "batch": "token_scores: ", "q_pos_shape": "token_scores: "}


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(20)
@given(defect=st.sampled_from(sorted(TOKEN_SCORE_DEFECTS)), hkv=st.integers(2, 3), group=st.integers(1, 2),
       pool_kernel=st.integers(0, 4).map(lambda n: 2 * n))
def test_token_scores_rejects_malformed_inputs(impl, defect, hkv, group, pool_kernel):
    B, W, S, D = 2, 3, 10, 16
    q, k = torch.zeros(B, hkv * group, W, D), torch.zeros(B, hkv, S, D)
    q_pos, kv_len = torch.full((B,), S - W), torch.full((B,), S)
    opts = dict(heads="sum", pool=None, pool_kernel=5)
    if defect == "heads":
        opts["heads"] = "median"
    elif defect == "pool":
        opts["pool"] = "min"
    elif defect == "pool_kernel":
        opts.update(pool="avg", pool_kernel=pool_kernel)            # even (or 0)
    elif defect == "q_rank":
        q = q[:, :, 0]
    elif defect == "head_dim":
        k = k[..., :-1]
    elif defect == "hq_not_multiple":
        q = torch.zeros(B, hkv * group + 1, W, D)
    elif defect == "batch":
        k = k[:1]
    else:
        q_pos = q_pos[:1]
    fn = token_scores_ref if impl == "ref" else token_scores_triton
    with pytest.raises(ValueError, match=TOKEN_SCORE_DEFECTS[defect]):
        fn(q, k, q_pos, kv_len, 0.1, **opts)


# ============================================================================ decode attention + scores
@st.composite
def decode_cases(draw, dtypes, softcap):
    B = draw(st.integers(1, 3))
    Hq, Hkv = group_heads(draw)
    S = draw(st.one_of(st.integers(1, 40), st.integers(257, 300)))   # > 256: several key splits
    D = draw(st.sampled_from(DOT_HEAD_DIMS))
    return dict(B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, kv_len=draw(st.lists(st.integers(1, S), min_size=B, max_size=B)),
                scale=draw(st.one_of(st.just(D ** -0.5), st.floats(0.05, 0.6))),
                softcap=draw(softcaps) if softcap else None,
                dtype=draw(st.sampled_from(dtypes)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(30)
@given(data=st.data())
def test_decode_attention_scores_match_plain_softmax(impl, data):
    # the Triton path has no soft-capping (it rejects it, below); the reference is checked with it
    c = data.draw(decode_cases(DOT_DTYPES[impl], softcap=impl == "ref"))
    g, dt = gen(c["seed"]), c["dtype"]
    B, Hq, Hkv, S, D = c["B"], c["Hq"], c["Hkv"], c["S"], c["D"]
    q, k, v = randn(g, B, Hq, 1, D, dtype=dt), randn(g, B, Hkv, S, D, dtype=dt), randn(g, B, Hkv, S, D, dtype=dt)
    kv_len = torch.tensor(c["kv_len"])
    fn = decode_attention_scores_ref if impl == "ref" else decode_attention_scores_triton
    out, scores = fn(q, k, v, kv_len, c["scale"], c["softcap"])
    # the query sits at kv_len - 1 and reads every key before kv_len
    close(out, plain_attention(q, k, v, kv_len - 1, kv_len, c["scale"], None, c["softcap"]), dt, ATTN_TOL[dt])
    G = Hq // Hkv
    want = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        n = int(kv_len[b])
        s = c["scale"] * q[b, :, 0].double().view(Hkv, G, D) @ k[b, :, :n].double().transpose(-1, -2)
        if c["softcap"] is not None:
            s = c["softcap"] * torch.tanh(s / c["softcap"])
        want[b, :n] = torch.softmax(s, -1).sum((0, 1))
    close(scores, want.float(), F32, SCORE_TOL)


@prop_settings(15)
@given(defect=st.sampled_from(["softcap", "head_dim", "hq_not_multiple", "kv_len_shape"]), softcap=st.floats(1.0, 50.0),
       hkv=st.integers(2, 3))
def test_decode_attention_scores_triton_rejects_what_it_cannot_do(defect, softcap, hkv):
    # decode_attention_scores_ref does not validate; the Triton path rejects soft-capping (its
    # token-scores kernel has none) and malformed shapes (through the attention wrapper)
    B, S, D = 2, 8, 16
    q, k, v = torch.zeros(B, 2 * hkv, 1, D), torch.zeros(B, hkv, S, D), torch.zeros(B, hkv, S, D)
    kv_len, cap = torch.full((B,), S), None
    if defect == "softcap":
        cap, match = softcap, "no soft-capping"
    elif defect == "head_dim":
        k, v, match = k[..., :-1], v[..., :-1], "attention: "
    elif defect == "hq_not_multiple":
        q, match = torch.zeros(B, 2 * hkv + 1, 1, D), "attention: "
    else:
        kv_len, match = kv_len[None], "attention: "
    with pytest.raises(ValueError, match=match):
        decode_attention_scores_triton(q, k, v, kv_len, 0.1, cap)


# ============================================================================================= RMSNorm
def plain_rms_norm(x, w, eps, offset):
    xd = x.double()
    return (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)).to(x.dtype)


def strided_rows(g, lead, n, dtype, layout, scale=1.0):
    """[*lead, n] in one of the layouts the wrappers accept: contiguous; "sliced" (the first n columns
    of wider rows: one row stride); "strided" (every other column); "transposed" (the first two
    leading dims swapped: no single row stride)."""
    if layout == "transposed" and len(lead) >= 2:
        return randn(g, lead[1], lead[0], *lead[2:], n, dtype=dtype, scale=scale).transpose(0, 1)
    if layout == "sliced":
        return randn(g, *lead, n + 3, dtype=dtype, scale=scale)[..., :n]
    if layout == "strided":
        return randn(g, *lead, 2 * n, dtype=dtype, scale=scale)[..., ::2]
    return randn(g, *lead, n, dtype=dtype, scale=scale)


@st.composite
def norm_cases(draw):
    return dict(lead=draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)),
                N=draw(st.one_of(st.integers(1, 70), st.sampled_from([576, 640, 1000]))),
                layout=draw(st.sampled_from(["contiguous", "sliced", "strided", "transposed"])),
                eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])), offset=draw(st.sampled_from([0.0, 1.0])),
                weight_f32=draw(st.booleans()),                         # HF keeps some norm weights in fp32
                residual_f32=draw(st.booleans()),                       # an fp32 residual stream
                scale=draw(st.sampled_from([1.0, 1e-2, 30.0])),
                dtype=draw(st.sampled_from(ALL_DTYPES)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(c=norm_cases())
def test_rms_norm_matches_plain_formula(impl, c):
    g, dt = gen(c["seed"]), c["dtype"]
    x = strided_rows(g, c["lead"], c["N"], dt, c["layout"], c["scale"])
    w = (1.0 + 0.5 * torch.randn(c["N"], generator=g)).to(F32 if c["weight_f32"] else dt)
    x0 = x.clone()
    got = (rms_norm_ref if impl == "ref" else rms_norm_triton)(x, w, c["eps"], c["offset"])
    close(got, plain_rms_norm(x, w, c["eps"], c["offset"]), dt, ROUNDING_TOL[dt])
    assert torch.equal(x, x0)


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(c=norm_cases())
def test_add_rms_norm_matches_plain_formula(impl, c):
    g, dt = gen(c["seed"]), c["dtype"]
    x = strided_rows(g, c["lead"], c["N"], dt, c["layout"], c["scale"])
    r = strided_rows(g, c["lead"], c["N"], F32 if c["residual_f32"] else dt, "contiguous", c["scale"])
    w = (1.0 + 0.5 * torch.randn(c["N"], generator=g)).to(F32 if c["weight_f32"] else dt)
    h, y = (add_rms_norm_ref if impl == "ref" else add_rms_norm_triton)(x, r, w, c["eps"], c["offset"])
    want_h = (r.double() + x.double()).to(dt)                      # the residual stream, in x's dtype
    close(h, want_h, dt, ROUNDING_TOL[dt])
    close(y, plain_rms_norm(h, w, c["eps"], c["offset"]), dt, ROUNDING_TOL[dt])


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(10)
@given(lead=st.lists(st.integers(0, 3), min_size=1, max_size=3), N=st.integers(0, 5))
@example(lead=[3], N=0)                                           # rows of width 0
def test_rms_norms_of_empty_inputs_are_empty(impl, lead, N):
    # the validation accepts every size, zero included; an empty input has an empty result
    if 0 not in lead:
        N = 0
    x, r, w = torch.ones(*lead, N), torch.ones(*lead, N), torch.ones(N)
    y = (rms_norm_ref if impl == "ref" else rms_norm_triton)(x, w, 1e-6)
    h, y2 = (add_rms_norm_ref if impl == "ref" else add_rms_norm_triton)(x, r, w, 1e-6)
    assert y.shape == h.shape == y2.shape == x.shape and y.numel() == 0


NORM_DEFECTS = ["weight_len", "weight_rank", "x_int", "weight_int", "residual_shape", "residual_int"]


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(20)
@given(defect=st.sampled_from(NORM_DEFECTS), rows=st.integers(1, 4), N=st.integers(2, 40))
def test_rms_norms_reject_malformed_inputs(impl, defect, rows, N):
    x, r, w = torch.ones(rows, N), torch.ones(rows, N), torch.ones(N)
    if defect == "weight_len":
        w = torch.ones(N - 1)
    elif defect == "weight_rank":
        w = torch.ones(1, N)
    elif defect == "x_int":
        x = x.long()
    elif defect == "weight_int":
        w = w.long()
    elif defect == "residual_shape":
        r = torch.ones(rows + 1, N)
    else:
        r = r.long()
    add = add_rms_norm_ref if impl == "ref" else add_rms_norm_triton
    with pytest.raises(ValueError, match="add_rms_norm: "):
        add(x, r, w, 1e-6)
    if not defect.startswith("residual"):
        with pytest.raises(ValueError, match="rms_norm: "):
            (rms_norm_ref if impl == "ref" else rms_norm_triton)(x, w, 1e-6)


# ================================================================================================= GLU
def plain_glu(gate, up, activation):
    gd, ud = gate.double(), up.double()
    if activation == "silu":
        a = gd / (1.0 + torch.exp(-gd))
    elif activation == "gelu_tanh":
        a = 0.5 * gd * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gd + 0.044715 * gd ** 3)))
    else:
        a = 0.5 * gd * (1.0 + torch.erf(gd / math.sqrt(2.0)))
    return (a * ud).to(gate.dtype)


@st.composite
def glu_cases(draw):
    return dict(lead=draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)),
                # the interpreter's column block is 256 wide: wider rows take several blocks
                I=draw(st.one_of(st.integers(1, 70), st.integers(250, 600))),
                layout=draw(st.sampled_from(["contiguous", "merged", "transposed"])),
                activation=draw(st.sampled_from(["silu", "gelu_tanh", "gelu"])),
                scale=draw(st.sampled_from([1.0, 4.0, 20.0])),          # gates far into both tails
                dtype=draw(st.sampled_from(ALL_DTYPES)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(50)
@given(c=glu_cases())
def test_glu_matches_plain_formula(impl, c):
    g, dt, lead, I = gen(c["seed"]), c["dtype"], c["lead"], c["I"]
    if c["layout"] == "merged":                                    # the halves of one [..., 2I] projection
        gu = randn(g, *lead, 2 * I, dtype=dt, scale=c["scale"])
        gate, up = gu[..., :I], gu[..., I:]
    else:
        gate = strided_rows(g, lead, I, dt, c["layout"], c["scale"])
        up = strided_rows(g, lead, I, dt, c["layout"])
    got = (glu_ref if impl == "ref" else glu_triton)(gate, up, c["activation"])
    assert got.is_contiguous()
    close(got, plain_glu(gate, up, c["activation"]), dt, ROUNDING_TOL[dt])


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(10)
@given(lead=st.lists(st.integers(0, 3), min_size=1, max_size=3), I=st.integers(0, 5))
@example(lead=[3], I=0)                                           # rows of width 0
def test_glu_of_empty_inputs_is_empty(impl, lead, I):
    # the validation accepts every size, zero included; an empty input has an empty result
    if 0 not in lead:
        I = 0
    gate, up = torch.ones(*lead, I), torch.ones(*lead, I)
    y = (glu_ref if impl == "ref" else glu_triton)(gate, up, "silu")
    assert y.shape == gate.shape and y.numel() == 0


# the reference validates names and shapes only (torch rejects other dtypes itself); the Triton
# wrapper checks dtypes too
GLU_DEFECTS = {"ref": ["activation", "shape"], "triton": ["activation", "shape", "int"]}


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(15)
@given(data=st.data(), rows=st.integers(1, 3), I=st.integers(2, 20))
def test_glu_rejects_malformed_inputs(impl, data, rows, I):
    defect = data.draw(st.sampled_from(GLU_DEFECTS[impl]))
    gate, up, act = torch.ones(rows, I), torch.ones(rows, I), "silu"
    if defect == "activation":
        act = "relu"
    elif defect == "shape":
        up = torch.ones(rows, I - 1)
    else:
        gate, up = gate.long(), up.long()
    with pytest.raises(ValueError, match="glu: "):
        (glu_ref if impl == "ref" else glu_triton)(gate, up, act)


# ================================================================================================ RoPE
def rope_tables(positions, D, base, dtype):
    """HF's cos/sin tables [len(positions), T, D] for integer positions [*, T]."""
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions.double()[..., None] * inv_freq
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def plain_rope(x, cos, sin):
    xd = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xd[..., half:], xd[..., :half]], -1)
    return (xd * cos.double()[:, None] + rotated * sin.double()[:, None]).to(x.dtype)


@st.composite
def rope_cases(draw):
    B = draw(st.integers(1, 3))
    Hq, Hkv = group_heads(draw)
    return dict(B=B, Hq=Hq, Hkv=Hkv, T=draw(st.integers(1, 6)), D=draw(st.sampled_from([2, 6, 16, 24, 64, 80])),
                offsets=draw(st.lists(st.integers(0, 5000), min_size=B, max_size=B)),
                per_batch=draw(st.booleans()),                          # cos/sin [B, T, D], else [1, T, D]
                base=draw(st.sampled_from([10000.0, 1e6])),
                bthd=draw(st.booleans()),                               # q, k transposed [B, T, H, D] views
                table_f32=draw(st.booleans()),
                dtype=draw(st.sampled_from(ALL_DTYPES)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(40)
@given(c=rope_cases())
def test_rope_matches_rotate_half(impl, c):
    g, dt = gen(c["seed"]), c["dtype"]
    B, Hq, Hkv, T, D = c["B"], c["Hq"], c["Hkv"], c["T"], c["D"]
    if c["bthd"]:
        q, k = randn(g, B, T, Hq, D, dtype=dt).transpose(1, 2), randn(g, B, T, Hkv, D, dtype=dt).transpose(1, 2)
    else:
        q, k = randn(g, B, Hq, T, D, dtype=dt), randn(g, B, Hkv, T, D, dtype=dt)
    offsets = torch.tensor(c["offsets"] if c["per_batch"] else c["offsets"][:1])
    cos, sin = rope_tables(offsets[:, None] + torch.arange(T), D, c["base"], F32 if c["table_f32"] else dt)
    qo, ko = (rope_ref if impl == "ref" else rope_triton)(q, k, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous()
    close(qo, plain_rope(q, cos, sin), dt, ROUNDING_TOL[dt])
    close(ko, plain_rope(k, cos, sin), dt, ROUNDING_TOL[dt])


ROPE_DEFECTS = ["odd_dim", "k_batch", "k_len", "k_dim", "cos_len", "cos_batch", "sin_shape", "q_rank",
                "dtype_mismatch", "int_table"]


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(20)
@given(defect=st.sampled_from(ROPE_DEFECTS), T=st.integers(1, 4), half=st.integers(1, 8))
def test_rope_rejects_malformed_inputs(impl, defect, T, half):
    B, D = 2, 2 * half
    q, k, cos, sin = torch.zeros(B, 4, T, D), torch.zeros(B, 2, T, D), torch.zeros(1, T, D), torch.zeros(1, T, D)
    if defect == "odd_dim":
        q, k, cos, sin = q[..., :-1], k[..., :-1], cos[..., :-1], sin[..., :-1]
    elif defect == "k_batch":
        k = k[:1]
    elif defect == "k_len":
        k = torch.zeros(B, 2, T + 1, D)
    elif defect == "k_dim":
        k = torch.zeros(B, 2, T, D + 2)
    elif defect == "cos_len":
        cos, sin = torch.zeros(1, T + 1, D), torch.zeros(1, T + 1, D)
    elif defect == "cos_batch":
        cos, sin = torch.zeros(B + 1, T, D), torch.zeros(B + 1, T, D)
    elif defect == "sin_shape":
        sin = torch.zeros(B, T, D)
    elif defect == "q_rank":
        q = q[0]
    elif defect == "dtype_mismatch":
        k = k.half()
    else:
        cos = cos.long()
    with pytest.raises(ValueError, match="rope: "):
        (rope_ref if impl == "ref" else rope_triton)(q, k, cos, sin)


# ===================================================================================== exit confidence
@st.composite
def exit_cases(draw):
    H = draw(st.integers(1, 70))                                   # > 64: several hidden blocks
    V = draw(st.one_of(st.integers(2, 200), st.integers(1025, 1300)))  # > 1024: several vocabulary splits
    return dict(N=draw(st.integers(1, 4)), H=H, V=V, softcap=draw(st.one_of(st.none(), st.floats(0.5, 30.0))),
                temperature=draw(st.sampled_from([0.1, 1.0, 4.0])),   # logit spread: flat to peaked
                tie=draw(st.one_of(st.none(), st.tuples(st.integers(0, V - 1), st.integers(0, V - 1)))),
                dtype=draw(st.sampled_from(ALL_DTYPES)), seed=draw(seeds))


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(40)
@given(c=exit_cases())
def test_exit_confidence_matches_plain_softmax(impl, c):
    g, dt, N, H, V = gen(c["seed"]), c["dtype"], c["N"], c["H"], c["V"]
    h = randn(g, N, H, scale=c["temperature"] / math.sqrt(H))
    w = randn(g, V, H)
    tie = c["tie"] is not None and c["tie"][0] != c["tie"][1]
    if tie:
        # two copies of one row that beats every other row for every h: the first copy must win and
        # the margin be 0
        base = torch.randn(H, generator=g)
        h = base * (1.0 + torch.rand(N, 1, generator=g))           # every row along base
        w *= 0.1
        w[list(c["tie"])] = 8.0 * base / base.norm()
    h, w = h.to(dt), w.to(dt)
    top1, prob, margin = (exit_confidence_ref if impl == "ref" else exit_confidence_triton)(h, w, c["softcap"])
    assert top1.dtype == torch.long and prob.dtype == margin.dtype == F32
    assert top1.shape == prob.shape == margin.shape == (N,)
    z = h.double() @ w.double().T
    if c["softcap"] is not None:
        z = c["softcap"] * torch.tanh(z / c["softcap"])
    p = torch.softmax(z, -1)
    top2 = p.topk(2, -1).values
    delta = LOGIT_ROUNDING[dt] * float(z.abs().max()) + 1e-6
    tol = 2 * delta + 1e-6
    # top1 is a largest logit up to the logits' rounding (and exactly the first copy on a tie)
    assert (z.gather(1, top1[:, None])[:, 0] >= z.amax(-1) - 2 * delta).all()
    if tie:
        assert top1.tolist() == [min(c["tie"])] * N
        assert (margin.abs() <= tol).all()
    torch.testing.assert_close(prob.double(), top2[:, 0], rtol=0, atol=tol)
    torch.testing.assert_close(margin.double(), top2[:, 0] - top2[:, 1], rtol=0, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@prop_settings(15)
@given(defect=st.sampled_from(["h_rank", "weight_rank", "hidden", "vocab_of_one"]), N=st.integers(1, 3),
       H=st.integers(2, 16))
def test_exit_confidence_rejects_malformed_inputs(impl, defect, N, H):
    h, w = torch.zeros(N, H), torch.zeros(10, H)
    if defect == "h_rank":
        h = h[None]
    elif defect == "weight_rank":
        w = w[None]
    elif defect == "hidden":
        w = torch.zeros(10, H - 1)
    else:
        w = w[:1]
    with pytest.raises(ValueError, match="exit_confidence: "):
        (exit_confidence_ref if impl == "ref" else exit_confidence_triton)(h, w)


# ============================================================================================== linear
@st.composite
def linear_cases(draw):
    return dict(lead=draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)),  # 0 .. 216 rows, around SMALL_M
                K=draw(st.integers(1, 64)), N=draw(st.integers(1, 64)), bias=draw(st.booleans()),
                weight_t=draw(st.booleans()),                            # a transposed (non-contiguous) weight
                dtype=draw(st.sampled_from(ALL_DTYPES)), seed=draw(seeds))


@prop_settings(60)
@given(c=linear_cases())
def test_linear_matches_plain_matmul(c):
    # linear has no Triton kernel and no validation of its own (F.linear's errors stand): only the
    # value property; its CPU fast path covers fp32 inputs of at most SMALL_M rows
    g, dt, K, N = gen(c["seed"]), c["dtype"], c["K"], c["N"]
    x = randn(g, *c["lead"], K, dtype=dt)
    w = randn(g, K, N, dtype=dt).T if c["weight_t"] else randn(g, N, K, dtype=dt)
    b = randn(g, N, dtype=dt) if c["bias"] else None
    with torch.no_grad():
        got = linear(x, w, b)
    want = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    # fp32 accumulation (in every dtype) over K <= 64 products of randn values (sum of |terms| below
    # ~100, so < ~1e-5 off), then one rounding to the output dtype
    close(got, want, dt, dict(rtol=ROUNDING_TOL[dt]["rtol"], atol=1e-4))
