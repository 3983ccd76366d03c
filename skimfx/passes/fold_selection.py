"""fold_selection: run each prefill token selection right after its layer's attention, not after the layer.

Why: ``prune_tokens`` selects after layer r, so layer r's output projection and MLP still run on every
prompt token, although only the kept ones go on. The selection only needs the layer's queries and its
cached keys, both ready once the attention has run; selecting there lets the rest of layer r run on the
kept tokens. At 8k tokens keeping a quarter, that is about 40% of layer r's work (its attention, on every
token, stays: the cache of layer r holds every token). For GemFilter, whose first pass ends at the
selection, the rest of layer r is not run at all.

What it does, per selection layer r: copies layer r's graph into the select stage's ``folded`` module,
calls ``select_tokens`` after the ``cached_attention`` call and gathers, with the index, every token-axis
value that the rest of the layer reads from before the selection (the attention output, the residual
stream, RoPE tables, ...); a symbolic token count read after the selection is re-read from a gathered
value. The layer stage itself is unchanged (decode steps, decoding modes and calibrations run it).

What it preserves: the kept tokens' values are computed by the same ops on the same inputs (the rows of
a matmul over fewer tokens; a BLAS may sum in another order, so outputs agree to float rounding, not
bitwise). A layer whose graph reads the token count in a form other than one axis of a tensor or the
count itself keeps the unfolded selection. Run it after every pass that rewrites layer graphs (it copies
the final graph): it is one of ``final_passes``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..program import Program, cached_attention, gather_tokens, select_tokens
from .split_layers import _expr, _token_axis, _val

aten = torch.ops.aten


def _fold(program: Program, layer: int) -> tuple[fx.GraphModule, tuple[str, ...]] | None:
    sel = program.selections[layer]
    stage = program.stage(f"layer.{layer}")
    src = stage.module
    g = fx.Graph()
    vm: dict[fx.Node, fx.Node] = {}
    outs = g.graph_copy(src.graph, vm)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    attn = [n for n in g.nodes if n.op == "call_function" and n.target is cached_attention]
    if len(attn) != 1:
        return None
    attn = attn[0]
    with g.inserting_after(attn):
        index = g.call_function(select_tokens, (attn.args[0], layer, attn.args[2]))
    order = {n: i for i, n in enumerate(g.nodes)}
    cut = order[index]
    sym = program.token_symbol
    if sel.mode == "rerun":
        # GemFilter's first pass ends here: nothing after the selection is needed
        for n in reversed([n for n in g.nodes if order[n] > cut]):
            g.erase_node(n)
        g.output((index,))
        return _module(src, g, layer), ()
    # every value from before the selection that the rest of the layer reads: a tensor with one token axis
    # is gathered; the token count itself is re-read from a gathered tensor
    last, count = index, None
    counts: list[tuple[fx.Node, list[fx.Node]]] = []
    for n in [n for n in g.nodes if order[n] < cut]:
        after = [u for u in n.users if order.get(u, -1) > cut]
        val = _val(n)
        if not after or not isinstance(val, (torch.SymInt, torch.Tensor)):
            continue
        if isinstance(val, torch.SymInt):
            if _expr(val) == sym:
                counts.append((n, after))
            elif sym in getattr(_expr(val), "free_symbols", ()):
                return None              # e.g. B*T: not re-derived here, keep the unfolded selection
            continue
        token_dims = sum(sym in getattr(_expr(d), "free_symbols", ()) for d in val.shape)
        if not token_dims:
            continue                     # weights, per-sequence values
        axis = _token_axis(n, sym)
        if axis is None or token_dims != 1:
            return None                  # a flattened or square token axis: keep the unfolded selection
        with g.inserting_after(last):
            last = g.call_function(gather_tokens, (n, axis, index))
        for u in after:
            u.replace_input_with(n, last)
        if count is None:
            with g.inserting_after(last):
                count = last = g.call_function(aten.sym_size.int, (last, axis))
    if counts and count is None:
        return None
    for n, after in counts:
        for u in after:
            u.replace_input_with(n, count)
    gathered = tuple(name for name, o in zip(stage.outputs, outs) if order[o] > cut)
    g.output(tuple(outs) + (index,))
    return _module(src, g, layer), gathered


def _module(src: fx.GraphModule, g: fx.Graph, layer: int) -> fx.GraphModule:
    # the attention call writes the cache that the selection reads: never dead code
    g.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.target is cached_attention)
    g.lint()
    return fx.GraphModule(src, g, class_name=f"layer_{layer}_select")


def fold_selection(program: Program) -> Program:
    if not program.selections:
        return program
    folded = 0
    for layer in sorted(program.selections):
        select = program.stage(f"select.{layer}")
        select.folded, select.folded_gathered = _fold(program, layer) or (None, ())
        folded += select.folded is not None
    program.history.append(("fold_selection", folded))
    return program
