"""decode_with: record how ``generate`` decodes this Program (early exit, self-speculation).

Why: the decoding modes run the same stages in another order (stop at an exit, draft then verify), so
they are not a graph rewrite but a decision the Program carries to the runtime. The pass stores a plain
``DecodeConfig`` (``program.decoding``); the runtime's ``decoding`` package turns it into a loop.

What it checks: one decoding mode at a time, and that the mode can run over the Program's KV cache
policies (``kv_policy.decoding_conflict``: self-speculation over any policy; early exit over policies that
can cache a token that exited below them). One rewrite.
"""
from __future__ import annotations

from ..program import DecodeConfig, Program
from .early_exit import EarlyExitError
from .kv_policy import decoding_conflict


def decode_with(program: Program, config: DecodeConfig) -> Program:
    if not isinstance(config, DecodeConfig):
        raise EarlyExitError(f"decode_with needs a DecodeConfig (EarlyExitConfig, SpeculativeConfig), got "
                             f"{type(config).__name__}")
    if program.decoding is not None:
        raise EarlyExitError(f"one decoding mode at a time: already {program.decoding}")
    program.decoding = config
    why = decoding_conflict(program)
    if why is not None:
        program.decoding = None
        raise EarlyExitError(f"{config} cannot run over the KV cache policy: {why}")
    program.history.append(("decode_with", 1))
    return program


__all__ = ["decode_with"]
