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
    """Run the Triton kernel for tensors on ``t``'s device? CUDA yes; CPU only under the interpreter
    (tests), where the kernels run as numpy code."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or interpreting()
