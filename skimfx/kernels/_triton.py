"""Triton availability, in one place.

Triton is optional on CPU machines: kernels fall back to their torch references there, and tests
run the Triton kernels under ``TRITON_INTERPRET=1`` when triton is installed.
"""
from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a triton build that fails to load
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Does the runtime take the Triton path for tensors on ``t``'s device? On CUDA, yes. On CPU the
    torch reference runs; the kernels run there only when called directly under
    ``TRITON_INTERPRET=1`` (the tests do that)."""
    return HAS_TRITON and t.is_cuda
