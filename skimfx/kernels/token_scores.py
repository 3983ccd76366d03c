"""Token importance scores from a window of queries, and top-k token selection.

``token_scores`` computes, for the last W query positions of a layer, how strongly they attend to
every key, without materialising the T x T attention matrix (only W x BLOCK_N tiles):

    s[b, h, i, j] = scale * q[b, h, i] . k[b, h // G, j]     for j <= q_pos[b] + i and j < kv_len[b]
    p = softmax_j(s)  (softmax=True)   or   p = s with invisible keys contributing 0   (softmax=False)
    r[b, h, j] = sum_i p[b, h, i, j]                           (sum over the observation window)
    heads: "sum" | "mean" | "max" over h -> [B, S], or "none" -> [B, Hq, S]
    pool: "avg" | "max" over j with a window of ``pool_kernel`` (stride 1, same length; avg divides by
          the kernel size like ``F.avg_pool1d``), or None
    positions j >= kv_len[b] come out as -inf (never selected).

These are the scoring rules of GemFilter (last query, no softmax, sum over heads, avg-pool 5),
PromptDistill (last query, scaled, mean over heads, optional avg-pool 5) and SnapKV (window of
queries, softmax, pooled, per KV head after a mean over the GQA group).

Kernels: ``_softmax_stats_kernel`` (first pass over K: row max and sum per window query, softmax
only), ``_scores_kernel`` (second pass: probabilities summed over the window, aggregated over heads),
``_pool_kernel`` (1-D pooling along the key axis).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, autotune_configs, launch, tl, triton, use_triton
from .attention import attention_triton

HEAD_AGG = ("sum", "mean", "max", "none")
POOLS = (None, "avg", "max")


def _check(q, k, q_pos, kv_len, heads, pool, pool_kernel):
    if heads not in HEAD_AGG:
        raise ValueError(f"heads must be one of {HEAD_AGG}, got {heads!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool is not None and (pool_kernel < 1 or pool_kernel % 2 == 0):
        raise ValueError(f"pool_kernel must be odd and >= 1, got {pool_kernel}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or q.shape[1] % k.shape[1]:
        raise ValueError(f"token_scores: q [B, Hq, W, D] and k [B, Hkv, S, D] with Hq divisible by Hkv; "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    B = q.shape[0]
    if q_pos.shape != (B,) or kv_len.shape != (B,):
        raise ValueError(f"token_scores: q_pos and kv_len must be [B={B}]")


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def token_scores_ref(q, k, q_pos, kv_len, scale: float, *, softmax: bool = False, heads: str = "sum",
                     pool: str | None = None, pool_kernel: int = 5) -> torch.Tensor:
    _check(q, k, q_pos, kv_len, heads, pool, pool_kernel)
    B, Hq, W, D = q.shape
    S = k.shape[2]
    Hkv = k.shape[1]
    # the GQA group's queries share one matmul with their KV head (k is never repeated)
    s = torch.matmul(q.float().reshape(B, Hkv, (Hq // Hkv) * W, D), k.float().transpose(-1, -2))
    s = s.view(B, Hq, W, S) * scale
    j = torch.arange(S, device=q.device)
    qp = q_pos[:, None] + torch.arange(W, device=q.device)[None]                 # [B, W]
    vis = (j[None, None] <= qp[:, :, None]) & (j[None, None] < kv_len[:, None, None])  # [B, W, S]
    vis = vis[:, None]
    if softmax:
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    else:
        p = s.masked_fill(~vis, 0.0)
    r = p.sum(dim=2)                                                              # [B, Hq, S]
    if heads == "sum":
        r = r.sum(1)
    elif heads == "mean":
        r = r.mean(1)
    elif heads == "max":
        r = r.amax(1)
    valid = j[None] < kv_len[:, None]                                             # [B, S]
    if heads == "none":
        valid = valid[:, None]
    r = r.masked_fill(~valid, 0.0)
    if pool is not None and pool_kernel > 1:
        flat = r.reshape(-1, 1, S)
        if pool == "avg":
            flat = F.avg_pool1d(flat, pool_kernel, stride=1, padding=pool_kernel // 2)
        else:
            flat = F.max_pool1d(flat.masked_fill(~valid.expand_as(r).reshape(-1, 1, S), float("-inf")),
                                pool_kernel, stride=1, padding=pool_kernel // 2)
        r = flat.reshape(r.shape)
    return r.masked_fill(~valid, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    def _key_tile_configs() -> list:
        """Key tiles x warps; the first is the default (and the interpreter's only one)."""
        return autotune_configs([triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                                 for n in (64, 32, 128) for w in (4, 8) for s in (2, 3)])

    def _prune_key_tiles(configs, named_args, **kwargs):
        d = named_args["D"] if "D" in named_args else kwargs["D"]
        return [c for c in configs if c.kwargs["BLOCK_N"] * max(d, 64) <= 128 * 128] or configs[-1:]

    @triton.autotune(configs=_key_tile_configs(), key=["D", "GROUP", "BLOCK_W"],
                     prune_configs_by={"early_config_prune": _prune_key_tiles})
    @triton.jit
    def _softmax_stats_kernel(
        Q, K, M, L, QPOS, KVLEN,
        stride_qb, stride_qh, stride_qw, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        HQ, W, scale_log2e,
        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // HQ
        h = pid % HQ
        q_pos = tl.load(QPOS + b)
        kv_len = tl.load(KVLEN + b)
        offs_w = tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_w[:, None] * stride_qw + offs_d[None, :] * stride_qd,
                    mask=(offs_w[:, None] < W) & (offs_d[None, :] < D), other=0.0)
        pos = q_pos + offs_w
        m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_W], tl.float32)
        k_base = K + b * stride_kb + (h // GROUP) * stride_kh
        hi = tl.minimum(kv_len, q_pos + W)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=(offs_n[None, :] < kv_len) & (offs_d[:, None] < D), other=0.0)
            s = tl.dot(q, kt, out_dtype=tl.float32) * scale_log2e
            ok = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] < kv_len)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        tl.store(M + pid * BLOCK_W + offs_w, m_i)
        tl.store(L + pid * BLOCK_W + offs_w, l_i)

    @triton.autotune(configs=_key_tile_configs(), key=["D", "GROUP", "BLOCK_W", "SOFTMAX", "AGG"],
                     prune_configs_by={"early_config_prune": _prune_key_tiles})
    @triton.jit
    def _scores_kernel(
        Q, K, M, L, OUT, QPOS, KVLEN,
        stride_qb, stride_qh, stride_qw, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        HQ, W, S, scale_log2e,
        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
        SOFTMAX: tl.constexpr, AGG: tl.constexpr,       # AGG: 0 none, 1 sum, 2 mean, 3 max
    ):
        b = tl.program_id(0)
        pid_n = tl.program_id(1)
        q_pos = tl.load(QPOS + b)
        kv_len = tl.load(KVLEN + b)
        offs_w = tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        pos = q_pos + offs_w
        ok = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] < kv_len) & (offs_w[:, None] < W)
        if AGG == 3:
            agg = tl.full([BLOCK_N], float("-inf"), tl.float32)
        else:
            agg = tl.zeros([BLOCK_N], tl.float32)
        for h in range(0, HQ):
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_w[:, None] * stride_qw + offs_d[None, :] * stride_qd,
                        mask=(offs_w[:, None] < W) & (offs_d[None, :] < D), other=0.0)
            kt = tl.load(K + b * stride_kb + (h // GROUP) * stride_kh + offs_n[None, :] * stride_ks
                         + offs_d[:, None] * stride_kd,
                         mask=(offs_n[None, :] < kv_len) & (offs_d[:, None] < D), other=0.0)
            s = tl.dot(q, kt, out_dtype=tl.float32) * scale_log2e
            if SOFTMAX:
                m = tl.load(M + (b * HQ + h) * BLOCK_W + offs_w)
                l = tl.load(L + (b * HQ + h) * BLOCK_W + offs_w)
                m = tl.where(m == float("-inf"), 0.0, m)
                l = tl.where(l == 0.0, 1.0, l)
                p = tl.exp2(s - m[:, None]) / l[:, None]
            else:
                p = s / 1.4426950408889634              # back to natural units: scale * q.k
            p = tl.where(ok, p, 0.0)
            r = tl.sum(p, 0)                             # [BLOCK_N], summed over the window
            if AGG == 0:
                tl.store(OUT + (b * HQ + h) * S + offs_n, r, mask=offs_n < S)
            elif AGG == 3:
                agg = tl.maximum(agg, r)
            else:
                agg += r
        if AGG != 0:
            if AGG == 2:
                agg = agg / HQ
            tl.store(OUT + b * S + offs_n, agg, mask=offs_n < S)

    def _pool_configs() -> list:
        return autotune_configs([triton.Config({"BLOCK": b}, num_warps=w)
                                 for b in (256, 512, 1024, 128) for w in (4, 2, 8) if b >= 32 * w])

    @triton.autotune(configs=_pool_configs(), key=["KERNEL", "MAX"])
    @triton.jit
    def _pool_kernel(
        X, OUT, KVLEN, S, ROWS_PER_B,
        KERNEL: tl.constexpr, MAX: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        kv_len = tl.load(KVLEN + row // ROWS_PER_B)
        HALF: tl.constexpr = KERNEL // 2
        if MAX:
            acc = tl.full([BLOCK], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
        for o in tl.static_range(0, KERNEL):
            j = offs + (o - HALF)
            inside = (j >= 0) & (j < S)
            x = tl.load(X + row * S + j, mask=inside, other=0.0)
            x = tl.where(j < kv_len, x, 0.0)             # beyond the sequence: no attention
            if MAX:
                acc = tl.maximum(acc, tl.where(inside & (j < kv_len), x, float("-inf")))
            else:
                acc += x
        if not MAX:
            acc = acc / KERNEL
        acc = tl.where(offs < kv_len, acc, float("-inf"))
        tl.store(OUT + row * S + offs, acc, mask=offs < S)


def token_scores_triton(q, k, q_pos, kv_len, scale: float, *, softmax: bool = False, heads: str = "sum",
                        pool: str | None = None, pool_kernel: int = 5) -> torch.Tensor:
    _check(q, k, q_pos, kv_len, heads, pool, pool_kernel)
    B, Hq, W, D = q.shape
    S = k.shape[2]
    group = Hq // k.shape[1]
    block_w = max(16, triton.next_power_of_2(W))
    block_d = triton.next_power_of_2(D)
    q_pos = q_pos.to(torch.int32)
    kv_len = kv_len.to(torch.int32)
    scale_log2e = scale * 1.4426950408889634
    m = torch.empty(B * Hq * block_w, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    strides = (q.stride(0), q.stride(1), q.stride(2), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3))
    if softmax:
        _softmax_stats_kernel[(B * Hq,)](q, k, m, l, q_pos, kv_len, *strides, Hq, W, scale_log2e,
                                         GROUP=group, D=D, BLOCK_D=block_d, BLOCK_W=block_w)
    agg = {"none": 0, "sum": 1, "mean": 2, "max": 3}[heads]
    rows = B * Hq if agg == 0 else B
    raw = torch.empty(rows, S, device=q.device, dtype=torch.float32)
    _scores_kernel[lambda meta: (B, triton.cdiv(S, meta["BLOCK_N"]))](
        q, k, m, l, raw, q_pos, kv_len, *strides, Hq, W, S, scale_log2e,
        GROUP=group, D=D, BLOCK_D=block_d, BLOCK_W=block_w, SOFTMAX=softmax, AGG=agg)
    out = torch.empty_like(raw)
    kernel = pool_kernel if pool is not None else 1
    _pool_kernel[lambda meta: (rows, triton.cdiv(S, meta["BLOCK"]))](raw, out, kv_len, S, rows // B, KERNEL=kernel,
                                                                      MAX=pool == "max")
    return out.view(B, Hq, S) if agg == 0 else out


def token_scores(q, k, q_pos, kv_len, scale: float, *, softmax: bool = False, heads: str = "sum",
                 pool: str | None = None, pool_kernel: int = 5) -> torch.Tensor:
    """Scores [B, S] (or [B, Hq, S] with heads="none"), dispatched by device (module docstring)."""
    if use_triton(q):
        return launch("token_scores", _token_scores_positional, q, k, q_pos, kv_len, scale, softmax, heads, pool,
                      pool_kernel)
    return token_scores_ref(q, k, q_pos, kv_len, scale, softmax=softmax, heads=heads, pool=pool,
                            pool_kernel=pool_kernel)


def decode_attention_scores_ref(q, k, v, kv_len, scale: float, softcap: float | None = None):
    """One decode query per sequence (q [B, Hq, 1, D] at position ``kv_len - 1``): the attention output
    [B, Hq, 1, D] and its softmax probabilities summed over all query heads [B, S] (0 from ``kv_len`` on),
    i.e. ``attention(...)`` and ``token_scores(..., softmax=True, heads="sum")`` from one pass over the keys.

    Why: a DELTA selection layer needs both; computed apart they read the layer's keys twice (on 2 CPU
    cores at 4k/8k keys: SDPA 1.1/2.2 ms plus scores 0.8/1.3 ms a layer, this 0.9/1.7 ms)."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    s = torch.matmul(q.float().reshape(B, Hkv, Hq // Hkv, D), k.float().transpose(-1, -2)) * scale   # [B,Hkv,g,S]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    valid = torch.arange(S, device=q.device)[None] < kv_len[:, None]                                    # [B, S]
    if torch.compiler.is_compiling() or not bool(valid.all()):
        s = s.masked_fill(~valid[:, None, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.matmul(p, v.float()).reshape(B, Hq, 1, D).to(q.dtype)
    return out, p.sum(dim=(1, 2))


def decode_attention_scores(q, k, v, kv_len, scale: float, softcap: float | None = None):
    """(output, head-summed probabilities) of one decode step (``decode_attention_scores_ref``). On CUDA:
    the flash-decoding kernel and the token-scores kernel (two passes over the keys; one kernel would
    still need the softmax statistics before it could write probabilities). The token-scores kernel has
    no soft-capping, so soft-capped attention takes the reference."""
    if use_triton(q) and softcap is None:
        return launch("decode_attention_scores", decode_attention_scores_triton, q, k, v, kv_len, scale, softcap)
    return decode_attention_scores_ref(q, k, v, kv_len, scale, softcap)


def decode_attention_scores_triton(q, k, v, kv_len, scale: float, softcap: float | None = None):
    if softcap is not None:
        raise ValueError("decode_attention_scores_triton: the token-scores kernel has no soft-capping; "
                         "call decode_attention_scores (it takes the reference for soft-capped attention)")
    out = attention_triton(q, k, v, kv_len - 1, kv_len, scale)
    return out, token_scores_triton(q, k, kv_len - 1, kv_len, scale, softmax=True, heads="sum").clamp(min=0.0)


def _token_scores_positional(q, k, q_pos, kv_len, scale, softmax, heads, pool, pool_kernel):
    return token_scores_triton(q, k, q_pos, kv_len, scale, softmax=softmax, heads=heads, pool=pool,
                               pool_kernel=pool_kernel)


__all__ = ["token_scores", "decode_attention_scores", "decode_attention_scores_ref", "decode_attention_scores_triton", "token_scores_ref", "token_scores_triton", "HEAD_AGG",
           "POOLS"]
