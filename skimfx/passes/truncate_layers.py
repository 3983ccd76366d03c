"""truncate_layers: keep the first ``keep`` layers and feed the model's head from the last kept one.

Why: sorted sub-models (SoFT, Kavehzadeh et al. 2023; System-1.5's depth shortcut) run a prefix of the
layer stack plus the shared LM head as a smaller model, so one set of weights serves several compute
budgets. Without fine-tuning the model, the head reads the intermediate state through an exit adapter
(``calibrate_exits``: ridge or distilled, trained towards the final layer's state / distribution).

What it does: the layer stages from ``keep`` on are removed (and their attention settings: the KV cache
is then allocated for ``keep`` layers only); the epilogue (the model's own final norm and LM head, the
same weight tensors) is rebuilt to read layer ``keep - 1``'s residual stream, through ``adapter`` when
one is given. ``program.info.num_layers`` becomes ``keep``. Refused: token selections, KV policies,
exits or a decoding mode already placed on a removed layer (apply Truncate first; later recipes then see
the shorter model). Rewrites counted: one per removed layer, plus the rewired head.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx

from ..program import Program, Stage


class TruncateError(ValueError):
    """The truncation does not fit the model or the passes already run."""


def _rewired_epilogue(epi: Stage, hidden_name: str, adapter: torch.nn.Module | None) -> Stage:
    """The epilogue reading ``hidden_name``, after ``adapter`` when given."""
    if len(epi.inputs) != 1:
        raise TruncateError(f"the epilogue reads {epi.inputs}, not only the residual stream")
    g = copy.deepcopy(epi.module.graph)
    root = torch.nn.Module()
    for n in g.nodes:
        if n.op == "get_attr":
            setattr(root, n.target, getattr(epi.module, n.target))
    if adapter is not None:
        hidden = next(n for n in g.nodes if n.op == "placeholder" and n.name != "ctx")
        root.exit_adapter = adapter
        with g.inserting_after(hidden):
            adapted = g.call_module("exit_adapter", (hidden,))
        adapted.meta = dict(hidden.meta)
        hidden.replace_all_uses_with(adapted, delete_user_cb=lambda u: u is not adapted)
    module = fx.GraphModule(root, g, class_name="epilogue")
    module.graph.lint()
    module.recompile()
    return Stage(name="epilogue", kind="epilogue", layer=None, module=module, inputs=[hidden_name],
                 outputs=list(epi.outputs))


def truncate_layers(program: Program, keep: int, adapter: torch.nn.Module | None = None) -> Program:
    if program.stages is None or not program.lowered:
        raise TruncateError("truncate_layers needs a lowered, split Program (run lower_attention and split_layers)")
    L = program.info.num_layers
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep < L:
        raise TruncateError(f"keep must be a layer count in 1..{L - 1} for this {L}-layer model, got {keep!r} "
                            "(all layers is the dense model)")
    placed = {"token selections": program.selections, "KV cache policies": program.policies,
              "exit branches": program.exits, "k/v fill stages": program.kv_fill}
    for what, by_layer in placed.items():
        dropped = sorted(l for l in by_layer if l >= keep)
        if dropped:
            raise TruncateError(f"{what} sit on layers {dropped}, which a {keep}-layer truncation removes: "
                                "apply Truncate before that recipe, or place it on layers below the cut")
    if program.decoding is not None:
        raise TruncateError(f"a decoding mode is already set ({program.decoding}): apply Truncate first")
    hidden_name = program.hidden_output(keep - 1)
    epi = _rewired_epilogue(program.stage("epilogue"), hidden_name, adapter)
    program.stages = [s for s in program.stages
                      if s.kind not in ("layer", "select", "epilogue") or (s.layer is not None and s.layer < keep)]
    program.stages.append(epi)
    program.attention = {l: a for l, a in program.attention.items() if l < keep}
    program.info = dataclasses.replace(program.info, num_layers=keep,
                                       sliding_window=tuple(program.info.sliding_window[:keep]))
    program.history.append(("truncate_layers", (L - keep) + 1))
    return program


__all__ = ["truncate_layers", "TruncateError"]
