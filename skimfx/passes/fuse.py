"""fuse: rewrite the model's own small-op sequences into fused kernels, stage by stage.

Why: a decoder layer spends most of its non-GEMM time in chains of element-wise ops that each read
and write the whole activation (RMSNorm is six ops, RoPE eight per tensor, SwiGLU three), and in
separate GEMMs over the same input (q, k, v; gate, up). Fusing a chain reads the activation once;
merging sibling projections reads the input once and makes one larger GEMM.

Patterns (each is a ``match`` that proves the sequence from the graph and a ``replace`` that emits one
call; a sequence that does not prove exactly is left alone — the pass never guesses):

- ``rms_norm``: ``w' * (x * rsqrt(mean(x², -1, keepdim) + eps))`` with ``w' = w`` (Llama, Qwen, Mistral)
  or ``w' = w + 1`` (Gemma), optional dtype casts around the normalisation
  -> ``kernels.norm.rms_norm(x, w, eps, offset)``.
- ``add_rms_norm``: the same when ``x = a + b`` is a residual add in the same stage whose sum is also
  used elsewhere -> ``kernels.norm.add_rms_norm(b, a, w, eps, offset)`` returning ``(a + b, norm)``.
- ``rope``: the rotate-half form ``x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin`` applied to q and
  to k with the same cos/sin -> one ``kernels.rope.rope(q, k, cos, sin)``.
- ``glu``: ``act(g) * u`` with act = silu (SwiGLU) or gelu (GeGLU, tanh or exact)
  -> ``kernels.activation.glu(g, u, act)``.
- ``qkv`` / ``gate_up`` (one mechanism, "merge linears"): projections of one input by weights held
  as graph attributes (q/k/v; gate/up) -> one ``linear`` over the concatenated weight and a slice per
  output. The merged weight becomes the storage of the model's own parameters: each original
  parameter is re-pointed at its rows of the merged buffer (same values, same Parameter objects), so
  the weights are not duplicated and the user's model keeps working.

Counts are recorded per pattern in ``program.history`` (``fuse.rms_norm`` …). On both embedded models
every pattern fires once per layer (RMSNorm: once per norm the architecture has: Llama 1 plain + 1
residual per layer and the final norm; Gemma3 5 plain incl. q/k-norm + 1 residual).

Requires ``split_layers`` (it fuses inside stages, so a residual add is never moved across a stage
boundary: boundaries stay exactly the values early exit and token pruning rely on). Runs before or
after ``prune_tokens`` / ``kv_policy`` (neither reads inside a layer graph).
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from ..kernels.activation import glu
from ..kernels.norm import add_rms_norm, rms_norm
from ..kernels.rope import rope
from ..program import Program

aten = torch.ops.aten

_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)
_ADDS = (aten.add.Tensor, aten.add.Scalar)
_MULS = (aten.mul.Tensor,)
_ACTS = {aten.silu.default: "silu", aten.gelu.default: None}  # gelu: approximate kwarg decides


class FuseError(RuntimeError):
    """fuse was given a Program it cannot work on."""


# ------------------------------------------------------------------------------------------------ helpers

def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _shape(n) -> tuple | None:
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _dtype(n):
    v = _val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _strip_casts(n):
    while _call(n, *_CASTS):
        n = n.args[0]
    return n


def _other(node: fx.Node, one) -> object:
    """The other operand of a binary op whose one operand is ``one``."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _attr(gm: fx.GraphModule, n) -> torch.Tensor | None:
    if isinstance(n, fx.Node) and n.op == "get_attr":
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def _last_dim(dims, ndim: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _replace(old: fx.Node, new: fx.Node) -> None:
    new.meta.setdefault("nn_module_stack", old.meta.get("nn_module_stack"))
    old.replace_all_uses_with(new)


def _tuple_out(g: fx.Graph, call: fx.Node, olds: list[fx.Node]) -> None:
    """``call`` returns a tuple; route each old node's users to its element."""
    with g.inserting_after(call):
        items = [g.call_function(operator.getitem, (call, i)) for i in range(len(olds))]
    call.meta["val"] = tuple(_val(o) for o in olds)
    call.meta["nn_module_stack"] = olds[-1].meta.get("nn_module_stack")
    for item, old in zip(items, olds):
        item.meta["val"] = _val(old)
        _replace(old, item)


# ------------------------------------------------------------------------------------------------ rms_norm

def _match_rms_norm(gm: fx.GraphModule, r: fx.Node) -> dict | None:
    """From an ``rsqrt`` node, prove ``w' * (x * rsqrt(mean(x², -1, keepdim) + eps))``."""
    if not _call(r, aten.rsqrt.default) or len(r.users) != 1:
        return None
    add = r.args[0]
    if not _call(add, *_ADDS) or len(add.users) != 1 or not isinstance(add.args[1], float):
        return None
    eps, mean = add.args[1], add.args[0]
    if not _call(mean, aten.mean.dim) or len(mean.users) != 1:
        return None
    xf_shape = _shape(mean.args[0])
    if xf_shape is None or not _last_dim(mean.args[1], len(xf_shape)) or not (len(mean.args) > 2 and mean.args[2]):
        return None
    pw = mean.args[0]
    if not (_call(pw, aten.pow.Tensor_Scalar) and pw.args[1] == 2) or len(pw.users) != 1:
        return None
    xf = pw.args[0]
    y = _only_user(r)
    if not _call(y, *_MULS) or _other(y, r) is not xf:
        return None
    y2 = y
    while _only_user(y2) is not None and _call(_only_user(y2), *_CASTS):
        y2 = _only_user(y2)
    out = _only_user(y2)
    if not _call(out, *_MULS):
        return None
    w_expr = _other(out, y2)
    while _only_user(out) is not None and _call(_only_user(out), *_CASTS):  # Gemma: (...).type_as(x)
        out = _only_user(out)
    offset = 0.0
    w_node = _strip_casts(w_expr)
    if _call(w_node, *_ADDS) and len(w_node.users) == 1 and w_node.args[1] == 1.0:  # Gemma: (1 + w)
        offset, w_node = 1.0, _strip_casts(w_node.args[0])
    w = _attr(gm, w_node)
    x = _strip_casts(xf)
    n = xf_shape[-1]
    if w is None or w.dim() != 1 or w.numel() != n or _shape(x) != _shape(out) or _dtype(x) != _dtype(out):
        return None
    return dict(x=x, w=w_node, eps=float(eps), offset=offset, out=out)


def _fuse_rms_norms(gm: fx.GraphModule, counts: dict, plain: bool, residual: bool) -> None:
    g = gm.graph
    for r in [n for n in g.nodes if _call(n, aten.rsqrt.default)]:
        m = _match_rms_norm(gm, r)
        if m is None:
            continue
        x, out = m["x"], m["out"]
        a_b = x.args if residual and _call(x, aten.add.Tensor) and len(x.users) > 1 else None
        if a_b and all(isinstance(t, fx.Node) and _shape(t) == _shape(x) for t in a_b):
            # residual add whose sum is also the next residual: compute both in one pass, placed
            # where the add was so every use of the sum still follows it
            with g.inserting_after(x):
                w = g.get_attr(m["w"].target)
            w.meta = dict(m["w"].meta)
            with g.inserting_after(w):
                call = g.call_function(add_rms_norm, (a_b[1], a_b[0], w, m["eps"], m["offset"]))
            with g.inserting_after(call):
                normed = g.call_function(operator.getitem, (call, 1))
            call.meta.update(val=(_val(x), _val(out)), nn_module_stack=out.meta.get("nn_module_stack"))
            normed.meta["val"] = _val(out)
            _replace(out, normed)
            g.eliminate_dead_code()            # the unfused chain
            with g.inserting_after(normed):
                total = g.call_function(operator.getitem, (call, 0))
            total.meta["val"] = _val(x)
            x.replace_all_uses_with(total, delete_user_cb=lambda u: u is not call)
            g.eliminate_dead_code()            # the add itself
            counts["add_rms_norm"] += 1
        elif plain:
            with g.inserting_after(out):
                call = g.call_function(rms_norm, (x, m["w"], m["eps"], m["offset"]))
            call.meta["val"] = _val(out)
            _replace(out, call)
            counts["rms_norm"] += 1
        g.eliminate_dead_code()


# ------------------------------------------------------------------------------------------------ rope

def _match_rope(rot: fx.Node) -> dict | None:
    """From a ``cat`` node, prove ``x * cos + cat(-x[..., h:], x[..., :h]) * sin`` (h = D/2)."""
    if not _call(rot, aten.cat.default) or len(rot.users) != 1:
        return None
    parts, dim = rot.args[0], rot.args[1] if len(rot.args) > 1 else 0
    if len(parts) != 2 or not _call(parts[0], aten.neg.default):
        return None
    hi, lo = parts[0].args[0], parts[1]
    if not (_call(hi, aten.slice.Tensor) and _call(lo, aten.slice.Tensor)) or hi.args[0] is not lo.args[0]:
        return None
    x = lo.args[0]
    shape = _shape(x)
    if shape is None or len(shape) != 4 or not isinstance(shape[-1], int) or shape[-1] % 2:
        return None
    d, h = shape[-1], shape[-1] // 2
    last = (-1, 3)
    if dim not in last or hi.args[1] not in last or lo.args[1] not in last:
        return None
    if tuple(lo.args[2:4]) != (0, h) or hi.args[2] != h or not (len(hi.args) < 4 or hi.args[3] >= d):
        return None
    m_sin = _only_user(rot)
    if not _call(m_sin, *_MULS):
        return None
    sin_u = _other(m_sin, rot)
    add = _only_user(m_sin)
    if not _call(add, aten.add.Tensor):
        return None
    m_cos = _other(add, m_sin)
    if not _call(m_cos, *_MULS) or x not in m_cos.args[:2] or len(m_cos.users) != 1:
        return None
    cos_u = _other(m_cos, x)
    # cos/sin enter as unsqueeze(c, 1): [B, T, D] -> [B, 1, T, D], broadcast over heads
    if not (_call(cos_u, aten.unsqueeze.default) and _call(sin_u, aten.unsqueeze.default)
            and cos_u.args[1] == 1 and sin_u.args[1] == 1):
        return None
    cos, sin = cos_u.args[0], sin_u.args[0]
    if _shape(cos) is None or len(_shape(cos)) != 3 or _shape(cos) != _shape(sin) or _dtype(add) != _dtype(x):
        return None
    return dict(x=x, cos=cos, sin=sin, out=add)


def _fuse_ropes(gm: fx.GraphModule, counts: dict) -> None:
    g = gm.graph
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for n in list(g.nodes):
        m = _match_rope(n)
        if m is not None:
            groups[(m["cos"], m["sin"])].append(m)
    for (cos, sin), ms in groups.items():
        # q and k share cos/sin: one launch rotates both (the larger head count is q)
        for i in range(0, len(ms) - 1, 2):
            a, b = sorted(ms[i:i + 2], key=lambda m: -_shape(m["x"])[1])
            order = {n: j for j, n in enumerate(g.nodes)}
            # the one call goes after its last input and must come before every use of either output
            last_in = max((a["x"], b["x"], cos, sin), key=order.__getitem__)
            first_use = min((order[u] for m in (a, b) for u in m["out"].users), default=len(order))
            if order[last_in] >= first_use:
                continue
            with g.inserting_after(last_in):
                call = g.call_function(rope, (a["x"], b["x"], cos, sin))
            _tuple_out(g, call, [a["out"], b["out"]])
            counts["rope"] += 1
    g.eliminate_dead_code()


# ------------------------------------------------------------------------------------------------ glu

def _fuse_glus(gm: fx.GraphModule, counts: dict) -> None:
    g = gm.graph
    for mul in [n for n in g.nodes if _call(n, *_MULS)]:
        act = next((a for a in mul.args[:2] if _call(a, *_ACTS) and len(a.users) == 1), None)
        if act is None:
            continue
        up, gate = _other(mul, act), act.args[0]
        name = _ACTS[act.target]
        if name is None:  # gelu: its approximate argument names the kernel's activation
            approx = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
            name = {"tanh": "gelu_tanh", "none": "gelu"}.get(approx)
        if (name is None or not isinstance(up, fx.Node) or _shape(up) != _shape(gate) or _shape(mul) != _shape(gate)
                or _dtype(mul) != _dtype(gate)):
            continue
        with g.inserting_after(mul):
            call = g.call_function(glu, (gate, up, name))
        call.meta["val"] = _val(mul)
        _replace(mul, call)
        counts["glu"] += 1
    g.eliminate_dead_code()


# ------------------------------------------------------------------------------------------------ merge linears

def _module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _merged_storage(params: list[torch.Tensor]) -> torch.Tensor:
    """One weight [sum(out), in] (or bias [sum(out)]) whose row blocks are ``params``; the parameters
    become views of it.

    When the parameters already are consecutive row blocks of one buffer (a second compile of the
    same model), that buffer is returned without a copy."""
    base = params[0]
    rows = sum(p.shape[0] for p in params)
    row = base[0].numel()
    contiguous = all(p.is_contiguous() for p in params)
    if contiguous and all(p.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for p in params):
        offs = [p.storage_offset() for p in params]
        expect = [offs[0] + sum(q.shape[0] for q in params[:i]) * row for i in range(len(params))]
        if offs == expect:
            return base.as_strided((rows, *base.shape[1:]), base.stride(), offs[0])
    merged = torch.cat([p.detach() for p in params], 0)
    start = 0
    for p in params:
        p.data = merged[start:start + p.shape[0]]
        start += p.shape[0]
    return merged


def _merge_linears(gm: fx.GraphModule, counts: dict, labels: set[str]) -> None:
    g = gm.graph
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for n in g.nodes:
        if _call(n, aten.linear.default) and 2 <= len(n.args) <= 3 and not n.kwargs:
            w = _attr(gm, n.args[1])
            b = _attr(gm, n.args[2]) if len(n.args) == 3 and n.args[2] is not None else None
            if w is not None and w.dim() == 2 and (len(n.args) == 2 or n.args[2] is None or b is not None):
                groups[n.args[0]].append(n)
    for x, lins in groups.items():
        if len(lins) < 2:
            continue
        ws = [_attr(gm, lin.args[1]) for lin in lins]
        bs = [_attr(gm, lin.args[2]) if len(lin.args) == 3 and lin.args[2] is not None else None for lin in lins]
        if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1 or len({id(w) for w in ws}) != len(ws):
            continue
        if any(b is None for b in bs) and not all(b is None for b in bs):
            continue  # some with bias, some without: a merged bias would invent zeros
        paths = {_module_path(lin).rsplit(".", 1)[0] for lin in lins}
        parent = paths.pop() if len(paths) == 1 else ""
        label = "qkv" if parent.endswith("attn") else "gate_up" if parent.endswith("mlp") else "linears"
        if label not in labels:
            continue
        stem = (parent.removeprefix("m.") or lins[0].args[1].target).replace(".", "_")
        first = min(lins, key=lambda n: list(g.nodes).index(n))
        args = [x]
        for what, params in (("weight", ws), ("bias", bs)):
            if params[0] is None:
                continue
            attr = f"{stem}_{label}_{what}"
            while hasattr(gm, attr):
                attr += "_"
            merged = _merged_storage(params)
            gm.register_buffer(attr, merged, persistent=False)
            with g.inserting_before(first):
                node = g.get_attr(attr)
            node.meta["val"] = merged
            args.append(node)
        with g.inserting_before(first):
            big = g.call_function(aten.linear.default, tuple(args))
        big.meta["nn_module_stack"] = first.meta.get("nn_module_stack")
        start = 0
        for lin, w in zip(lins, ws):
            with g.inserting_after(big):
                part = g.call_function(aten.slice.Tensor, (big, -1, start, start + w.shape[0]))
            part.meta["val"] = _val(lin)
            start += w.shape[0]
            _replace(lin, part)
            olds = [a for a in lin.args[1:] if isinstance(a, fx.Node)]
            g.erase_node(lin)
            for old in olds:
                if not old.users:
                    g.erase_node(old)
        counts[label] += 1


PATTERNS = ("rms_norm", "add_rms_norm", "rope", "glu", "qkv", "gate_up")


def fuse_graph(gm: fx.GraphModule, patterns: tuple[str, ...] = PATTERNS) -> dict[str, int]:
    """Fuse the listed patterns in one ``fx.GraphModule`` of ATen ops (a stage, or any exported
    module); returns the rewrite count per pattern. Usable on graphs from other stacks."""
    unknown = set(patterns) - set(PATTERNS)
    if unknown:
        raise ValueError(f"fuse: unknown patterns {sorted(unknown)}; known: {', '.join(PATTERNS)}")
    counts: dict[str, int] = defaultdict(int)
    labels = {"qkv", "gate_up"} & set(patterns)
    if labels:
        _merge_linears(gm, counts, labels | {"linears"})
    if "glu" in patterns:
        _fuse_glus(gm, counts)
    if "rope" in patterns:
        _fuse_ropes(gm, counts)
    if {"rms_norm", "add_rms_norm"} & set(patterns):
        _fuse_rms_norms(gm, counts, "rms_norm" in patterns, "add_rms_norm" in patterns)
    gm.graph.lint()
    gm.recompile()
    return {p: counts[p] for p in (*PATTERNS, "linears") if p in patterns or counts[p]}


def fuse(program: Program, patterns: tuple[str, ...] = PATTERNS) -> Program:
    """Fuse the listed patterns in every stage; records ``fuse.<pattern>`` rewrite counts."""
    if program.stages is None:
        raise FuseError("fuse works on stages: run split_layers first")
    total: dict[str, int] = defaultdict(int)
    for stage in program.stages:
        for p, n in fuse_graph(stage.module, patterns).items():
            total[p] += n
    for p, n in total.items():
        program.history.append((f"fuse.{p}", n))
    return program
