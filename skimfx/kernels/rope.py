"""Rotary position embedding, rotate-half convention (Llama, Gemma, Qwen, SmolLM).

``rope(q [B, Hq, T, D], k [B, Hkv, T, D], cos, sin [B or 1, T, D]) -> (q_out, k_out)`` with
``out = x * cos + rotate_half(x) * sin`` and ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``:
for ``i < D/2``, ``out[i] = x[i] cos[i] - x[i + D/2] sin[i]`` and
``out[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]``. cos/sin broadcast over heads, and
over the batch when their batch dim is 1. Math in fp32; outputs are new contiguous
``[B, H, T, D]`` tensors in the inputs' dtype. q and k may be strided views (e.g. the transpose of
the projections' ``[B, T, H, D]``), which are read in place.

Kernel: one launch for q and k. A program owns one (b, t) and a block of ``BLOCK_H`` heads: the
first ``cdiv(Hq, BLOCK_H)`` head blocks are q's, the rest k's, so cos/sin are read once per block
and both tensors rotate in the same grid. ``BLOCK_H`` and ``num_warps`` are tuned per (D, Hq, Hkv,
(b, t)-count bucket, dtypes).
"""
from __future__ import annotations

import functools

import torch

from ._triton import HAS_TRITON, autotune_configs, launch, row_bucket, tl, triton, use_triton


def _check(q, k, cos, sin):
    # shapes and dtypes only (cheap next to a decode step's few-microsecond ops); a tensor on the
    # wrong device fails in the first torch op anyway, and rope_triton checks devices itself
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        raise ValueError(f"rope: q, k must be [B, H, T, D] and cos, sin [B or 1, T, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"rope: k {tuple(k.shape)} does not fit q {tuple(q.shape)} (batch, length and head dim "
                         "must match)")
    if D % 2:
        raise ValueError(f"rope: the head dim must be even, got D={D}")
    if cos.shape != sin.shape or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"rope: cos and sin must both be [B={B} or 1, T={T}, D={D}], got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if (q.dtype != k.dtype or not q.dtype.is_floating_point or not cos.dtype.is_floating_point
            or not sin.dtype.is_floating_point):
        raise ValueError(f"rope: q and k must share one floating-point dtype and cos, sin be floating-point; got "
                         f"{q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}")


# ----------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _half_signs(d: int, device: torch.device) -> torch.Tensor:
    """[D] fp32: -1 on the first half, +1 on the second, so rotate_half(x) == roll(x, D/2) * signs."""
    signs = torch.ones(d, device=device)
    signs[:d // 2] = -1.0
    return signs


def _rope_one(x, cos, sin_signed, half):
    # rotate_half(x) * sin == roll(x, D/2) * (sign * sin) exactly (a sign flip rounds nothing), and the
    # two products are rounded separately before the add, as in HF: fp32 results are bit-identical
    r = torch.roll(x, half, -1)
    if r.dtype not in (torch.float32, torch.float64):
        r = r.float()
    r.mul_(sin_signed).add_(x * cos)
    return r if r.dtype == x.dtype else r.to(x.dtype)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D], k [B, Hkv, T, D] (any strides), cos, sin [B or 1, T, D] -> (q_out, k_out),
    contiguous [B, H, T, D] in q's dtype, computed in fp32."""
    _check(q, k, cos, sin)
    D = q.shape[-1]
    c = (cos if cos.dtype == torch.float32 else cos.float()).unsqueeze(1)
    # rotate_half's sign folded into the (small, shared) sin table once; the product is fp32 even
    # for a half table
    signs = _half_signs.__wrapped__(D, sin.device) if torch.compiler.is_compiling() else _half_signs(D, sin.device)
    s = (sin * signs).unsqueeze(1)
    return _rope_one(q, c, s, D // 2), _rope_one(k, c, s, D // 2)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
# Launch configurations are data: (BLOCK_H heads per program, num_warps), at most 8 head-warps per
# program. The first entry is the one the interpreter runs: several heads per program, so both the
# head mask and the q/k split inside the grid are exercised by the tests (Hq = 9, Hkv = 3).
_HEADS = (4, 1, 2, 8, 16)
_WARPS = (1, 2, 4, 8)
_MAX_TILE = 8192       # fp32 elements of one program's [BLOCK_H, D] tile


def _configs() -> list:
    return autotune_configs([triton.Config({"BLOCK_H": heads}, num_warps=warps)
                             for heads in _HEADS for warps in _WARPS if warps <= 2 * heads and heads * warps <= 32])


def _prune(configs, named_args, **kwargs):
    """Drop head blocks far wider than the tensors' head counts (all lanes of the extra heads are
    masked) and tiles too large for the registers; one head per program is the fallback."""
    heads = triton.next_power_of_2(max(named_args["HQ"], named_args["HKV"]))
    d = triton.next_power_of_2(named_args["D"])
    kept = [c for c in configs if c.kwargs["BLOCK_H"] <= heads and c.kwargs["BLOCK_H"] * d <= _MAX_TILE]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_H"], c.num_warps))]



if HAS_TRITON:

    @triton.jit
    def _rotate_heads(src, dst, h0, n_heads, stride_h, stride_d, dst_stride_h, cos1, cos2, sin1, sin2,
                      HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # heads [h0, h0 + BLOCK_H) of one (b, t) row: src/dst point at head 0, d 0 of that row
        heads = h0 + tl.arange(0, BLOCK_H)
        i = tl.arange(0, BLOCK_HALF)
        ok = (heads < n_heads)[:, None] & (i < HALF)[None, :]
        heads = heads.to(tl.int64)
        x_ptr = src + heads[:, None] * stride_h + i[None, :] * stride_d
        x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF * stride_d, mask=ok, other=0.0).to(tl.float32)
        o_ptr = dst + heads[:, None] * dst_stride_h + i[None, :]
        tl.store(o_ptr, (x1 * cos1 - x2 * sin1).to(dst.dtype.element_ty), mask=ok)
        tl.store(o_ptr + HALF, (x2 * cos2 + x1 * sin2).to(dst.dtype.element_ty), mask=ok)

    # ROW_BUCKET only keys the autotuner (launch shape), so it must not cause recompiles
    @triton.autotune(configs=_configs(), key=["D", "HQ", "HKV", "ROW_BUCKET"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit(do_not_specialize=["ROW_BUCKET"])
    def _rope_kernel(
        Q, K, COS, SIN, QO, KO,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_cb, stride_ct, stride_cd,
        stride_sb, stride_st, stride_sd,
        T, HQ, HKV, D, ROW_BUCKET,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid_bt = tl.program_id(0)
        pid_h = tl.program_id(1)
        b = (pid_bt // T).to(tl.int64)
        t = (pid_bt % T).to(tl.int64)

        # cos/sin of this (b, t), read once for all the block's heads; stride_cb / stride_sb are 0
        # when they broadcast over the batch
        i = tl.arange(0, BLOCK_HALF)
        i_ok = i < HALF
        c_row = COS + b * stride_cb + t * stride_ct
        s_row = SIN + b * stride_sb + t * stride_st
        cos1 = tl.load(c_row + i * stride_cd, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(c_row + (i + HALF) * stride_cd, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(s_row + i * stride_sd, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(s_row + (i + HALF) * stride_sd, mask=i_ok, other=0.0).to(tl.float32)[None, :]

        # q's head blocks come first, then k's; a block never mixes the two. Each branch does its
        # own loads and stores (nothing flows out of it), so q and k keep their own specialised
        # strides. Outputs are contiguous [B, H, T, D]: head stride T * D.
        q_blocks = tl.cdiv(HQ, BLOCK_H)
        if pid_h < q_blocks:
            _rotate_heads(Q + b * stride_qb + t * stride_qt, QO + (b * HQ * T + t) * D, pid_h * BLOCK_H, HQ,
                          stride_qh, stride_qd, T * D, cos1, cos2, sin1, sin2, HALF, BLOCK_HALF, BLOCK_H)
        else:
            _rotate_heads(K + b * stride_kb + t * stride_kt, KO + (b * HKV * T + t) * D,
                          (pid_h - q_blocks) * BLOCK_H, HKV, stride_kh, stride_kd, T * D,
                          cos1, cos2, sin1, sin2, HALF, BLOCK_HALF, BLOCK_H)


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, cos, sin)
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError("rope: all tensors must be on one device")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T == 0:
        return qo, ko
    # a batch dim of 1 broadcasts: stride 0 reads row b = 0 for every b
    sc = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2))
    ss = (0 if sin.shape[0] == 1 else sin.stride(0), sin.stride(1), sin.stride(2))
    grid = lambda meta: (B * T, triton.cdiv(Hq, meta["BLOCK_H"]) + triton.cdiv(Hkv, meta["BLOCK_H"]))  # noqa: E731
    _rope_kernel[grid](
        q, k, cos, sin, qo, ko,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        *sc, *ss,
        T, Hq, Hkv, D, row_bucket(B * T),
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2))
    return qo, ko


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q and k, dispatched by device: Triton on CUDA, the torch reference on CPU."""
    if use_triton(q):
        return launch("rope", rope_triton, q, k, cos, sin)
    return rope_ref(q, k, cos, sin)


__all__ = ["rope", "rope_ref", "rope_triton"]
