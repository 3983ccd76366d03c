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
measurement: the first call of each (row bucket, N, K, bias) times every candidate (best of a few runs) and
keeps the fastest, ``F.linear`` unless another is at least ``MARGIN`` faster (so a near-tie keeps HF's
own summation order). ``SKIMFX_CPU_LINEAR=torch|stream|onednn|packed`` fixes the path instead
(``auto``: measure, the default; a path that does not apply to a call falls back to ``F.linear``).

Re-laid-out weights (``linear_packable``): oneDNN's inner product over a copy of the weight in its
blocked layout does not re-pack the weight on every call the way a plain GEMM does, so a pass over 2 to
24 rows reads the weight about once: measured on 2 Xeon cores, Qwen2.5-0.5B's linears over 9 rows took
67 ms against 142 ms for ``F.linear`` (1 row: 47 ms), its LM head over 4 rows 24 ms against 62 ms.
That is the cost of verifying drafted tokens and of decoding a batch. The copy doubles the bytes of
every weight it is made for, so it is made lazily (the first multi-row call of a weight whose graph
was lowered to ``linear_packable``, ``skimfx.compile(..., pack_weights=True)``, the default), kept only
where it measured faster, and made again when the weight changes in place; ``packed_bytes()`` reports
the copies held. One-row calls keep the user's weight (the copy is slower at one row).

On CUDA (and for other dtypes, for inputs that need gradients, and for non-contiguous weights) this
is ``F.linear``: cuBLAS already streams the weight at small M.
"""
from __future__ import annotations

import os
import time
import weakref

import torch
import torch.nn.functional as F

from . import one_time

# rows up to which another path can beat F.linear on CPU (from 32 rows on they measured equal)
SMALL_M = 24
MARGIN = 0.10            # a candidate replaces F.linear only when at least this much faster
PATH_ENV = "SKIMFX_CPU_LINEAR"
PATHS = ("torch", "stream", "onednn", "packed")
_CHOICE: dict[tuple, str] = {}       # (rows, N, K, bias, threads, packable) -> path; a few dozen keys per model
_PACKED: dict[int, tuple] = {}       # id(weight) -> (weakref to it, its version when packed, blocked copy)


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


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """The weight re-laid out in oneDNN's blocked format, made once per weight and again after an
    in-place change (its version counter moved); dropped with the weight."""
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    one_time.note()
    _PACKED[key] = (weakref.ref(weight, lambda _, k=key: _PACKED.pop(k, None)), weight._version, packed)
    return packed


def packed_bytes() -> int:
    """Bytes of the re-laid-out weight copies held now (0 unless a ``linear_packable`` call made one)."""
    return sum(e[2].numel() * e[2].element_size() for e in list(_PACKED.values()) if e[0]() is not None)


def _run(path: str, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if path == "packed":
        return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), _packed(weight), bias, "none", [], "")
    if path == "onednn":
        return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight, bias, "none", [], "")
    if path == "stream":
        if bias is not None:
            return torch.addmm(bias[:, None], weight, rows.T).T.contiguous()
        return torch.mm(weight, rows.T).T.contiguous()
    return F.linear(rows, weight, bias)


def _applies(path: str, m: int, packable: bool) -> bool:
    if path == "onednn":
        return m == 1 and _ONEDNN
    if path == "packed":
        return m > 1 and packable and _ONEDNN
    return True


def _candidates(m: int, packable: bool = False) -> list[str]:
    forced = os.environ.get(PATH_ENV, "auto")
    if forced != "auto":
        if forced not in PATHS:
            raise ValueError(f"{PATH_ENV}={forced!r}: expected auto or one of {', '.join(PATHS)}")
        return [forced if _applies(forced, m, packable) else "torch"]
    return [p for p in PATHS if _applies(p, m, packable)]


def _time(path: str, rows, weight, bias) -> float:
    for _ in range(2):
        _run(path, rows, weight, bias)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        _run(path, rows, weight, bias)
        best = min(best, time.perf_counter() - t)
    return best


def measure_bucket(m: int) -> int:
    """Row counts that share one measured choice: 1, 2, then powers of two (3-4, 5-8, 9-16, 17-32). A batch
    verifying ragged drafts passes a different row count almost every step; measuring each one (a few dozen
    timed calls of every weight shape) would cost more than the choice saves."""
    return m if m <= 2 else 1 << (m - 1).bit_length()


def choose_path(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packable: bool = False) -> str:
    """The path for this shape on this machine: measured once per (row bucket, N, K, bias, threads, packable),
    on the first call that falls in it."""
    key = (measure_bucket(rows.shape[0]), weight.shape[0], weight.shape[1], bias is not None, torch.get_num_threads(),
           packable)
    path = _CHOICE.get(key)
    if path is None:
        cands = _candidates(rows.shape[0], packable)
        if len(cands) == 1:
            path = cands[0]
        else:
            with torch.no_grad():
                times = {c: _time(c, rows, weight, bias) for c in cands}
            one_time.note()
            best = min(times, key=times.get)
            path = best if times[best] < (1 - MARGIN) * times["torch"] else "torch"
        _CHOICE[key] = path
        if path != "packed" and not any(v == "packed" and k[1:4] == key[1:4] for k, v in _CHOICE.items()):
            _PACKED.pop(id(weight), None)          # measured, not used by any row count: free the copy
    return path


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packable: bool) -> torch.Tensor:
    if torch.compiler.is_compiling() or not _small_m(x, weight, bias):
        return F.linear(x, weight, bias)           # a compiler picks its own GEMM (and packs the weight)
    K, N = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, K)
    y = _run(choose_path(rows, weight, bias, packable), rows, weight, bias)
    return y.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU, inputs of at most ``SMALL_M`` rows take the GEMM path measured
    fastest for their shape among those that read the weight as it is (see the module docstring)."""
    return _linear(x, weight, bias, packable=False)


def linear_packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear``, and for 2..``SMALL_M`` rows on CPU also the re-laid-out copy of the weight as a
    candidate path (made on first use, kept only where it measures faster; see the module docstring)."""
    return _linear(x, weight, bias, packable=True)


__all__ = ["linear", "linear_packable", "packed_bytes", "choose_path", "measure_bucket", "SMALL_M", "MARGIN", "PATH_ENV"]
