"""prune_tokens: insert prefill token-selection stages after chosen layers (GemFilter, PromptDistill).

Why: at long prompts most of prefill's work is spent on tokens the answer does not need. Early
layers already know which tokens matter (their attention from the last query concentrates on
them), so later layers can run on a few hundred tokens instead of thousands.

What it does, per selection layer r:
- exports layer r's attention queries q [B, Hq, T, D] (the input of its ``cached_attention``) as a
  new boundary value of the layer stage, with its token axis;
- inserts a stage ``select.r`` right after ``layer.r`` that calls ``select_tokens(ctx, r, q)``;
- records the ``Selection`` (rule and parameters) in ``program.selections``.

What it preserves: no layer's computation changes. The runtime gathers, with the selected indices,
every token-axis boundary value that a later stage reads (residual stream, RoPE cos/sin, …), which
is generic because ``split_layers`` typed every boundary value with its token axis; during decode
(one new token) selection stages are skipped. Requires ``lower_attention`` and ``split_layers``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..program import BoundaryValue, Program, Selection, Stage, cached_attention, select_tokens
from .kv_policy import check_policies
from .split_layers import _shape_str, _token_axis


class PruneError(ValueError):
    """A pruning recipe does not fit the model."""


def validate_selections(selections: list[Selection], num_layers: int) -> None:
    if not selections:
        raise PruneError("no selection layers given")
    layers = [s.layer for s in selections]
    for s in selections:
        last = num_layers - 1 if s.mode == "rerun" else num_layers - 2
        if not 0 <= s.layer <= last:
            raise PruneError(f"selection layer {s.layer} is out of range: valid layers are 0..{last} for this "
                             f"{num_layers}-layer model" + ("" if s.mode == "rerun" else
                                                            " (a later layer must remain to run on the kept tokens)"))
    if layers != sorted(set(layers)):
        raise PruneError(f"selection layers must be strictly increasing, got {layers}")
    keeps = [s.keep for s in selections]
    if any(type(a) is type(b) and b > a for a, b in zip(keeps, keeps[1:])):
        raise PruneError(f"keep must not grow from one selection to the next, got {keeps}")
    if sum(s.mode == "rerun" for s in selections) > 1 or (len(selections) > 1 and selections[0].mode == "rerun"):
        raise PruneError("GemFilter (re-run mode) takes exactly one selection layer")


def prune_tokens(program: Program, selections: list[Selection]) -> Program:
    if program.stages is None or not program.lowered:
        raise PruneError("prune_tokens needs a lowered, split Program (run lower_attention and split_layers first)")
    validate_selections(selections, program.info.num_layers)
    for sel in selections:
        if sel.layer in program.selections:
            raise PruneError(f"layer {sel.layer} already has a selection stage")
        stage = program.stage(f"layer.{sel.layer}")
        g = stage.module.graph
        calls = [n for n in g.nodes if n.op == "call_function" and n.target is cached_attention]
        if len(calls) != 1:
            raise PruneError(f"layer {sel.layer}: expected one cached_attention call, found {len(calls)}")
        q = calls[0].args[2]
        axis = _token_axis(q, program.token_symbol)
        if axis is None:
            raise PruneError(f"layer {sel.layer}: the attention query has no single token axis ({_shape_str(q)})")
        # export q from the layer stage
        out = next(n for n in g.nodes if n.op == "output")
        name = f"{q.name}_q{sel.layer}"
        if name not in stage.outputs:
            out.args = (tuple(out.args[0]) + (q,),)
            stage.outputs.append(name)
            stage.module.recompile()
        program.values[name] = BoundaryValue(name, stage.name, axis, _shape_str(q), q.meta["val"].dtype)
        # the selection stage
        sg = fx.Graph()
        ctx = sg.placeholder("ctx")
        qp = sg.placeholder(name)
        qp.meta = dict(q.meta)
        idx = sg.call_function(select_tokens, (ctx, sel.layer, qp))
        sg.output((idx,))
        module = fx.GraphModule(torch.nn.Module(), sg, class_name=f"select_{sel.layer}")
        index_name = f"select{sel.layer}_index"
        program.values[index_name] = BoundaryValue(index_name, f"select.{sel.layer}", None, "[B, K]", torch.long)
        pos = program.stages.index(stage) + 1
        program.stages.insert(pos, Stage(name=f"select.{sel.layer}", kind="select", layer=sel.layer, module=module,
                                         inputs=[name], outputs=[index_name]))
        program.selections[sel.layer] = sel
    check_policies(program)
    program.history.append(("prune_tokens", len(selections)))
    return program
