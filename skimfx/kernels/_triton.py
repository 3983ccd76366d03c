"""Triton availability, in one place.

Triton is optional on CPU machines: kernels fall back to their torch references there, and tests
run the Triton kernels under ``TRITON_INTERPRET=1`` when triton is installed.

A failed import is never silent where it matters: on a machine with a CUDA device (where the runtime
would take the Triton path) it warns once with the reason, and ``SKIMFX_REQUIRE_TRITON=1`` turns any
failure into an ImportError (for GPU CI, so that a broken install cannot pass by running the torch
references).
"""
from __future__ import annotations

import math
import os
import warnings

import torch

REQUIRE_ENV = "SKIMFX_REQUIRE_TRITON"


class TritonUnavailableWarning(UserWarning):
    """Triton failed to import on a machine with a CUDA device: kernels run their torch references."""


def _import_triton():
    """(triton, triton.language, None) or (None, None, the exception that stopped the import)."""
    try:  # pragma: no cover - depends on the install
        import triton as tr
        import triton.language as tl_

        return tr, tl_, None
    except Exception as e:  # ImportError, or a triton build that fails to load (missing libs, ABI mismatch)
        return None, None, e


triton, tl, IMPORT_ERROR = _import_triton()
HAS_TRITON = IMPORT_ERROR is None

if IMPORT_ERROR is not None:
    _why = f"{type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}"
    if os.environ.get(REQUIRE_ENV, "0") == "1":
        raise ImportError(f"{REQUIRE_ENV}=1 but Triton failed to import ({_why}); install a Triton that matches "
                          f"this torch ({torch.__version__}), or unset {REQUIRE_ENV} to run the torch "
                          "references") from IMPORT_ERROR
    if torch.cuda.is_available():
        warnings.warn(f"skimfx: Triton failed to import ({_why}); every kernel runs its torch reference on "
                      f"this CUDA machine, far slower. Fix the Triton install, or set {REQUIRE_ENV}=1 to make "
                      "this an error.", TritonUnavailableWarning, stacklevel=2)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Does the runtime take the Triton path for tensors on ``t``'s device? On CUDA, yes. On CPU the
    torch reference runs; the kernels run there only when called directly under
    ``TRITON_INTERPRET=1`` (the tests do that)."""
    return HAS_TRITON and t.is_cuda


def autotune_configs(configs: list) -> list:
    """The configs an ``@triton.autotune`` gets: all of them on a GPU, only the first under the
    interpreter, where tuning would run every config on the CPU and measure nothing of use (the
    autotuner skips benchmarking when it has a single config)."""
    return configs[:1] if interpreting() else configs


def launch(op: str, triton_fn, *args):
    """The Triton path of a dispatching wrapper. While ``torch.compile`` traces, call the registered
    ``torch.ops.skimfx.<op>`` instead (one opaque node with a fake implementation, see library.py);
    otherwise launch directly (the op layer's per-call overhead is not worth paying in eager mode)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.skimfx, op)(*args)
    return triton_fn(*args)


MAX_ROW_BUCKET = 4096


def row_bucket(rows: int) -> int:
    """The row count as an autotune key: its power-of-two bucket, capped (beyond a few thousand rows
    the best launch no longer changes)."""
    return min(triton.next_power_of_2(max(rows, 1)), MAX_ROW_BUCKET)


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, N] with unit column stride and one row stride; a copy only when its layout has
    neither (e.g. a transposed view)."""
    n = t.shape[-1]
    if t.numel() == 0:                       # no elements: -1 cannot be inferred when n == 0
        return t.reshape(math.prod(t.shape[:-1]), n)
    if t.stride(-1) == 1 or n == 1:
        try:
            return t.view(-1, n)
        except RuntimeError:  # leading dims that no single stride walks
            pass
    return t.contiguous().view(-1, n)
