"""Graph passes: each is ``Program -> Program`` in a file of its own, named by a verb.

Passes rewrite Programs and never run them: they may import ``program``, ``capture`` and ``kernels``
(the ops they insert), never ``runtime``, ``recipes`` or ``calibrate``.

``PassManager`` runs passes in order, lints the graph after each one, records each pass's rewrite
count in ``program.history``, and names the pass that failed when one raises.
"""
from __future__ import annotations

from typing import Callable

from ..program import Program
from .decode_with import decode_with
from .early_exit import EarlyExitError, early_exit
from .fold_selection import fold_selection
from .fuse import FuseError, fuse, fuse_graph
from .kv_policy import PolicyError, kv_policy
from .lower_attention import lower_attention
from .lower_linear import lower_linear, lower_linear_packable
from .prune_tokens import prune_tokens
from .split_layers import split_layers
from .steer import SteerError, steer
from .truncate_layers import TruncateError, truncate_layers

PassFn = Callable[[Program], Program]


class PassError(RuntimeError):
    """A pass failed; the message names it."""


class PassManager:
    def __init__(self, passes: list[PassFn]):
        self.passes = list(passes)

    def __call__(self, program: Program) -> Program:
        for p in self.passes:
            name = getattr(p, "__name__", repr(p))
            try:
                program = p(program)
                program.graph_module.graph.lint()
                for stage in program.stages or ():
                    stage.module.graph.lint()
            except PassError:
                raise
            except ValueError as e:  # bad model or recipe: keep the type users catch, name the pass
                raise type(e)(f"pass {name!r}: {e}") from e
            except Exception as e:
                raise PassError(f"pass {name!r} failed: {type(e).__name__}: {e}") from e
        return program


def default_passes(fused: bool = True) -> list[PassFn]:
    """The dense pipeline: attention reads/writes the KV cache, the graph is cut into stages, and (unless
    ``fused=False``) each stage's norms, RoPE, GLU and sibling projections are fused."""
    return [lower_attention, split_layers] + ([fuse] if fused else [])


def final_passes(pack_weights: bool = False) -> list[PassFn]:
    """Run after every rewrite (they match ``aten.linear`` as a pattern): the remaining linears are lowered
    (``pack_weights``: to the kernel that may keep re-laid-out weight copies for multi-row CPU calls), then
    each token selection is folded into its layer (it copies the layer's final graph)."""
    return [lower_linear_packable if pack_weights else lower_linear, fold_selection]


__all__ = ["PassManager", "PassError", "default_passes", "final_passes", "lower_attention", "lower_linear", "lower_linear_packable",
           "split_layers", "prune_tokens", "fold_selection", "kv_policy", "PolicyError", "fuse", "fuse_graph", "FuseError", "early_exit",
           "EarlyExitError", "decode_with", "steer", "SteerError", "truncate_layers", "TruncateError"]
