"""Linear layers (``y = x W^T + b``) with a CPU path for decode-shaped inputs.

Semantics: exactly ``torch.nn.functional.linear``; x [..., K], weight [N, K], bias [N] or None.

Why a kernel of its own: a decode step, a batch of a few sequences, or the verification of a few
drafted tokens multiplies M = 1..16 rows by every weight of the model, so its cost is reading the
weights once. On CPU, ``F.linear`` sends these shapes to an MKL GEMM path that is compute-bound at
small M (measured on 2 AMD EPYC cores, fp32, [3072, 576] weights: M=1 21 ms, M=2 43 ms, M=4 43 ms
for 40 weights, against 11 ms to stream them at 26 GB/s), so two rows cost twice one and a
speculative verification costs as much as the tokens it saves. The same product written as
``(W @ x^T)^T`` takes MKL's other operand order, which streams W: M=2 15 ms, M=4 17 ms, M=16 ~40 ms
(F.linear 59 ms); from M = 32 on the two are equal, so larger inputs (prefill) keep ``F.linear``. A
single row goes to oneDNN's inner product on the weight as it is (14 ms against 21 ms).

Options not taken: oneDNN with the weight re-laid out into its blocked format is faster still at
M = 9..17 (21-24 ms) but keeps a second copy of every weight; the compiled model reads the user's
weights in place, so it is not the default.

On CUDA (and for other dtypes, for inputs that need gradients, and for non-contiguous weights) this
is ``F.linear``: cuBLAS already streams the weight at small M.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# rows up to which the weight-streaming order wins on CPU (measured equal at 32, see above)
SMALL_M = 24


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_available()


def _small_m(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() == 0 or x.numel() == 0 or x.shape[-1] != weight.shape[-1] or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != weight.shape[:1]):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False      # the fast paths have no backward
    return x.numel() // x.shape[-1] <= SMALL_M


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU, inputs of at most ``SMALL_M`` rows stream the weight once."""
    if torch.compiler.is_compiling() or not _small_m(x, weight, bias):
        return F.linear(x, weight, bias)           # a compiler picks its own GEMM (and packs the weight)
    K, N = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, K)
    if rows.shape[0] == 1 and _ONEDNN:
        y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight, bias, "none", [], "")
    elif bias is not None:
        y = torch.addmm(bias[:, None], weight, rows.T).T.contiguous()
    else:
        y = torch.mm(weight, rows.T).T.contiguous()
    return y.view(*x.shape[:-1], N)


__all__ = ["linear", "SMALL_M"]
