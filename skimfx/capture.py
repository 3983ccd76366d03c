"""Capture a Hugging Face decoder model object as one FX graph (a ``Program``).

Why ``torch.export`` (non-strict) and not ``fx.symbolic_trace``: HF decoder layers do not
symbolically trace (decorators, ``**kwargs``, cache objects), while non-strict export runs the real
Python code on fake tensors and records ATen ops, each carrying ``nn_module_stack`` (which layer it
belongs to) and ``meta["val"]`` (its symbolic shape: which dimension is the token axis). Batch and
token axes are dynamic, so one capture serves every prompt length and batch size.

Capture does not modify the user's model: it is exported as it is (eval mode and SDPA attention are set
for the duration of the export and restored), and the graph reads the model's own parameter objects.
(The fusion pass later makes the q/k/v and gate/up parameters views of one merged buffer per layer:
same objects, same values; ``runtime.model_guard`` refuses calls after the model is changed otherwise.)
"""
from __future__ import annotations

import contextlib
import re
import weakref

import torch
import torch.fx as fx

from .program import ModelInfo, Program


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only causal LM that skimfx can capture and lower."""


class _LogitsOnly(torch.nn.Module):
    """Calls the HF model without a cache and returns only the logits tensor (no pytree of cache
    objects in the graph's output)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:$|\.)")


def layer_of(node: fx.Node) -> int | None:
    """The decoder layer a node belongs to, from the innermost ``layers.N`` in its module stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    found = _LAYER_RE.findall(path)
    return int(found[-1]) if found else None


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([v] if isinstance(v, str) else v)
    return names


def check_supported(model: torch.nn.Module) -> None:
    """Raise ``UnsupportedModelError`` with the reason when ``model`` cannot be captured."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"skimfx.compile expects a Hugging Face model object (a PreTrainedModel); got {name}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} ({config.model_type}) is an encoder-decoder model; skimfx compiles decoder-only "
            "causal LMs (…ForCausalLM)")
    if name not in _causal_lm_classes():
        kind = "an encoder-only model" if not getattr(config, "is_decoder", False) else "not a causal LM"
        raise UnsupportedModelError(
            f"{name} ({config.model_type}) is {kind} without a causal LM head; skimfx compiles decoder-only "
            "causal LMs (load one with AutoModelForCausalLM)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
        if getattr(text, attr, None) is None:
            raise UnsupportedModelError(f"{name} ({config.model_type}): config has no {attr}")


def model_info(model: torch.nn.Module) -> ModelInfo:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    param = next(model.parameters())
    return ModelInfo(
        arch=text.model_type,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None) or 2048,
        sliding_window=(None,) * text.num_hidden_layers,  # filled in by lower_attention from the graph
        attn_softcap=getattr(text, "attn_logit_softcapping", None),
        dtype=param.dtype,
        device=param.device,
    )


@contextlib.contextmanager
def _export_mode(model: torch.nn.Module):
    """Eval mode and SDPA attention for the export; the model's own settings come back after."""
    was_training = model.training
    old_impl = getattr(model.config, "_attn_implementation", None)
    try:
        model.eval()
        if old_impl != "sdpa":
            try:
                model.set_attn_implementation("sdpa")
            except Exception as e:  # the architecture has no SDPA attention
                raise UnsupportedModelError(
                    f"{type(model).__name__}: its attention has no SDPA implementation, which skimfx "
                    f"lowers ({e})") from e
        yield
    finally:
        if old_impl is not None and old_impl != "sdpa":
            model.set_attn_implementation(old_impl)
        model.train(was_training)


# One export per model object: compiling the same model with several recipes re-uses it (export is
# most of compile's time). Keyed weakly by the model, and checked against the identity, dtype, device and
# shape of every parameter and buffer and the attention implementation: a model whose modules were
# replaced, or that was moved to another dtype or device, is re-exported (the graph records dtype-
# dependent casts and the device, so an old export would be stale). Storage addresses are not part of
# the key: fusion re-points q/k/v into a merged buffer, and the graph reads the parameter objects.
_EXPORTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fingerprint(model: torch.nn.Module, example_tokens: int) -> tuple:
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return (tuple((name, id(t), t.dtype, t.device, tuple(t.shape)) for name, t in tensors),
            getattr(model.config, "_attn_implementation", None), example_tokens)


def capture(model: torch.nn.Module, example_tokens: int = 16) -> Program:
    """Export ``model`` with dynamic batch and token axes; return the un-lowered ``Program``.

    The graph's inputs are ``ctx`` (unused until ``lower_attention``), ``input_ids [B, T]`` and
    ``position_ids [B, T]``; its output is the logits ``[B, T, V]``. Each call returns a fresh graph
    (passes may rewrite it); the export itself is done once per model object.
    """
    check_supported(model)
    info = model_info(model)
    key = _fingerprint(model, example_tokens)
    cached = _EXPORTS.get(model)
    if cached is not None and cached[0] == key:
        ep = cached[1]
    else:
        ep = _export(model, info, example_tokens)
        _EXPORTS[model] = (key, ep)
    gm = ep.module()  # a new module each call; its parameters are the model's own tensors (no copy)
    _clean(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    token_sym = _sym(placeholders[0].meta["val"].shape[1])
    with gm.graph.inserting_before(placeholders[0]):
        ctx = gm.graph.placeholder("ctx")
        ctx.meta["val"] = None
    gm.recompile()
    return Program(graph_module=gm, info=info, token_symbol=token_sym)


def _export(model: torch.nn.Module, info: ModelInfo, example_tokens: int):
    device = info.device
    ids = torch.zeros(2, example_tokens, dtype=torch.long, device=device)
    pos = torch.arange(example_tokens, device=device).expand(2, -1).contiguous()
    batch = torch.export.Dim("B", min=1, max=1024)
    tokens = torch.export.Dim("T", min=2, max=max(info.max_positions, example_tokens + 1))
    with _export_mode(model), torch.no_grad():
        try:
            args = (_LogitsOnly(model), (ids, pos))
            shapes = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
            try:
                ep = torch.export.export(*args, dynamic_shapes=shapes, strict=False)
            except torch._dynamo.exc.UserError as e:
                # Some torch releases (2.11) guard on facts they cannot prove for every token count, such as
                # Min(64*T, 192*T) == 64*T in a contiguity check, and reject the dynamic axis. Such guards
                # hold for every T >= 1; deferring them to runtime asserts (dropped in _clean) keeps the
                # axis dynamic.
                if "Constraints violated" not in str(e):
                    raise
                ep = torch.export.export(*args, dynamic_shapes=shapes, strict=False,
                                         prefer_deferred_runtime_asserts_over_guards=True)
        except UnsupportedModelError:
            raise
        except Exception as e:
            raise UnsupportedModelError(
                f"{type(model).__name__}: torch.export could not capture the model with dynamic batch and "
                f"token axes: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return ep


def _sym(size):
    return size.node.expr if isinstance(size, torch.SymInt) else size


def _clean(gm: fx.GraphModule) -> None:
    """Turn export's unlifted module into a plain graph: flat inputs, one tensor output, and no
    shape-guard or metadata-assert nodes (they would pin the example's shapes and device)."""
    g = gm.graph
    g._codegen = fx.graph.CodeGen()  # drop the pytree in/out wrapping
    for node in list(g.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            g.erase_node(node)
        elif node.op == "call_function" and node.target in (
                torch.ops.aten._assert_tensor_metadata.default,
                torch.ops.aten._assert_scalar.default,
                torch.ops.aten.sym_constrain_range_for_size.default):
            g.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    _drop_identity_casts(g)
    out = next(n for n in g.nodes if n.op == "output")
    result = out.args[0]
    while isinstance(result, (tuple, list)):
        if len(result) != 1:
            raise UnsupportedModelError(f"expected the graph to return one logits tensor, got {len(result)} values")
        result = result[0]
    out.args = (result,)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device,
          torch.ops.aten.type_as.default, torch.ops.aten.alias.default}


def _drop_identity_casts(g: fx.Graph) -> int:
    """Remove casts whose output has its input's dtype, device and shape (``x.to(float32)`` on an
    fp32 model): they return their input unchanged, and each costs a dispatch per token."""
    n_removed = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _CASTS or not isinstance(node.args[0], fx.Node):
            continue
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        if (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype
                and src.device == out.device and src.shape == out.shape):
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
            n_removed += 1
    return n_removed
