"""lower_attention: SDPA + its mask subgraph -> ``cached_attention`` (KV cache, un-repeated GQA).

Why: HF attention recomputes over the whole sequence it is given and takes a materialised
``[B, 1, T, T]`` mask. The lowered op instead appends the new tokens' k/v to a KV cache and attends
over the cache, which is what prefill-at-an-offset, decode, token pruning and KV eviction all need.

What it preserves: every value except the attention outputs is computed by the model's own ops (its
norms, RoPE variant, qk-norm, biases). The attention semantics are read off the graph, never
assumed: the scale from the SDPA call, causality and the sliding window from the comparisons in the
mask subgraph (``kv <= q`` and ``kv > q - W``), and the GQA repeat
``reshape(expand(unsqueeze(x, 2)))`` is matched so the cache stores the ``[B, Hkv, T, D]`` tensor
``x``. A pattern it cannot prove raises ``LoweringError`` naming what was not found. After the
rewrite the mask subgraph is dead and removed.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from ..capture import UnsupportedModelError, layer_of
from ..program import LayerAttention, Program, cached_attention

aten = torch.ops.aten

_SDPA = (aten.scaled_dot_product_attention.default,)


class LoweringError(UnsupportedModelError):
    """An attention pattern could not be proven."""


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else "?"


def _sdpa_args(node: fx.Node) -> dict:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    args.setdefault("attn_mask", None)
    args.setdefault("dropout_p", 0.0)
    args.setdefault("is_causal", False)
    args.setdefault("scale", None)
    args.setdefault("enable_gqa", False)
    return args


def _shape(node) -> tuple:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _unrepeat(kv: fx.Node, num_kv_heads: int, layer: int, what: str) -> fx.Node:
    """Return the un-repeated ``[B, Hkv, T, D]`` node feeding the GQA repeat of ``kv``."""
    if (kv.op == "call_function" and kv.target in (aten.reshape.default, aten.view.default)
            and isinstance(kv.args[0], fx.Node) and kv.args[0].target == aten.expand.default):
        expand = kv.args[0]
        unsq = expand.args[0]
        if (isinstance(unsq, fx.Node) and unsq.target == aten.unsqueeze.default and unsq.args[1] == 2
                and isinstance(unsq.args[0], fx.Node)):
            src = unsq.args[0]
            if len(_shape(src)) == 4 and _shape(src)[1] == num_kv_heads:
                return src
        raise LoweringError(
            f"layer {layer}: the {what} input of SDPA is a reshape(expand(…)) that is not the GQA repeat "
            f"reshape(expand(unsqueeze(x, 2))) of a [B, {num_kv_heads}, T, D] tensor")
    shape = _shape(kv)
    if len(shape) == 4 and shape[1] == num_kv_heads:
        return kv  # no repeat (Hq == Hkv, or SDPA's own enable_gqa)
    raise LoweringError(
        f"layer {layer}: the {what} input of SDPA is neither the GQA repeat pattern "
        f"reshape(expand(unsqueeze(x, 2))) nor a [B, {num_kv_heads}, T, D] tensor (shape {shape})")


def _mask_ancestors(mask: fx.Node) -> list[fx.Node]:
    seen, stack, out = set(), [mask], []
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        out.append(n)
        stack.extend(a for a in n.all_input_nodes)
    return out


def _mask_semantics(mask: fx.Node | None, is_causal: bool, layer: int) -> int | None:
    """Prove the mask is causal and return its sliding window (None = full attention).

    HF's mask builders compare key and query positions: causal is ``le(kv_idx, q_idx)``; a sliding
    window adds ``gt(kv_idx, sub(q_idx, W))`` (keys in ``(q - W, q]``) or the ``ge`` form.
    """
    if mask is None:
        if is_causal:
            return None
        raise LoweringError(f"layer {layer}: SDPA has neither a mask nor is_causal=True (bidirectional "
                            "attention is not a decoder)")
    nodes = _mask_ancestors(mask)
    if any(layer_of(n) is not None for n in nodes if n.op == "call_function"):
        raise LoweringError(f"layer {layer}: the attention mask is computed inside a layer, not from positions")
    causal = any(n.target in (aten.le.Tensor, aten.ge.Tensor) for n in nodes if n.op == "call_function")
    if not causal and not is_causal:
        raise LoweringError(f"layer {layer}: could not find the causal comparison kv_idx <= q_idx in the "
                            "mask subgraph")
    windows = set()
    for n in nodes:
        if n.op == "call_function" and n.target == aten.sub.Tensor and isinstance(n.args[1], int):
            for user in n.users:
                if user.target == aten.gt.Tensor and user.args[1] is n:
                    windows.add(n.args[1])          # kv > q - W
                elif user.target == aten.ge.Tensor and user.args[1] is n:
                    windows.add(n.args[1] + 1)      # kv >= q - W
    if len(windows) > 1:
        raise LoweringError(f"layer {layer}: the mask has several sliding windows {sorted(windows)}")
    return windows.pop() if windows else None


def lower_attention(program: Program) -> Program:
    gm = program.graph_module
    g = gm.graph
    info = program.info
    ctx = next((n for n in g.nodes if n.op == "placeholder" and n.name == "ctx"), None)
    if ctx is None:
        raise LoweringError("the graph has no ctx input (was it made by skimfx.capture?)")
    # SDPA cannot softcap; a model that has attention softcapping (Gemma 2) computes it in its
    # eager attention, which the lowered op reproduces from the config value.
    softcap = info.attn_softcap

    sdpas = [n for n in g.nodes if n.op == "call_function" and n.target in _SDPA]
    if not sdpas:
        raise LoweringError(
            f"{info.arch}: no scaled_dot_product_attention call in the captured graph; skimfx lowers "
            "SDPA attention (the model's attention implementation must support 'sdpa')")
    attention: dict[int, LayerAttention] = {}
    windows = list(info.sliding_window)
    for node in sdpas:
        layer = layer_of(node)
        if layer is None:
            raise LoweringError(
                f"{info.arch}: pattern not found: the SDPA call {node.name} is in module "
                f"{_module_path(node)!r}, which has no 'layers.N' decoder-layer path")
        if layer in attention:
            raise LoweringError(f"layer {layer} has more than one SDPA call")
        a = _sdpa_args(node)
        if a["dropout_p"]:
            raise LoweringError(f"layer {layer}: attention dropout {a['dropout_p']} in the graph")
        q = a["query"]
        q_shape = _shape(q)
        if len(q_shape) != 4 or q_shape[1] != info.num_heads:
            raise LoweringError(f"layer {layer}: query shape {q_shape} is not [B, {info.num_heads}, T, D]")
        k = _unrepeat(a["key"], info.num_kv_heads, layer, "key")
        v = _unrepeat(a["value"], info.num_kv_heads, layer, "value")
        window = _mask_semantics(a["attn_mask"], a["is_causal"], layer)
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q_shape[-1])
        attention[layer] = LayerAttention(layer=layer, scale=float(scale), window=window, softcap=softcap)
        windows[layer] = window
        with g.inserting_before(node):
            new = g.call_function(cached_attention, (ctx, layer, q, k, v, float(scale), window, softcap))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    missing = sorted(set(range(info.num_layers)) - set(attention))
    if missing:
        raise LoweringError(f"{info.arch}: no SDPA attention found in layers {missing}")
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    program.attention = attention
    program.info = dataclasses.replace(info, sliding_window=tuple(windows))
    program.history.append(("lower_attention", len(attention)))
    return program
