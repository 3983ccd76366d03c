"""Decode attention over a gathered subset of the KV cache (Quest pages, DELTA token sets).

Semantics (kernel and reference): one new query per sequence, q [B, Hq, D]. ``index [B, Hkv, K]``
(one key set per KV head) or ``[B, K]`` (one set shared by all heads) lists cache slots; entries
that are negative or ``>= kv_len[b]`` are padding and read nothing. Query head h attends, with
scores ``scale * q·k`` (soft-capped when ``softcap``), to exactly the slots listed for its KV head
``h // (Hq // Hkv)``. Each slot must appear at most once per row. Output [B, Hq, D] in q's dtype.

Why a kernel of its own: the point of a sparse read is to move only K of the S cached keys. The
reference gathers k/v into a [B, Hkv, K, D] copy first (two extra passes over the K rows); the
Triton kernel loads the listed rows straight from the cache inside a flash-decoding loop (split
over the index list, all query heads of a GQA group per program so each row is read once, the
partial softmax states merged by the dense decode kernel's combine step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, launch, tl, triton, use_triton
from .compact import gather_kv_ref
from .attention import _decode_splits

if HAS_TRITON:     # the shared Triton pieces exist only where Triton imported
    from .attention import _attn_decode_combine_kernel, _decode_configs, _online_softmax_step, _scores_log2


def _check(q, k, v, index, kv_len):
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"sparse_attention: q must be [B, Hq, D] and k, v [B, Hkv, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D or Hq % Hkv:
        raise ValueError(f"sparse_attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)}")
    if index.dim() not in (2, 3) or index.shape[0] != B or (index.dim() == 3 and index.shape[1] != Hkv):
        raise ValueError(f"sparse_attention: index must be [B, Hkv, K] or [B, K]; got {tuple(index.shape)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_attention: index must be an integer tensor, got {index.dtype}")
    if kv_len.shape != (B,):
        raise ValueError(f"sparse_attention: kv_len must be [B={B}]")


def sparse_attention_ref(q, k, v, index, kv_len, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Reference: gather the listed k/v rows, then one masked SDPA per KV head (GQA group as queries)."""
    _check(q, k, v, index, kv_len)
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    idx = index if index.dim() == 3 else index[:, None].expand(B, Hkv, index.shape[-1])
    ok = (idx >= 0) & (idx < kv_len[:, None, None])                              # [B, Hkv, K]
    safe = idx.clamp(min=0, max=k.shape[2] - 1)
    kg, vg = gather_kv_ref(k, safe).float(), gather_kv_ref(v, safe).float()
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    if softcap is not None:
        s = torch.einsum("bkgd,bknd->bkgn", qg, kg) * scale
        s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s.masked_fill(~ok[:, :, None], float("-inf")), -1).nan_to_num(0.0)
        out = torch.einsum("bkgn,bknd->bkgd", p, vg)
    elif not torch.compiler.is_compiling() and bool(ok.all()):                   # no padding: no mask
        out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=ok[:, :, None], scale=scale)
        out = out.masked_fill(~ok.any(-1)[:, :, None, None], 0.0)               # rows with no key at all
    return out.reshape(B, Hq, D).to(q.dtype)


def sparse_attention_queries_ref(q, k, v, index, kv_len, scale: float, softcap: float | None = None) -> torch.Tensor:
    """T queries per sequence, each with its own slot sets: q [B, Hq, T, D], index [B, Hkv, T, K], kv_len
    [B, T] -> [B, Hq, T, D]. Query t attends as ``sparse_attention_ref(q[:, :, t], k, v, index[:, :, t],
    kv_len[:, t])`` does (the same gather and masked SDPA, the T queries as more heads of one call)."""
    if q.dim() != 4 or index.dim() != 4 or kv_len.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"sparse_attention_queries: q must be [B, Hq, T, D], index [B, Hkv, T, K] and kv_len "
                         f"[B, T]; got {tuple(q.shape)}, {tuple(index.shape)}, {tuple(kv_len.shape)}")
    B, Hq, T, D = q.shape
    Hkv, K = index.shape[1], index.shape[3]
    _check(q[:, :, 0], k, v, index[:, :, 0], kv_len[:, 0])
    ok = (index >= 0) & (index < kv_len[:, None, :, None])                          # [B, Hkv, T, K]
    safe = index.clamp(min=0, max=k.shape[2] - 1).reshape(B, Hkv, T * K)
    kg = gather_kv_ref(k, safe).float().view(B, Hkv * T, K, D)
    vg = gather_kv_ref(v, safe).float().view(B, Hkv * T, K, D)
    qg = q.float().view(B, Hkv, Hq // Hkv, T, D).transpose(2, 3).reshape(B, Hkv * T, Hq // Hkv, D)
    ok = ok.reshape(B, Hkv * T, 1, K)
    if softcap is not None:
        s = torch.einsum("bkgd,bknd->bkgn", qg, kg) * scale
        s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
        out = torch.einsum("bkgn,bknd->bkgd", p, vg)
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=ok, scale=scale)
        out = out.masked_fill(~ok.any(-1)[..., None], 0.0)                          # rows with no key at all
    return out.view(B, Hkv, T, Hq // Hkv, D).transpose(2, 3).reshape(B, Hq, T, D).to(q.dtype)


if HAS_TRITON:

    @triton.autotune(configs=_decode_configs(), key=["D", "GROUP", "BLOCK_N"])
    @triton.jit
    def _sparse_decode_kernel(
        Q, K, V, IDX, MPART, LPART, OPART, KVLEN,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ib, stride_ih, stride_in,
        HKV, NIDX, SPLIT_LEN, NSPLIT, sm_scale_log2e,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
    ):
        pid_bk = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bk // HKV
        kvh = pid_bk % HKV
        kv_len = tl.load(KVLEN + b)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < GROUP
        d_ok = offs_d < D
        heads = kvh * GROUP + offs_g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        lo = pid_s * SPLIT_LEN
        hi = tl.minimum(NIDX, lo + SPLIT_LEN)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        i_base = IDX + b * stride_ib + kvh * stride_ih
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            slot = tl.load(i_base + offs_n * stride_in, mask=offs_n < hi, other=-1).to(tl.int64)
            n_ok = (slot >= 0) & (slot < kv_len)
            slot = tl.where(n_ok, slot, 0)
            kt = tl.load(k_base + slot[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = _scores_log2(q, kt, sm_scale_log2e, SOFTCAP, SCALE)
            m_new, l_i, p, alpha = _online_softmax_step(tl.where(n_ok[None, :], s, float("-inf")), m_i, l_i)
            vt = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, out_dtype=tl.float32)
            m_i = m_new
        row = (pid_bk * NSPLIT + pid_s) * BLOCK_G + offs_g
        tl.store(MPART + row, m_i)
        tl.store(LPART + row, l_i)
        tl.store(OPART + row[:, None] * BLOCK_D + offs_d[None, :], acc)


# (BLOCK_N, minimum index entries per split) per head-dim bucket: a split of at least 4 blocks
# amortises the combine step; more splits when B * Hkv alone cannot fill the device. Warps and
# pipeline stages are autotuned (``_decode_configs``).
_SPARSE_SPLITS = {64: (64, 256), 128: (64, 256), 256: (32, 128)}


def sparse_attention_triton(q, k, v, index, kv_len, scale: float, softcap: float | None = None) -> torch.Tensor:
    _check(q, k, v, index, kv_len)
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    n_idx = index.shape[-1]
    block_d = triton.next_power_of_2(D)
    block_g = max(16, triton.next_power_of_2(group))
    block_n, min_split = _SPARSE_SPLITS[64 if D <= 64 else 128 if D <= 128 else 256]
    split_len, nsplit, mpart, lpart, opart = _decode_splits(q, B, Hkv, n_idx, block_n, min_split, block_g, block_d)
    stride_ih = index.stride(1) if index.dim() == 3 else 0
    out = torch.empty_like(q)
    consts = dict(SOFTCAP=float(softcap or 0.0), SCALE=float(scale))
    _sparse_decode_kernel[(B * Hkv, nsplit)](
        q, k, v, index, mpart, lpart, opart, kv_len.to(torch.int32),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        index.stride(0), stride_ih, index.stride(-1),
        Hkv, n_idx, split_len, nsplit, scale * 1.4426950408889634,
        GROUP=group, BLOCK_G=block_g, D=D, BLOCK_D=block_d, BLOCK_N=block_n, **consts)
    _attn_decode_combine_kernel[(B * Hkv,)](
        mpart, lpart, opart, out, out.stride(0), out.stride(1), out.stride(2), Hkv, nsplit,
        GROUP=group, BLOCK_G=block_g, D=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(nsplit))
    return out


def sparse_attention(q, k, v, index, kv_len, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Sparse decode attention, dispatched by device: Triton on CUDA, the torch reference on CPU."""
    if use_triton(q):
        return launch("sparse_attention", sparse_attention_triton, q, k, v, index, kv_len, scale, softcap)
    return sparse_attention_ref(q, k, v, index, kv_len, scale, softcap)


def sparse_attention_queries(q, k, v, index, kv_len, scale: float, softcap: float | None = None) -> torch.Tensor:
    """T queries per sequence with their own slot sets (``sparse_attention_queries_ref``): on CUDA the Triton
    kernel once per query, on CPU the reference in one call."""
    if use_triton(q):
        return torch.stack([sparse_attention(q[:, :, t], k, v, index[:, :, t], kv_len[:, t], scale, softcap)
                            for t in range(q.shape[2])], dim=2)
    return sparse_attention_queries_ref(q, k, v, index, kv_len, scale, softcap)


__all__ = ["sparse_attention", "sparse_attention_ref", "sparse_attention_triton", "sparse_attention_queries",
           "sparse_attention_queries_ref"]
