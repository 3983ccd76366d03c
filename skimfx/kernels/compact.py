"""KV cache compaction: keep the listed slots of each KV head, in order.

``gather_kv(src [B, H, S, D], index [B, H, K] or [B, K]) -> [B, H, K, D]`` with
``out[b, h, i] = src[b, h, index[b, h, i]]``. Evicting policies (SnapKV, StreamingLLM, H2O, token
pruning with ``truncate_earlier_kv``) call it once per layer after prefill to move the kept tokens
into a smaller buffer, so the memory is released, not masked. One index row per KV head is what lets
SnapKV keep different tokens per head without repeating GQA k/v.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, autotune_configs, launch, tl, triton, use_triton


def _check(src, index):
    if src.dim() != 4:
        raise ValueError(f"gather_kv: src must be [B, H, S, D], got {tuple(src.shape)}")
    B, H = src.shape[:2]
    if index.dim() not in (2, 3) or index.shape[0] != B or (index.dim() == 3 and index.shape[1] != H):
        raise ValueError(f"gather_kv: index must be [B, H, K] or [B, K] for src {tuple(src.shape)}, "
                         f"got {tuple(index.shape)}")


def gather_kv_ref(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Copies whole D-element rows (``index_select`` on the rows of the buffer; far faster on CPU than
    an element-wise ``torch.gather`` with an expanded index). ``src`` may be a length-slice of a
    larger cache buffer: rows are addressed in that buffer through the strides, without a copy."""
    _check(src, index)
    B, H, S, D = src.shape
    idx = index if index.dim() == 3 else index[:, None].expand(B, H, index.shape[-1])
    sb, sh, ss, sd = src.stride()
    if sd != 1 or ss != D or sb % D or sh % D:
        src = src.contiguous()
        sb, sh, ss, sd = src.stride()
    row = torch.arange(B, device=src.device)[:, None, None] * (sb // D) + \
        torch.arange(H, device=src.device)[None, :, None] * (sh // D) + idx.long()
    n_rows = (B - 1) * (sb // D) + (H - 1) * (sh // D) + S
    rows = src.as_strided((n_rows, D), (D, 1))
    return torch.index_select(rows, 0, row.reshape(-1)).view(B, H, -1, D)


if HAS_TRITON:

    def _gather_configs() -> list:
        """Rows per program x warps; the first is the default (and the interpreter's only one)."""
        return autotune_configs([triton.Config({"BLOCK_N": n}, num_warps=w)
                                 for n in (64, 32, 128) for w in (4, 2, 8) if n * w <= 512])

    @triton.autotune(configs=_gather_configs(), key=["D"])
    @triton.jit
    def _gather_kv_kernel(
        SRC, IDX, OUT,
        stride_sb, stride_sh, stride_ss, stride_sd,
        stride_ib, stride_ih, stride_in,
        stride_ob, stride_oh, stride_on, stride_od,
        H, K, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < K
        d_ok = offs_d < D
        slot = tl.load(IDX + b * stride_ib + h * stride_ih + offs_n * stride_in, mask=n_ok, other=0).to(tl.int64)
        x = tl.load(SRC + b * stride_sb + h * stride_sh + slot[:, None] * stride_ss + offs_d[None, :] * stride_sd,
                    mask=n_ok[:, None] & d_ok[None, :])
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
                 x, mask=n_ok[:, None] & d_ok[None, :])


def gather_kv_triton(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check(src, index)
    B, H, S, D = src.shape
    K = index.shape[-1]
    out = torch.empty(B, H, K, D, dtype=src.dtype, device=src.device)
    def grid(meta):
        return (B * H, triton.cdiv(max(K, 1), meta["BLOCK_N"]))

    _gather_kv_kernel[grid](
        src, index, out,
        src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        index.stride(0), index.stride(1) if index.dim() == 3 else 0, index.stride(-1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        H, K, D=D, BLOCK_D=triton.next_power_of_2(D))
    return out


def gather_kv(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if use_triton(src):
        return launch("gather_kv", gather_kv_triton, src, index)
    return gather_kv_ref(src, index)


__all__ = ["gather_kv", "gather_kv_ref", "gather_kv_triton"]
