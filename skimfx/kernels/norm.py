"""RMSNorm, alone and fused with the residual add in front of it.

``rms_norm(x [..., N], weight [N], eps, offset=0.0) -> y [..., N]``: in fp32,
``y = x * rsqrt(mean(x^2, -1) + eps) * (weight + offset)``, returned in x's dtype. ``offset=1.0`` is
Gemma's ``(1 + weight)`` scale; Llama, Qwen and SmolLM use 0.

``add_rms_norm(x, residual, weight, eps, offset=0.0) -> (h, y)``: ``h = residual + x`` rounded to x's
dtype (the residual stream the next block adds to), ``y = rms_norm(h)``. Decoder layers do this
between attention and MLP and between layers; the kernel reads x and residual once and writes h and
y in the same pass.

Kernels: one program per block of ``ROWS`` rows of the ``[rows, N]`` view, the whole row in one tile
(``BLOCK_N = next_power_of_2(N)``), sum of squares in fp32. ``ROWS`` and ``num_warps`` are tuned per
(N, row-count bucket, dtypes).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, autotune_configs, launch, row_bucket, rows_view, tl, triton, use_triton


def _check(name, x, weight, residual=None):
    # shapes and dtypes only: a decode step's norm costs microseconds, and a tensor on the wrong
    # device fails in the first torch op anyway (the Triton wrappers check devices themselves)
    if not x.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"{name}: x and weight must be floating-point tensors, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: weight must be [N] for x [..., N]; got weight {tuple(weight.shape)} for x "
                         f"{tuple(x.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if not residual.dtype.is_floating_point:
            raise ValueError(f"{name}: residual must be a floating-point tensor, got {residual.dtype}")


def _check_device(name, *tensors):
    if any(t.device != tensors[0].device for t in tensors[1:]):
        raise ValueError(f"{name}: all tensors must be on one device")


# ----------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ----------------------------------------------------------------------------------------------
def _rms_norm(x, weight, eps, offset):
    # HF's own op sequence (pow, mean, + eps, rsqrt, scale, weight), so fp32 results are bit-identical
    # to the unfused model; in-place steps on our own buffers save allocations, no-op casts are skipped
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    r = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    y = xf * r
    w = weight if weight.dtype == xf.dtype else weight.to(xf.dtype)
    y.mul_(w + offset if offset else w)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x [..., N] (any strides), weight [N] -> y [..., N] in x's dtype, computed in fp32 (fp64 input
    stays fp64)."""
    _check("rms_norm", x, weight)
    return _rms_norm(x, weight, eps, offset)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N], weight [N] -> (h, y), both [..., N] in x's dtype: h = residual + x,
    y = rms_norm(h)."""
    _check("add_rms_norm", x, weight, residual)
    h = residual + x
    if h.dtype != x.dtype:
        h = h.to(x.dtype)
    return h, _rms_norm(h, weight, eps, offset)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Launch configurations are data: (ROWS per program, num_warps). Many rows per program for the
# narrow rows of small models (a 576-wide row is 2.3 KB), a single row with more warps for wide
# ones; more than 32 row-warps per program never helps. The first entry is the one the interpreter
# runs: several rows per program, so the row mask is exercised by the tests.
_ROWS = (4, 1, 2, 8, 16)
_WARPS = (1, 2, 4, 8)
_MAX_TILE = 16384       # fp32 elements of one program's tile (x and the result live in registers)


def _configs() -> list:
    return autotune_configs([triton.Config({"ROWS": rows}, num_warps=warps)
                             for rows in _ROWS for warps in _WARPS if rows * warps <= 32])


def _prune(configs, named_args, **kwargs):
    """Drop tiles too large for the registers and tiles with fewer elements than threads; the
    single-row config with the most warps is the fallback for very wide rows."""
    block_n = triton.next_power_of_2(named_args["N"])
    kept = [c for c in configs
            if c.kwargs["ROWS"] * block_n <= _MAX_TILE and c.num_warps * 32 <= c.kwargs["ROWS"] * block_n]
    return kept or [min(configs, key=lambda c: (c.kwargs["ROWS"], -c.num_warps))]



if HAS_TRITON:

    # ROW_BUCKET only keys the autotuner (launch shape), so it must not cause recompiles
    @triton.autotune(configs=_configs(), key=["N", "ROW_BUCKET", "ADD"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit(do_not_specialize=["ROW_BUCKET"])
    def _rms_norm_kernel(
        X, R, W, H, Y, stride_x, stride_r, stride_y, n_rows, N, ROW_BUCKET, eps, offset,
        BLOCK_N: tl.constexpr, ROWS: tl.constexpr, ADD: tl.constexpr,
    ):
        # ADD: h = x + r is written to H (the residual stream) and normalised; otherwise x is
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        c_ok = cols < N
        ok = (rows < n_rows)[:, None] & c_ok[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if ADD:
            res = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            # h is rounded to the output dtype before the norm reads it, as the unfused add then norm does
            h = (x + res).to(H.dtype.element_ty)
            tl.store(H + rows[:, None] * stride_y + cols[None, :], h, mask=ok)
            x = h.to(tl.float32)
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32) + offset
        r = tl.math.rsqrt(tl.sum(x * x, 1) / N + eps)       # masked columns are 0: they add nothing
        y = x * r[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def _grid(n_rows):
    return lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    _check("rms_norm", x, weight)
    _check_device("rms_norm", x, weight)
    N = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2 = rows_view(x)
    n_rows = x2.shape[0]
    if n_rows == 0 or N == 0:             # nothing to normalise (empty rows have no elements to write)
        return y
    _rms_norm_kernel[_grid(n_rows)](
        x2, x2, weight.contiguous(), y, y, x2.stride(0), 0, N, n_rows, N, row_bucket(n_rows), float(eps), float(offset),
        BLOCK_N=triton.next_power_of_2(N), ADD=False)
    return y


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    _check("add_rms_norm", x, weight, residual)
    _check_device("add_rms_norm", x, residual, weight)
    N = x.shape[-1]
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty_like(h)
    x2, r2 = rows_view(x), rows_view(residual)
    n_rows = x2.shape[0]
    if n_rows == 0 or N == 0:
        return h, y
    _rms_norm_kernel[_grid(n_rows)](
        x2, r2, weight.contiguous(), h, y, x2.stride(0), r2.stride(0), N, n_rows, N, row_bucket(n_rows),
        float(eps), float(offset), BLOCK_N=triton.next_power_of_2(N), ADD=True)
    return h, y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim, dispatched by device: Triton on CUDA, the torch reference on CPU."""
    if use_triton(x):
        return launch("rms_norm", rms_norm_triton, x, weight, eps, offset)
    return rms_norm_ref(x, weight, eps, offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, rms_norm(residual + x)), dispatched by device like ``rms_norm``."""
    if use_triton(x):
        return launch("add_rms_norm", add_rms_norm_triton, x, residual, weight, eps, offset)
    return add_rms_norm_ref(x, residual, weight, eps, offset)


__all__ = ["rms_norm", "rms_norm_ref", "rms_norm_triton", "add_rms_norm", "add_rms_norm_ref",
           "add_rms_norm_triton"]
