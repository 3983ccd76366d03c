"""decode_with: record how ``generate`` decodes this Program (early exit, self-speculation).

Why: the decoding modes run the same stages in another order (stop at an exit, draft then verify), so
they are not a graph rewrite but a decision the Program carries to the runtime. The pass stores a plain
``DecodeConfig`` (``program.decoding``); the runtime's ``decoding`` package turns it into a loop.

What it checks: one decoding mode at a time, and no KV cache policy (the modes roll tokens back or fill
skipped layers' k/v, which needs every layer's full cache). One rewrite.
"""
from __future__ import annotations

from ..program import DecodeConfig, Program
from .early_exit import EarlyExitError


def decode_with(program: Program, config: DecodeConfig) -> Program:
    if not isinstance(config, DecodeConfig):
        raise EarlyExitError(f"decode_with needs a DecodeConfig (EarlyExitConfig, SpeculativeConfig), got "
                             f"{type(config).__name__}")
    if program.policies:
        raise EarlyExitError(f"{config}: needs the full KV cache of every layer (tokens are rolled back or "
                             "filled in); remove the KV cache policy")
    if program.decoding is not None:
        raise EarlyExitError(f"one decoding mode at a time: already {program.decoding}")
    program.decoding = config
    program.history.append(("decode_with", 1))
    return program


__all__ = ["decode_with"]
