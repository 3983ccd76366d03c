"""Cached causal attention: prefill at arbitrary cache offsets and single-token decode.

Semantics (shared by the kernels and the reference). For sequence ``b`` the new queries sit at
cache positions ``p = q_start[b] + t`` (t < Tq); query p attends key j when
``j <= p`` and ``j < kv_len[b]`` and (sliding window W) ``j > p - W``. Scores are
``scale * q·k``, optionally soft-capped ``softcap * tanh(s / softcap)`` before the softmax.
GQA: query head h reads kv head ``h // (Hq // Hkv)``; k/v are never repeated in memory.

Shapes: q [B, Hq, Tq, D]; k, v [B, Hkv, S, D] (the cache, S >= max kv_len); q_start, kv_len [B]
int; output [B, Hq, Tq, D] in q's dtype.

Kernels (FlashAttention-2 style online softmax):
- ``_attn_prefill_kernel``: one program per (query block, batch*query head); loops over the key
  blocks that the causal / window bounds allow for that query block.
- ``_attn_decode_kernel``: flash-decoding for Tq = 1: one program per (batch*kv head, key split);
  all query heads of a GQA group are processed together so each key is read once, and
  ``_attn_decode_combine_kernel`` merges the splits' partial softmax states.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, autotune_configs, launch, tl, triton, use_triton


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------
def attention_mask(q_len: int, s: int, q_start: torch.Tensor, kv_len: torch.Tensor,
                   window: int | None) -> torch.Tensor:
    """Boolean [B, 1, Tq, S] mask: True where query t of sequence b may read key j."""
    dev = q_start.device
    pos = q_start[:, None] + torch.arange(q_len, device=dev)[None, :]            # [B, Tq]
    j = torch.arange(s, device=dev)[None, None, :]                                 # [1, 1, S]
    ok = (j <= pos[:, :, None]) & (j < kv_len[:, None, None])
    if window is not None:
        ok &= j > pos[:, :, None] - window
    return ok[:, None]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: torch.Tensor,
                  kv_len: torch.Tensor, scale: float, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """Reference (and the CPU path): fp32 math through torch SDPA with GQA, explicit mask.

    The plain causal case (all sequences start at 0 and read exactly their new keys, no window)
    uses SDPA's ``is_causal`` kernel, which is what HF runs for an unpadded prompt. Under
    ``torch.compile`` the masked form is always taken: the shortcuts test tensor values on the host.
    """
    B, Hq, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out_dtype = q.dtype
    qf, kf, vf = q.float(), k.float(), v.float()
    if softcap is not None:
        g = Hq // Hkv
        s_ = torch.einsum("bkgtd,bksd->bkgts", qf.view(B, Hkv, g, Tq, D), kf) * scale
        s_ = softcap * torch.tanh(s_ / softcap)
        mask = attention_mask(Tq, S, q_start, kv_len, window)[:, :, None]          # [B,1,1,Tq,S]
        p = torch.softmax(s_.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        out = torch.einsum("bkgts,bksd->bkgtd", p, vf).reshape(B, Hq, Tq, D)
        return out.to(out_dtype)
    gqa = Hq != Hkv
    if Tq == 1:
        # decode: every sequence reads keys [lo, min(kv_len, q_start + 1)); when that is all S keys (no
        # padding, the query is the last key, no window cut) no mask is needed. Otherwise the GQA group's queries become the query axis
        # of one SDPA per kv head, so the [B, 1, 1, S] mask broadcasts without repeating k/v.
        if ((window is None or window >= S) and not torch.compiler.is_compiling() and bool((kv_len == S).all())
                and bool((q_start >= S - 1).all())):
            out = F.scaled_dot_product_attention(qf, kf, vf, scale=scale, enable_gqa=gqa)
        else:
            mask = attention_mask(1, S, q_start, kv_len, window)
            qg = qf.view(B, Hkv, Hq // Hkv, D)
            out = F.scaled_dot_product_attention(qg, kf, vf, attn_mask=mask, scale=scale).view(B, Hq, 1, D)
        return out.to(out_dtype)
    plain = (window is None and S == Tq and not torch.compiler.is_compiling() and bool((q_start == 0).all())
             and bool((kv_len == Tq).all()))
    if plain:
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = attention_mask(Tq, S, q_start, kv_len, window)
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _softcap(s, SOFTCAP: tl.constexpr):
        # softcap * tanh(s / softcap), tanh written with exp2 (no tl.tanh on every backend)
        x = s / SOFTCAP
        e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
        t = (1.0 - e) / (1.0 + e)
        return SOFTCAP * tl.where(x >= 0, t, -t)

    @triton.jit
    def _scores_log2(q, kt, sm_scale_log2e, SOFTCAP: tl.constexpr, SCALE: tl.constexpr):
        # scores in log2 units (the kernels use exp2), soft-capped when the model does
        s = tl.dot(q, kt, out_dtype=tl.float32)
        if SOFTCAP > 0:
            return _softcap(s * SCALE, SOFTCAP) * 1.4426950408889634
        return s * sm_scale_log2e

    @triton.jit
    def _online_softmax_step(s, m_i, l_i):
        # one key block of the online softmax: new running max and sum, the block's unnormalised
        # probabilities, and the factor that rescales what was accumulated so far
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), p, alpha

    def _prefill_configs() -> list:
        """Tiles x warps x pipeline stages; the first is the default (and the interpreter's only one)."""
        return autotune_configs([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                 for m in (64, 128, 32) for n in (64, 32, 128) for w in (4, 8) for s in (2, 3)
                                 if m * n <= 128 * 64 and not (w == 8 and m * n < 64 * 64)])

    def _prune_prefill(configs, named_args, **kwargs):
        """Wide heads need smaller key tiles (registers / shared memory scale with BLOCK_N * D)."""
        d = named_args["D"] if "D" in named_args else kwargs["D"]
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * max(d, 64) <= 128 * 128 and
                c.kwargs["BLOCK_M"] * max(d, 64) <= 128 * 128]
        return kept or configs[-1:]

    def _decode_configs() -> list:
        """BLOCK_N is part of the split plan (``_decode_splits``), so only warps and stages are tuned."""
        return autotune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 2, 8) for s in (2, 3)])

    def _combine_configs() -> list:
        return autotune_configs([triton.Config({}, num_warps=w) for w in (4, 1, 2)])

    @triton.autotune(configs=_prefill_configs(), key=["D", "GROUP"],
                     prune_configs_by={"early_config_prune": _prune_prefill})
    @triton.jit
    def _attn_prefill_kernel(
        Q, K, V, O, QSTART, KVLEN,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        Tq, HQ, sm_scale_log2e,
        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HQ
        h = pid_bh % HQ
        kvh = h // GROUP
        q_start = tl.load(QSTART + b)
        kv_len = tl.load(KVLEN + b)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0)
        pos = q_start + offs_m                              # cache position of each query

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        hi = tl.minimum(kv_len, q_start + (pid_m + 1) * BLOCK_M)
        lo = 0
        if WINDOW > 0:
            lo = tl.maximum(0, q_start + pid_m * BLOCK_M - WINDOW + 1)
            lo = (lo // BLOCK_N) * BLOCK_N
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=(offs_n[None, :] < kv_len) & d_ok[:, None], other=0.0)
            s = _scores_log2(q, kt, sm_scale_log2e, SOFTCAP, SCALE)
            ok = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] < kv_len)
            if WINDOW > 0:
                ok = ok & (offs_n[None, :] > pos[:, None] - WINDOW)
            m_new, l_i, p, alpha = _online_softmax_step(tl.where(ok, s, float("-inf")), m_i, l_i)
            vt = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                         mask=(offs_n[:, None] < kv_len) & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, out_dtype=tl.float32)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < Tq) & d_ok[None, :])

    @triton.autotune(configs=_decode_configs(), key=["D", "GROUP", "BLOCK_N"])
    @triton.jit
    def _attn_decode_kernel(
        Q, K, V, MPART, LPART, OPART, QSTART, KVLEN,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        HKV, SPLIT_LEN, NSPLIT, sm_scale_log2e,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
    ):
        pid_bk = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bk // HKV
        kvh = pid_bk % HKV
        pos = tl.load(QSTART + b)                           # the single query's cache position
        kv_len = tl.minimum(tl.load(KVLEN + b), pos + 1)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < GROUP
        d_ok = offs_d < D
        heads = kvh * GROUP + offs_g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)

        lo_all = 0
        if WINDOW > 0:
            lo_all = tl.maximum(0, pos - WINDOW + 1)
        lo = tl.maximum(lo_all, pid_s * SPLIT_LEN)
        hi = tl.minimum(kv_len, (pid_s + 1) * SPLIT_LEN)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = _scores_log2(q, kt, sm_scale_log2e, SOFTCAP, SCALE)
            m_new, l_i, p, alpha = _online_softmax_step(tl.where(n_ok[None, :], s, float("-inf")), m_i, l_i)
            vt = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, out_dtype=tl.float32)
            m_i = m_new
        # partial state of this split: [B*HKV, NSPLIT, BLOCK_G(, BLOCK_D)]
        row = (pid_bk * NSPLIT + pid_s) * BLOCK_G + offs_g
        tl.store(MPART + row, m_i)
        tl.store(LPART + row, l_i)
        tl.store(OPART + row[:, None] * BLOCK_D + offs_d[None, :], acc)

    @triton.autotune(configs=_combine_configs(), key=["D", "GROUP", "BLOCK_S"])
    @triton.jit
    def _attn_decode_combine_kernel(
        MPART, LPART, OPART, O,
        stride_ob, stride_oh, stride_od,
        HKV, NSPLIT,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_bk = tl.program_id(0)
        b = pid_bk // HKV
        kvh = pid_bk % HKV
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < NSPLIT
        rows = (pid_bk * NSPLIT + offs_s[:, None]) * BLOCK_G + offs_g[None, :]       # [S, G]
        m = tl.load(MPART + rows, mask=s_ok[:, None], other=float("-inf"))
        l = tl.load(LPART + rows, mask=s_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)                                                         # [G]
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe[None, :])                                             # [S, G]
        w = tl.where(s_ok[:, None], w, 0.0)
        l_tot = tl.sum(w * l, 0)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for s in range(0, NSPLIT):
            row = (pid_bk * NSPLIT + s) * BLOCK_G + offs_g
            ms = tl.load(MPART + row)
            o = tl.load(OPART + row[:, None] * BLOCK_D + offs_d[None, :])
            acc += o * tl.exp2(ms - m_safe)[:, None]
        acc = acc / tl.where(l_tot == 0.0, 1.0, l_tot)[:, None]
        heads = kvh * GROUP + offs_g
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 acc.to(O.dtype.element_ty), mask=(offs_g[:, None] < GROUP) & (offs_d[None, :] < D))


def _check(q, k, v, q_start, kv_len):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q must be [B, Hq, Tq, D] and k, v [B, Hkv, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(f"attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)} (batch, head dim, "
                         "and Hq divisible by Hkv)")
    if q_start.shape != (B,) or kv_len.shape != (B,):
        raise ValueError(f"attention: q_start and kv_len must be [B={B}] tensors")
    if not (q.device == k.device == v.device == q_start.device == kv_len.device):
        raise ValueError("attention: all tensors must be on one device")


@functools.lru_cache(maxsize=None)
def _decode_programs(device: torch.device) -> int:
    """How many decode programs fill ``device``: 4 per SM on a GPU (one program per SM leaves each SM waiting
    on its loads: the H200 run read 6-10% of HBM bandwidth at head dim 64 with ~128 programs on 132 SMs);
    128 elsewhere (the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 128


def _decode_splits(q, B: int, Hkv: int, n_keys: int, block_n: int, min_split: int, block_g: int, block_d: int):
    """Split-K plan of the decode kernels: keys per split (at least ``min_split``, more splits when
    B * Hkv programs alone cannot fill the device: ``_decode_programs``) and the fp32 buffers of each
    split's partial softmax state (running max, sum, unnormalised output) that the combine kernel merges."""
    programs = _decode_programs(q.device)
    split_len = max(min_split, triton.cdiv(n_keys, max(1, programs // max(1, B * Hkv))))
    split_len = triton.cdiv(split_len, block_n) * block_n
    nsplit = triton.cdiv(max(n_keys, 1), split_len)
    mpart = torch.empty(B * Hkv * nsplit * block_g, device=q.device, dtype=torch.float32)
    lpart = torch.empty_like(mpart)
    opart = torch.empty(B * Hkv * nsplit * block_g * block_d, device=q.device, dtype=torch.float32)
    return split_len, nsplit, mpart, lpart, opart


def attention_triton(q, k, v, q_start, kv_len, scale, window=None, softcap=None):
    """Launch the Triton kernel (decode kernel for Tq == 1, prefill kernel otherwise)."""
    _check(q, k, v, q_start, kv_len)
    B, Hq, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_d = triton.next_power_of_2(D)
    q_start = q_start.to(torch.int32)
    kv_len = kv_len.to(torch.int32)
    out = torch.empty_like(q)
    consts = dict(WINDOW=int(window or 0), SOFTCAP=float(softcap or 0.0), SCALE=float(scale))
    if Tq == 1:
        block_g = max(16, triton.next_power_of_2(group))
        block_n = 64 if D <= 128 else 32
        # split the keys so that B*Hkv*splits fills the machine; each split at least 4 key blocks
        split_len, nsplit, mpart, lpart, opart = _decode_splits(q, B, Hkv, S, block_n, 4 * block_n, block_g, block_d)
        _attn_decode_kernel[(B * Hkv, nsplit)](
            q, k, v, mpart, lpart, opart, q_start, kv_len,
            q.stride(0), q.stride(1), q.stride(3),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            Hkv, split_len, nsplit, scale * 1.4426950408889634,
            GROUP=group, BLOCK_G=block_g, D=D, BLOCK_D=block_d, BLOCK_N=block_n, **consts)
        _attn_decode_combine_kernel[(B * Hkv,)](
            mpart, lpart, opart, out, out.stride(0), out.stride(1), out.stride(3), Hkv, nsplit,
            GROUP=group, BLOCK_G=block_g, D=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(nsplit))
        return out

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)

    _attn_prefill_kernel[grid](
        q, k, v, out, q_start, kv_len,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        Tq, Hq, scale * 1.4426950408889634,
        GROUP=group, D=D, BLOCK_D=block_d, **consts)
    return out


def attention(q, k, v, q_start, kv_len, scale, window=None, softcap=None):
    """Cached attention, dispatched by device: Triton on CUDA, the torch reference on CPU."""
    if use_triton(q):
        return launch("attention", attention_triton, q, k, v, q_start, kv_len, scale, window, softcap)
    return attention_ref(q, k, v, q_start, kv_len, scale, window, softcap)


def attention_flops(q_len: int, kv_len: int, num_heads: int, head_dim: int) -> float:
    """FLOPs of causal attention for q_len new tokens at the end of kv_len keys (QK^T and PV)."""
    past = kv_len - q_len
    pairs = q_len * past + q_len * (q_len + 1) / 2
    return 4.0 * pairs * num_heads * head_dim


__all__ = ["attention", "attention_ref", "attention_triton", "attention_mask", "attention_flops"]
