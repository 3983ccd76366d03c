"""lower_linear: every ``aten.linear`` left in the executable graphs -> ``kernels.linear.linear``
(``linear_packable`` with ``pack=True``).

Why: the model's projections, MLP and LM head are most of a decode step, and their cost at decode
shapes (a few rows against every weight) depends on which GEMM path runs; ``kernels.linear`` picks
one that streams the weight (see its docstring for the measurements). The math is ``F.linear``'s.
``pack=True`` also lets it keep a re-laid-out copy of a weight for multi-row CPU calls (draft
verification, batched decoding), where that measures faster; the copy costs the weight's bytes again.

It runs last, after the passes that read linears as graph patterns (fuse merges q/k/v and gate/up,
early_exit finds the LM head), over every stage, exit branch and KV-fill graph. ``program.history``
records the number of linears lowered.
"""
from __future__ import annotations

import torch

from ..kernels.linear import linear, linear_packable
from ..program import Program

aten = torch.ops.aten


def lower_linear(program: Program, pack: bool = False) -> Program:
    program.pack_weights = pack
    if program.stages is None:
        raise ValueError("lower_linear runs on a Program split into stages (run split_layers first)")
    modules = [s.module for s in (*program.stages, *program.exits.values(), *program.kv_fill.values())]
    count = 0
    for gm in modules:
        hits = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]
        for n in hits:
            n.target = linear_packable if pack else linear
        if hits:
            gm.recompile()
        count += len(hits)
    program.history.append(("lower_linear", count))
    return program


def lower_linear_packable(program: Program) -> Program:
    """``lower_linear(program, pack=True)``: what ``skimfx.compile`` runs unless ``pack_weights=False``."""
    return lower_linear(program, pack=True)
