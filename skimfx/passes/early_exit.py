"""early_exit: exit branches after chosen layers, and k/v-only subgraphs for the layers a token skips.

Why: a decode step runs every layer for every token, although for many tokens an intermediate
layer already predicts the same next token (CALM, LayerSkip). An exit branch lets the runtime stop
there (lossy early exit) or use the early prediction as a draft that the remaining layers verify
(lossless self-speculation).

What it does:
- ``program.exits[E]``: a Stage cloned from the epilogue (the model's own final norm and LM head, the
  same weight tensors), fed by layer E's output, optionally preceded by an adapter module (trained by
  ``calibrate_exits``), its LM head replaced by ``kernels.exit_confidence``: the stage returns
  (top-1 token, its probability, top-2 margin) per token without writing the logits.
- ``program.kv_fill[l]`` for every layer l above the lowest exit: layer l's graph with its output
  replaced by the k and v that its attention would cache, dead code eliminated (no attention, no
  MLP). When a token exits at E, the runtime runs these on the exited hidden state (CALM's state
  propagation), so the skipped layers still cache k/v for it and later tokens can attend to it.
The layer stages themselves do not change. Requires ``split_layers``. Whether the exits can be used over
the Program's KV cache policies depends on the decoding mode (lossy early exit fills k/v through each
policy's write path, self-speculation verifies and rolls back): ``decode_with`` and ``kv_policy`` check it.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from ..kernels.exit_confidence import exit_confidence
from ..program import Program, Stage, cached_attention

aten = torch.ops.aten


class EarlyExitError(ValueError):
    """Exit branches do not fit the model or the other passes."""


def _head(graph: fx.Graph) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(output node, LM-head linear, its weight get_attr) of an epilogue graph."""
    out = next(n for n in graph.nodes if n.op == "output")
    (logits,) = out.args[0]
    if logits.op != "call_function" or logits.target is not aten.linear.default or len(logits.args) > 2 \
            and logits.args[2] is not None:
        raise EarlyExitError(f"the model's head ends with {logits.format_node()} rather than a bias-free LM-head "
                             "linear (e.g. final logit soft-capping); exit branches support a plain linear head")
    weight = logits.args[1]
    if weight.op != "get_attr":
        raise EarlyExitError("the LM head's weight is not a graph attribute")
    return out, logits, weight


def exit_stage(program: Program, layer: int, adapter: torch.nn.Module | None = None) -> Stage:
    """The exit branch after ``layer``: adapter (optional) -> the epilogue's norm -> exit_confidence."""
    epi = program.stage("epilogue")
    if len(epi.inputs) != 1:
        raise EarlyExitError(f"the epilogue reads {epi.inputs}, not only the residual stream")
    g = copy.deepcopy(epi.module.graph)
    out, logits, weight = _head(g)
    hidden = next(n for n in g.nodes if n.op == "placeholder" and n.name != "ctx")
    root = torch.nn.Module()
    for n in g.nodes:
        if n.op == "get_attr":
            setattr(root, n.target, getattr(epi.module, n.target))
    if adapter is not None:
        root.exit_adapter = adapter
        with g.inserting_after(hidden):
            adapted = g.call_module("exit_adapter", (hidden,))
        hidden.replace_all_uses_with(adapted, delete_user_cb=lambda u: u is not adapted)
    with g.inserting_before(out):
        normed = logits.args[0]
        flat = g.call_function(aten.reshape.default, (normed, [-1, program.info.hidden_size]))
        conf = g.call_function(exit_confidence, (flat, weight, None))
        parts = tuple(g.call_function(operator.getitem, (conf, i)) for i in range(3))
    out.args = (parts,)
    g.erase_node(logits)
    module = fx.GraphModule(root, g, class_name=f"exit_{layer}")
    module.graph.eliminate_dead_code()          # (the purity check of call_module needs the owning module)
    module.graph.lint()
    module.recompile()
    src = program.stage(f"layer.{layer}")
    return Stage(name=f"exit.{layer}", kind="exit", layer=layer, module=module, inputs=list(src.outputs),
                 outputs=["exit_token", "exit_prob", "exit_margin"])


def kv_fill_stage(program: Program, layer: int) -> Stage:
    """Layer ``layer``'s graph cut down to the k and v it caches (RoPE applied, un-repeated)."""
    st = program.stage(f"layer.{layer}")
    g = copy.deepcopy(st.module.graph)
    calls = [n for n in g.nodes if n.op == "call_function" and n.target is cached_attention]
    if len(calls) != 1:
        raise EarlyExitError(f"layer {layer}: expected one lowered attention call, found {len(calls)}")
    _, _, _, k, v = calls[0].args[:5]
    out = next(n for n in g.nodes if n.op == "output")
    out.args = ((k, v),)
    g.eliminate_dead_code()
    if any(n.target is cached_attention for n in g.nodes):
        raise EarlyExitError(f"layer {layer}: the attention call survived dead-code elimination")
    g.lint()
    module = fx.GraphModule(st.module, g, class_name=f"kv_fill_{layer}")
    return Stage(name=f"kv.{layer}", kind="kv_fill", layer=layer, module=module, inputs=list(st.inputs),
                 outputs=["k", "v"])


def early_exit(program: Program, layers: tuple[int, ...] | list[int],
               adapters: dict[int, torch.nn.Module] | None = None) -> Program:
    if program.stages is None or not program.lowered:
        raise EarlyExitError("early_exit needs a lowered, split Program (run lower_attention and split_layers first)")
    L = program.info.num_layers
    layers = sorted(set(layers))
    if not layers:
        raise EarlyExitError("give at least one exit layer")
    bad = [l for l in layers if not 0 <= l < L - 1]
    if bad:
        raise EarlyExitError(f"exit layers {bad} are out of range: an exit must leave layers to skip (0..{L - 2})")
    adapters = adapters or {}
    extra = set(adapters) - set(layers)
    if extra:
        raise EarlyExitError(f"adapters given for layers {sorted(extra)} that have no exit ({layers})")
    for l in layers:
        program.exits[l] = exit_stage(program, l, adapters.get(l))
    for l in range(layers[0] + 1, L):
        program.kv_fill[l] = kv_fill_stage(program, l)
    program.history.append(("early_exit", len(layers) + len(program.kv_fill)))
    return program


__all__ = ["early_exit", "exit_stage", "kv_fill_stage", "EarlyExitError"]
