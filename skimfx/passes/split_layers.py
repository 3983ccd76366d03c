"""split_layers: cut the graph into stages prologue | layer 0 … layer L-1 | epilogue.

Why: the runtime needs to stop, branch or gather between layers (early exit, token pruning). Each
stage becomes its own ``fx.GraphModule`` whose inputs are ``ctx`` and the boundary values it reads
(the residual stream, RoPE cos/sin, position ids, …); the Program records every boundary value with
its token axis, read off the symbolic shape, so later passes can gather or reroute it generically.

What it preserves: every op runs exactly as in the whole graph (nodes are copied, not rewritten);
weights are the same tensors. Symbolic sizes (``sym_size(T)``) a stage uses are recomputed from the
stage's own tensor inputs rather than passed in, so a stage that sees fewer tokens than the
prologue (after pruning) reshapes with its own token count.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import UnsupportedModelError, layer_of
from ..program import BoundaryValue, Program, Stage

aten = torch.ops.aten


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else size


def _val(node: fx.Node):
    return node.meta.get("val")


def _token_axis(node: fx.Node, token_sym) -> int | None:
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        return None
    axes = [i for i, s in enumerate(val.shape) if _expr(s) == token_sym]
    return axes[0] if len(axes) == 1 else None


def _shape_str(node: fx.Node) -> str:
    val = _val(node)
    if isinstance(val, torch.Tensor):
        return "[" + ", ".join(str(_expr(s)) for s in val.shape) + "]"
    if isinstance(val, torch.SymInt):
        return f"<{_expr(val)}>"
    return ""


def _assign_stages(graph: fx.Graph, num_layers: int) -> dict[fx.Node, str]:
    nodes = list(graph.nodes)
    layer = {n: layer_of(n) for n in nodes if n.op == "call_function"}
    positions = [i for i, n in enumerate(nodes) if layer.get(n) is not None]
    if not positions:
        raise UnsupportedModelError("no node belongs to a decoder layer ('layers.N' in nn_module_stack)")
    first, last = positions[0], positions[-1]
    found = sorted({v for v in layer.values() if v is not None})
    if found != list(range(num_layers)):
        raise UnsupportedModelError(f"expected layers 0..{num_layers - 1} in the graph, found {found}")
    where: dict[fx.Node, str] = {}
    for i, n in enumerate(nodes):
        if n.op != "call_function":
            continue
        if layer[n] is not None:
            where[n] = f"layer.{layer[n]}"
        elif i < first:
            where[n] = "prologue"
        elif i > last:
            where[n] = "epilogue"
        else:
            # A model-level op between layers: hoist it to the prologue when it only reads inputs
            # and prologue values (e.g. a shared mask or rotary table); anything else is ambiguous.
            if all(a.op in ("placeholder", "get_attr") or where.get(a) == "prologue" for a in n.all_input_nodes):
                where[n] = "prologue"
            else:
                raise UnsupportedModelError(
                    f"node {n.name} ({n.target}) sits between layers, belongs to none, and reads layer values")
    return where


def _flat_weights(module: fx.GraphModule) -> fx.GraphModule:
    """Bind each weight the stage reads as a direct attribute (``model_layers_3_mlp_up_proj_weight``)
    instead of a nested module path: the same tensor objects, but one attribute lookup per weight per
    call instead of one per path component, which is measurable in a 1-token decode step."""
    for node in module.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        tensor = module.get_parameter(node.target) if _is_param(module, node.target) else module.get_buffer(node.target)
        flat = node.target.removeprefix("m.").replace(".", "_")
        if isinstance(tensor, torch.nn.Parameter):
            module.register_parameter(flat, tensor)
        else:
            module.register_buffer(flat, tensor)
        node.target = flat
    for child in list(module._modules):
        delattr(module, child)
    module.recompile()
    return module


def _is_param(module: torch.nn.Module, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    return name in module.get_submodule(owner)._parameters


def split_layers(program: Program) -> Program:
    gm = program.graph_module
    g = gm.graph
    info = program.info
    where = _assign_stages(g, info.num_layers)
    order = ["prologue"] + [f"layer.{i}" for i in range(info.num_layers)] + ["epilogue"]
    rank = {name: i for i, name in enumerate(order)}
    output_node = next(n for n in g.nodes if n.op == "output")
    logits = output_node.args[0]

    def producer(n: fx.Node) -> str:
        return "input" if n.op == "placeholder" else where.get(n, "const")

    # Which values each stage reads from elsewhere, and which it must export.
    reads: dict[str, list[fx.Node]] = {s: [] for s in order}
    exported: dict[str, list[fx.Node]] = {s: [] for s in order}
    for n, s in where.items():
        for a in n.all_input_nodes:
            src = producer(a)
            if src in ("const",) or a.name == "ctx" or src == s:
                continue
            if src != "input" and rank[src] > rank[s]:
                raise UnsupportedModelError(f"{s} reads {a.name} from the later stage {src}")
            if a not in reads[s]:
                reads[s].append(a)
            if src != "input" and a not in exported[src] and not isinstance(_val(a), torch.SymInt):
                exported[src].append(a)
    if where.get(logits) != "epilogue":
        # a model whose head has no ops after the last layer (never seen): still give it an epilogue
        raise UnsupportedModelError("the logits are not computed after the last decoder layer")
    exported["epilogue"] = [logits]

    stages: list[Stage] = []
    values: dict[str, BoundaryValue] = {}
    for n in g.nodes:
        if n.op == "placeholder" and n.name != "ctx":
            values[n.name] = BoundaryValue(n.name, "input", _token_axis(n, program.token_symbol),
                                           _shape_str(n), getattr(_val(n), "dtype", None))
    for s in order:
        sg = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        ctx = sg.placeholder("ctx")
        inputs: list[str] = []
        sym_inputs: list[fx.Node] = []
        for a in reads[s]:
            if isinstance(_val(a), torch.SymInt):
                sym_inputs.append(a)
                continue
            p = sg.placeholder(a.name)
            p.meta = dict(a.meta)
            env[a] = p
            inputs.append(a.name)
        for a in sym_inputs:  # recompute symbolic sizes from this stage's own tensor inputs
            sym = _expr(_val(a))
            src = None
            for name in inputs:
                ph = env[next(x for x in reads[s] if x.name == name)]
                shape = getattr(_val(ph), "shape", ())
                dims = [i for i, d in enumerate(shape) if _expr(d) == sym]
                if dims:
                    src = (ph, dims[0])
                    break
            if src is None:
                p = sg.placeholder(a.name)  # no tensor input carries it: pass it in
                p.meta = dict(a.meta)
                env[a] = p
                inputs.append(a.name)
            else:
                local = sg.call_function(aten.sym_size.int, src)
                local.meta = dict(a.meta)
                env[a] = local
        for n in g.nodes:
            if where.get(n) != s:
                continue
            for a in n.all_input_nodes:
                if a not in env:
                    if a.op == "get_attr":
                        env[a] = sg.get_attr(a.target)
                        env[a].meta = dict(a.meta)
                    elif a.name == "ctx":
                        env[a] = ctx
            env[n] = sg.node_copy(n, lambda x: env[x])
        outs = exported[s]
        sg.output(tuple(env[o] for o in outs))
        sg.eliminate_dead_code()
        sg.lint()
        module = _flat_weights(fx.GraphModule(gm, sg, class_name=s.replace(".", "_")))
        layer = int(s.split(".")[1]) if s.startswith("layer.") else None
        kind = "layer" if layer is not None else s
        stages.append(Stage(name=s, kind=kind, layer=layer, module=module, inputs=inputs,
                            outputs=[o.name for o in outs]))
        for o in outs:
            values[o.name] = BoundaryValue(o.name, s, _token_axis(o, program.token_symbol), _shape_str(o),
                                           getattr(_val(o), "dtype", None))
    program.stages = stages
    program.values = values
    program.history.append(("split_layers", len(stages)))
    return program
