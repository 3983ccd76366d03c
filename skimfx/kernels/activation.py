"""Gated MLP activation: ``glu(gate [..., I], up [..., I], activation) -> act(gate) * up [..., I]``.

``activation`` is one of ``"silu"`` (Llama, Qwen, SmolLM: SwiGLU), ``"gelu_tanh"`` (Gemma's
``gelu_pytorch_tanh``) or ``"gelu"`` (exact, erf). The output is a new contiguous tensor in gate's
dtype. gate and up may be strided views, in particular the two halves of one merged ``[..., 2I]``
gate_up projection: the kernel addresses rows through their own row strides, so the halves are
never copied apart.

Kernel: an elementwise pass over the ``[rows, I]`` views, one program per (row, block of
``BLOCK_I`` columns), fp32 math. ``BLOCK_I`` and ``num_warps`` are tuned per (I, row-count bucket,
dtypes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, autotune_configs, launch, row_bucket, rows_view, tl, triton, use_triton

# name -> the ACTIVATION constant of the kernel
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def _check(gate, up, activation):
    # names and shapes only: on a decode step the reference is two torch calls of a few microseconds,
    # which reject other dtypes and devices themselves (glu_triton checks those before launching)
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: unknown activation {activation!r}; valid names are {', '.join(ACTIVATIONS)}")
    if gate.shape != up.shape:
        raise ValueError(f"glu: gate and up must have one shape [..., I], got {tuple(gate.shape)} and "
                         f"{tuple(up.shape)}")


# ----------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ----------------------------------------------------------------------------------------------
def glu_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate, up [..., I] (any strides) -> act(gate) * up [..., I], contiguous, in gate's dtype.

    The model's own arithmetic: the activation in gate's dtype, then the product. One temporary,
    multiplied in place (on CPU a little faster than ``act(gate) * up``, which allocates twice)."""
    _check(gate, up, activation)
    if activation == "silu":
        y = F.silu(gate)
    elif activation == "gelu_tanh":
        y = F.gelu(gate, approximate="tanh")
    else:
        y = F.gelu(gate)
    if not y.is_contiguous():  # an elementwise op keeps a permuted input's layout
        y = y.contiguous()
    return y.mul_(up)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
# Launch configurations are data: (BLOCK_I, num_warps), kept where each thread gets 4 to 16
# elements (whole 16-byte vectors, bounded registers). The first entry is the one the interpreter
# runs: a block narrower than the tested rows, so the column blocks and their mask are exercised.
_BLOCKS = (256, 512, 1024, 2048, 4096)
_WARPS = (1, 2, 4, 8)


def _configs() -> list:
    return autotune_configs([triton.Config({"BLOCK_I": block}, num_warps=warps)
                             for block in _BLOCKS for warps in _WARPS if 4 <= block // (32 * warps) <= 16])


def _prune(configs, named_args, **kwargs):
    """Blocks wider than the row would only compute masked lanes; keep those up to the row's width
    (the narrowest block for rows narrower than all of them)."""
    width = max(_BLOCKS[0], triton.next_power_of_2(named_args["I"]))
    return [c for c in configs if c.kwargs["BLOCK_I"] <= width]



if HAS_TRITON:

    @triton.jit
    def _sigmoid(x):
        # from exp(-|x|) <= 1, which never overflows: e / (1 + e) for x < 0
        e = tl.exp(-tl.abs(x))
        return tl.where(x >= 0, 1.0, e) / (1.0 + e)

    # ROW_BUCKET only keys the autotuner (launch shape), so it must not cause recompiles
    @triton.autotune(configs=_configs(), key=["I", "ROW_BUCKET"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit(do_not_specialize=["ROW_BUCKET"])
    def _glu_kernel(
        G, U, Y, stride_g, stride_u, stride_y, I, ROW_BUCKET,
        ACTIVATION: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        ok = cols < I
        g = tl.load(G + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
        if ACTIVATION == 0:    # silu
            a = g * _sigmoid(g)
        elif ACTIVATION == 1:  # gelu, tanh approximation
            # 0.5 * (1 + tanh(z)) == sigmoid(2 z): no tanh needed (tl has none, and libdevice's does
            # not run under the interpreter), and no cancellation in 1 + tanh(z) for negative z
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)   # sqrt(2 / pi) * (g + 0.044715 g^3)
            a = g * _sigmoid(2.0 * z)
        else:                  # exact gelu
            a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        tl.store(Y + row * stride_y + cols, (a * u).to(Y.dtype.element_ty), mask=ok)



def glu_triton(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    _check(gate, up, activation)
    if not gate.dtype.is_floating_point or not up.dtype.is_floating_point:
        raise ValueError(f"glu: gate and up must be floating-point tensors, got {gate.dtype} and {up.dtype}")
    if gate.dim() < 1:
        raise ValueError("glu: gate and up must be [..., I], got 0-dim tensors")
    if gate.device != up.device:
        raise ValueError("glu: gate and up must be on one device")
    I = gate.shape[-1]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    g2, u2 = rows_view(gate), rows_view(up)
    n_rows = g2.shape[0]
    if n_rows == 0 or I == 0:
        return y
    grid = lambda meta: (n_rows, triton.cdiv(I, meta["BLOCK_I"]))  # noqa: E731
    _glu_kernel[grid](g2, u2, y, g2.stride(0), u2.stride(0), I, I, row_bucket(n_rows),
                      ACTIVATION=ACTIVATIONS[activation])
    return y


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, dispatched by device: Triton on CUDA, the torch reference on CPU."""
    if use_triton(gate):
        return launch("glu", glu_triton, gate, up, activation)
    return glu_ref(gate, up, activation)


__all__ = ["glu", "glu_ref", "glu_triton", "ACTIVATIONS"]
