"""Quest page metadata and page scores (Tang et al., 2024, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference").

The cache of each KV head is cut into pages of ``page_size`` consecutive slots. Per page Quest keeps
the channel-wise minimum and maximum of its keys; at a decode step it bounds each page's best
attention logit by

    score[b, h, p] = sum_d max(q[b, h, d] * kmin[b, h_kv, p, d], q[b, h, d] * kmax[b, h_kv, p, d])

(an upper bound of q·k over the page's keys) and reads only the top pages. Here one page set per
KV head is chosen (so k/v stay un-repeated): the page score of a KV head is the max over the query
heads of its GQA group.

Shapes: k [B, Hkv, S, D]; kv_len [B]; kmin, kmax [B, Hkv, P, D] with P = ceil(S / page_size);
q [B, Hq, D]; scores [B, Hkv, P] (pages at or past ceil(kv_len[b] / page_size) are -inf). The reference
also scores T queries per sequence at once (a verification of drafted tokens): q [B, Hq, T, D], kv_len
[B, T] -> [B, Hkv, T, P].

Kernels: ``_page_minmax_kernel`` (one program per (batch*kv head, page block); the slots of each page
past kv_len are ignored), ``_page_scores_kernel`` (one program per (batch*kv head, page block), all
query heads of the group in one tile).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, autotune_configs, launch, tl, triton, use_triton


def _check_pages(k, kv_len, page_size):
    if k.dim() != 4:
        raise ValueError(f"page_minmax: k must be [B, Hkv, S, D], got {tuple(k.shape)}")
    if kv_len.shape != (k.shape[0],):
        raise ValueError(f"page_minmax: kv_len must be [B={k.shape[0]}]")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive integer, got {page_size!r}")


def page_minmax_ref(k, kv_len, page_size: int, first_page: int = 0, last_page: int | None = None):
    """Channel-wise min and max of the keys of pages ``first_page .. last_page - 1`` ->
    (kmin, kmax) [B, Hkv, last - first, D] in fp32. Slots >= kv_len[b] are ignored; a page with no
    valid slot gets kmin = kmax = 0 (its score is masked anyway)."""
    _check_pages(k, kv_len, page_size)
    B, H, S, D = k.shape
    P = -(-S // page_size)
    last = P if last_page is None else last_page
    lo, hi = first_page * page_size, min(S, last * page_size)
    n = last - first_page
    kp = torch.zeros(B, H, n * page_size, D, dtype=torch.float32, device=k.device)
    kp[:, :, :hi - lo] = k[:, :, lo:hi].float()
    slot = lo + torch.arange(n * page_size, device=k.device)
    ok = (slot[None] < kv_len[:, None])[:, None, :, None]                          # [B, 1, n*ps, 1]
    kp = kp.view(B, H, n, page_size, D)
    ok = ok.view(B, 1, n, page_size, 1)
    kmin = kp.masked_fill(~ok, float("inf")).amin(3)
    kmax = kp.masked_fill(~ok, float("-inf")).amax(3)
    empty = ~ok.any(3)                                                              # [B, 1, n, 1]
    return kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0)


def page_scores_ref(q, kmin, kmax, kv_len, page_size: int):
    """Quest's per-page upper bound of q·k, max over each GQA group -> [B, Hkv, P] fp32. Also T queries per
    sequence at once: q [B, Hq, T, D] with kv_len [B, T] (query t's cache length) -> [B, Hkv, T, P].

    Computed as relu(q)·kmax + min(q, 0)·kmin, which is the bound's sum (kmin <= kmax channel by channel)
    as two matmuls, instead of materialising the [.., P, D] products."""
    multi = q.dim() == 4
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    T = q.shape[2] if multi else 1
    Hkv, P = kmin.shape[1], kmin.shape[2]
    G = Hq // Hkv
    qg = q.float().reshape(B, Hkv, G * T, D)                                        # (g, t) rows per KV head
    s = qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)
    s = s.view(B, Hkv, G, T, P).amax(2)                                              # [B, Hkv, T, P]
    n_pages = ((kv_len + page_size - 1) // page_size).reshape(B, 1, T, 1)
    s = s.masked_fill(torch.arange(P, device=q.device) >= n_pages, float("-inf"))
    return s if multi else s[:, :, 0]


if HAS_TRITON:

    def _page_configs(first_block: int) -> list:
        """Pages per program x warps; the first (the previous fixed launch) is the interpreter's only one."""
        first = (first_block, 4)
        return autotune_configs([triton.Config({"BLOCK_P": p}, num_warps=w)
                                 for p, w in [first] + [(p, w) for p in (8, 16, 32, 64) for w in (2, 4, 8)
                                                        if (p, w) != first]])

    @triton.autotune(configs=_page_configs(16), key=["PAGE", "D"])
    @triton.jit
    def _page_minmax_kernel(
        K, KMIN, KMAX, KVLEN,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_mb, stride_mh, stride_mp, stride_md,
        H, S, FIRST, NPAGES,
        PAGE: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_p = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kv_len = tl.load(KVLEN + b)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)                # page index relative to FIRST
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kmin = tl.full([BLOCK_P, BLOCK_D], float("inf"), tl.float32)
        kmax = tl.full([BLOCK_P, BLOCK_D], float("-inf"), tl.float32)
        base = K + b * stride_kb + h * stride_kh
        for i in range(0, PAGE):
            slot = (FIRST + offs_p) * PAGE + i
            ok = (offs_p < NPAGES) & (slot < kv_len) & (slot < S)
            x = tl.load(base + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                        mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            kmin = tl.where(ok[:, None], tl.minimum(kmin, x), kmin)
            kmax = tl.where(ok[:, None], tl.maximum(kmax, x), kmax)
        empty = kmin == float("inf")
        kmin = tl.where(empty, 0.0, kmin)
        kmax = tl.where(empty, 0.0, kmax)
        o = b * stride_mb + h * stride_mh + offs_p[:, None] * stride_mp + offs_d[None, :] * stride_md
        m = (offs_p[:, None] < NPAGES) & d_ok[None, :]
        tl.store(KMIN + o, kmin, mask=m)
        tl.store(KMAX + o, kmax, mask=m)

    @triton.autotune(configs=_page_configs(32), key=["PAGE", "GROUP", "D"])
    @triton.jit
    def _page_scores_kernel(
        Q, KMIN, KMAX, OUT, KVLEN,
        stride_qb, stride_qh, stride_qd,
        stride_mb, stride_mh, stride_mp, stride_md,
        stride_ob, stride_oh, stride_op,
        HKV, P,
        PAGE: tl.constexpr, GROUP: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_bk = tl.program_id(0)
        pid_p = tl.program_id(1)
        b = pid_bk // HKV
        kvh = pid_bk % HKV
        n_pages = (tl.load(KVLEN + b) + PAGE - 1) // PAGE
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        p_ok = offs_p < P
        d_ok = offs_d < D
        o = b * stride_mb + kvh * stride_mh + offs_p[:, None] * stride_mp + offs_d[None, :] * stride_md
        kmin = tl.load(KMIN + o, mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        kmax = tl.load(KMAX + o, mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        for g in range(0, GROUP):
            qh = tl.load(Q + b * stride_qb + (kvh * GROUP + g) * stride_qh + offs_d * stride_qd,
                         mask=d_ok, other=0.0).to(tl.float32)
            s = tl.sum(tl.maximum(qh[None, :] * kmin, qh[None, :] * kmax), 1)
            best = tl.maximum(best, s)
        best = tl.where(offs_p < n_pages, best, float("-inf"))
        tl.store(OUT + b * stride_ob + kvh * stride_oh + offs_p * stride_op, best, mask=p_ok)


def page_minmax_triton(k, kv_len, page_size: int, first_page: int = 0, last_page: int | None = None):
    _check_pages(k, kv_len, page_size)
    B, H, S, D = k.shape
    last = -(-S // page_size) if last_page is None else last_page
    n = last - first_page
    kmin = torch.empty(B, H, n, D, dtype=torch.float32, device=k.device)
    kmax = torch.empty_like(kmin)
    def grid(meta):
        return (B * H, triton.cdiv(max(n, 1), meta["BLOCK_P"]))

    _page_minmax_kernel[grid](
        k, kmin, kmax, kv_len.to(torch.int32),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        H, S, first_page, n,
        PAGE=page_size, D=D, BLOCK_D=triton.next_power_of_2(D))
    return kmin, kmax


def page_scores_triton(q, kmin, kmax, kv_len, page_size: int):
    B, Hq, D = q.shape
    Hkv, P = kmin.shape[1], kmin.shape[2]
    out = torch.empty(B, Hkv, P, dtype=torch.float32, device=q.device)
    def grid(meta):
        return (B * Hkv, triton.cdiv(max(P, 1), meta["BLOCK_P"]))

    _page_scores_kernel[grid](
        q, kmin, kmax, out, kv_len.to(torch.int32),
        q.stride(0), q.stride(1), q.stride(2),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        Hkv, P,
        PAGE=page_size, GROUP=Hq // Hkv, D=D, BLOCK_D=triton.next_power_of_2(D))
    return out


def page_minmax(k, kv_len, page_size: int, first_page: int = 0, last_page: int | None = None):
    if use_triton(k):
        return launch("page_minmax", page_minmax_triton, k, kv_len, page_size, first_page, last_page)
    return page_minmax_ref(k, kv_len, page_size, first_page, last_page)


def page_scores(q, kmin, kmax, kv_len, page_size: int):
    if q.dim() == 4:                  # T queries per sequence: the reference (the Triton kernel scores one)
        return page_scores_ref(q, kmin, kmax, kv_len, page_size)
    if use_triton(q):
        return launch("page_scores", page_scores_triton, q, kmin, kmax, kv_len, page_size)
    return page_scores_ref(q, kmin, kmax, kv_len, page_size)


__all__ = ["page_minmax", "page_minmax_ref", "page_minmax_triton", "page_scores", "page_scores_ref",
           "page_scores_triton"]
