"""steer: add a fixed vector to the residual stream leaving a chosen layer, at every token.

Why: Activation-Steered Compression (Azizi et al. 2025, "Activation Steering for Chain-of-Thought
Compression") shortens a model's answers without training: the mean difference between the residual
activations of concise and verbose answers to the same questions is a direction in the residual stream,
and adding ``alpha * v`` to the stream after one layer moves every token of the generation towards the
concise style (prefill and decode alike). ``skimfx.calibrate_steering`` extracts ``v`` and chooses
``alpha`` under a KL bound to the unsteered next-token distribution.

What it does: in stage ``layer.<layer>``, the residual-stream output (the value the next stage reads,
``Program.hidden_output``) becomes ``h + steer_vector`` with ``steer_vector = alpha * v`` ([hidden],
stored as a buffer of the stage in the model's dtype, broadcast over batch and tokens). Nothing else in
the layer changes (its attention and MLP, and the k/v it caches, come before the addition; the next
layers see the steered stream). One rewrite; a layer is steered at most once.
"""
from __future__ import annotations

import torch

from ..program import Program

aten = torch.ops.aten

BUFFER = "steer_vector"


class SteerError(ValueError):
    """The steering vector does not fit the model or the layer."""


def steer(program: Program, layer: int, vector: torch.Tensor, alpha: float) -> Program:
    if program.stages is None:
        raise SteerError("steer needs a split Program (run split_layers first)")
    L = program.info.num_layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < L:
        raise SteerError(f"layer must be in 0..{L - 1} for this {L}-layer model, got {layer!r}")
    if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (program.info.hidden_size,):
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise SteerError(f"the steering vector must be a tensor of shape [{program.info.hidden_size}] (the model's "
                         f"hidden size), got {shape}")
    if not torch.isfinite(vector).all():
        raise SteerError("the steering vector holds inf or nan values")
    stage = program.stage(f"layer.{layer}")
    gm = stage.module
    if hasattr(gm, BUFFER):
        raise SteerError(f"layer {layer} is already steered; give one steering per layer")
    name = program.hidden_output(layer)
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    values = list(out.args[0])
    h = values[stage.outputs.index(name)]
    gm.register_buffer(BUFFER, (float(alpha) * vector.detach().float()).to(program.info.dtype)
                       .to(program.info.device))
    with g.inserting_before(out):
        vec = g.get_attr(BUFFER)
        steered = g.call_function(aten.add.Tensor, (h, vec))
    steered.meta = {k: v for k, v in h.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
    values[stage.outputs.index(name)] = steered
    out.args = (tuple(values),)
    g.lint()
    gm.recompile()
    program.history.append(("steer", 1))
    return program


__all__ = ["steer", "SteerError", "BUFFER"]
