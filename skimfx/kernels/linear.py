"""Linear layers (``y = x W^T + b``) with a CPU path for decode-shaped inputs.

Semantics: exactly ``torch.nn.functional.linear``; x [..., K], weight [N, K], bias [N] or None.

Why a kernel of its own: a decode step, a batch of a few sequences, or the verification of a few
drafted tokens multiplies M = 1..24 rows by every weight of the model, so its cost is reading the
weights once. On CPU, which GEMM path reads them fastest depends on the machine, the shape and the
BLAS build: ``F.linear`` (MKL's ``x W^T``), the same product in the other operand order ``(W x^T)^T``,
which streams W, or (one row) oneDNN's inner product on the weight as it is. Measured on 2 cores: on
an AMD EPYC the streaming order took M=2 from 43 to 15 ms for SmolLM2's MLP weights; on an Intel Xeon
``F.linear`` wins at M=2..4 and oneDNN at M=1 for large weights only (bench/kernels.py writes the
current machine's table). No fixed rule holds across machines, so the path is chosen per shape by
measurement: the first call of each (rows, N, K, bias) times every candidate (best of a few runs) and
keeps the fastest, ``F.linear`` unless another is at least ``MARGIN`` faster (so a near-tie keeps HF's
own summation order). ``SKIMFX_CPU_LINEAR=torch|stream|onednn`` fixes the path instead (``auto``:
measure, the default).

Options not taken: oneDNN with the weight re-laid out into its blocked format is faster still at
M = 9..17 on the AMD machine but keeps a second copy of every weight; the compiled model reads the user's
weights in place, so it is not a candidate.

On CUDA (and for other dtypes, for inputs that need gradients, and for non-contiguous weights) this
is ``F.linear``: cuBLAS already streams the weight at small M.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

# rows up to which another path can beat F.linear on CPU (from 32 rows on they measured equal)
SMALL_M = 24
MARGIN = 0.10            # a candidate replaces F.linear only when at least this much faster
PATH_ENV = "SKIMFX_CPU_LINEAR"
PATHS = ("torch", "stream", "onednn")
_CHOICE: dict[tuple, str] = {}       # (rows, N, K, bias, threads) -> path; a few dozen keys per model


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


def _run(path: str, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if path == "onednn":
        return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight, bias, "none", [], "")
    if path == "stream":
        if bias is not None:
            return torch.addmm(bias[:, None], weight, rows.T).T.contiguous()
        return torch.mm(weight, rows.T).T.contiguous()
    return F.linear(rows, weight, bias)


def _candidates(m: int) -> list[str]:
    forced = os.environ.get(PATH_ENV, "auto")
    if forced != "auto":
        if forced not in PATHS:
            raise ValueError(f"{PATH_ENV}={forced!r}: expected auto or one of {', '.join(PATHS)}")
        return [forced if forced != "onednn" or (m == 1 and _ONEDNN) else "torch"]
    return ["torch", "stream"] + (["onednn"] if m == 1 and _ONEDNN else [])


def _time(path: str, rows, weight, bias) -> float:
    for _ in range(2):
        _run(path, rows, weight, bias)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        _run(path, rows, weight, bias)
        best = min(best, time.perf_counter() - t)
    return best


def choose_path(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The path for this shape on this machine: measured once per (rows, N, K, bias, threads)."""
    key = (rows.shape[0], weight.shape[0], weight.shape[1], bias is not None, torch.get_num_threads())
    path = _CHOICE.get(key)
    if path is None:
        cands = _candidates(rows.shape[0])
        if len(cands) == 1:
            path = cands[0]
        else:
            with torch.no_grad():
                times = {c: _time(c, rows, weight, bias) for c in cands}
            best = min(times, key=times.get)
            path = best if times[best] < (1 - MARGIN) * times["torch"] else "torch"
        _CHOICE[key] = path
    return path


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU, inputs of at most ``SMALL_M`` rows take the GEMM path measured
    fastest for their shape (see the module docstring)."""
    if torch.compiler.is_compiling() or not _small_m(x, weight, bias):
        return F.linear(x, weight, bias)           # a compiler picks its own GEMM (and packs the weight)
    K, N = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, K)
    y = _run(choose_path(rows, weight, bias), rows, weight, bias)
    return y.view(*x.shape[:-1], N)


__all__ = ["linear", "choose_path", "SMALL_M", "MARGIN", "PATH_ENV"]
