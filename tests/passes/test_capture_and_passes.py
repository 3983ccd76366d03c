"""Capture + lower_attention + split_layers on the random-weight configs: exact HF logits, rewrite
counts, boundary values, and the clear errors for what is not supported."""
import pytest
import torch
import transformers as tf

import skimfx
from skimfx.capture import UnsupportedModelError, capture
from skimfx.passes import PassError, PassManager, lower_attention, split_layers
from skimfx.kernels.linear import linear_packable as linear  # compile lowers to the packable kernel by default
from skimfx.program import cached_attention
from tiny import tiny_configs, tiny_model

ARCHS = list(tiny_configs())


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for arch in ARCHS:
        m = tiny_model(arch)
        out[arch] = (m, skimfx.compile(m))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T", [1, 7, 64, 513])
def test_prefill_logits_equal_hf(compiled, arch, T):
    model, cm = compiled[arch]
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    with torch.no_grad():
        ref = model(ids).logits
    got = cm(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_rewrite_counts_and_stages(compiled, arch):
    model, cm = compiled[arch]
    p = cm.program
    L = model.config.num_hidden_layers
    # every projection, MLP and LM-head linear ends on the decode-shaped linear kernel (qkv, o, gate_up, down
    # per layer after fusion, plus the head); no aten.linear is left to run
    calls = [n.target for s in p.stages for n in s.module.graph.nodes if n.op == "call_function"]
    assert calls.count(linear) == 4 * L + 1 and torch.ops.aten.linear.default not in calls
    assert {k: v for k, v in p.history if not k.startswith("fuse.")} == \
        {"lower_attention": L, "split_layers": L + 2, "lower_linear": 4 * L + 1}
    assert [s.name for s in p.stages] == ["prologue"] + [f"layer.{i}" for i in range(L)] + ["epilogue"]
    gm = p.graph_module
    calls = [n for n in gm.graph.nodes if n.target is cached_attention]
    assert len(calls) == L
    sdpa = [n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert not sdpa
    # the causal mask subgraph is dead and gone: no [.., T, T] value is left anywhere
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            syms = [str(d) for d in val.shape]
            assert syms.count(str(p.token_symbol)) <= 1, f"{n.name} {syms} still has two token axes"
    # cache k/v are un-repeated: the op receives [B, Hkv, T, D]
    for n in calls:
        assert n.args[3].meta["val"].shape[1] == model.config.num_key_value_heads


@pytest.mark.parametrize("arch", ARCHS)
def test_boundary_values_have_token_axes(compiled, arch):
    model, cm = compiled[arch]
    p = cm.program
    for s in p.layer_stages:
        assert len(s.outputs) == 1
        assert p.values[s.outputs[0]].token_axis == 1          # the residual stream [B, T, H]
        for name in s.inputs:
            assert p.values[name].token_axis is not None      # residual, cos/sin: all per token
        # no SymInt crosses a boundary: each stage recomputes sizes from its own inputs
        assert all(p.values[n].shape.startswith("[") for n in s.inputs)


def test_sliding_window_read_from_mask():
    model = tiny_model("gemma3")
    p = split_layers(lower_attention(capture(model)))
    assert [p.attention[i].window for i in range(4)] == [40, None, 40, None]
    assert p.info.sliding_window == (40, None, 40, None)
    assert p.attention[0].scale == pytest.approx(24 ** -0.5)
    m2 = tiny_model("mistral")
    p2 = lower_attention(capture(m2))
    assert {a.window for a in p2.attention.values()} == {48}
    llama = lower_attention(capture(tiny_model("llama")))
    assert {a.window for a in llama.attention.values()} == {None}


def test_ignoring_the_window_would_change_logits():
    """Negative control: the window matters at T > window, so the exact match above is meaningful."""
    model = tiny_model("mistral")
    cm = skimfx.compile(model)
    ids = torch.randint(0, 512, (1, 120))
    with torch.no_grad():
        ref = model(ids).logits
    for st in cm.program.layer_stages:
        for n in st.module.graph.nodes:
            if n.target is cached_attention:
                n.args = n.args[:6] + (None,) + n.args[7:]
        st.module.recompile()
    assert (cm(ids).logits - ref).abs().max().item() > 1e-2


def test_print_program_shows_stages_and_attention(compiled):
    text = str(compiled["gemma3"][1].program)
    assert "lower_attention (4 rewrites)" in text
    assert "layer.0" in text and "window 40" in text and "epilogue" in text
    assert "tok@1" in text


def test_model_object_is_not_modified():
    model = tiny_model("llama")
    model.train()
    model.config._attn_implementation = "eager"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = skimfx.compile(model)
    assert model.training and model.config._attn_implementation == "eager"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the compiled graph reads the model's own weight tensors (no copies)
    gm = cm.program.stage("layer.0").module
    w = dict(gm.named_parameters())
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert w and all(p.data_ptr() in ptrs for p in w.values())


def test_pass_manager_names_the_failing_pass():
    def broken(program):
        raise RuntimeError("boom")

    with pytest.raises(PassError, match="pass 'broken' failed: RuntimeError: boom"):
        PassManager([broken])(capture(tiny_model("llama")))


def test_lint_runs_after_each_pass():
    def corrupt(program):
        g = program.graph_module.graph
        ops = [n for n in g.nodes if n.op == "call_function"]
        with g.inserting_before(ops[0]):
            g.call_function(torch.ops.aten.neg.default, (ops[-1],))  # uses a value before it exists
        return program

    with pytest.raises(PassError, match="pass 'corrupt' failed"):
        PassManager([corrupt])(capture(tiny_model("llama")))


@pytest.mark.parametrize("make,match", [
    (lambda: tf.BertModel(tf.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                        intermediate_size=32, vocab_size=50)), "encoder-only"),
    (lambda: tf.T5ForConditionalGeneration(tf.T5Config(num_layers=1, d_model=32, num_heads=2, d_ff=32,
                                                       vocab_size=50)), "encoder-decoder"),
    (lambda: torch.nn.Linear(2, 2), "Hugging Face model object"),
    (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                  num_key_value_heads=1, head_dim=16, intermediate_size=32,
                                                  vocab_size=50)), "no SDPA implementation"),
    (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0,
                                              eos_token_id=0)), "pattern not found"),
])
def test_unsupported_models_get_clear_errors(make, match):
    with pytest.raises(UnsupportedModelError, match=match):
        skimfx.compile(make())


def test_second_compile_reuses_the_export_but_not_the_graph():
    import importlib

    cap = importlib.import_module("skimfx.capture")   # the module (skimfx.capture is also the function)
    model = tiny_model("llama")
    a = skimfx.compile(model, "promptdistill:layers=0,keep=8")
    ep = cap._EXPORTS[model][1]
    b = skimfx.compile(model)
    assert cap._EXPORTS[model][1] is ep                       # exported once
    assert [s.kind for s in a.program.stages].count("select") == 1
    assert [s.kind for s in b.program.stages].count("select") == 0   # a's pass did not touch b's graph
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    c = skimfx.compile(model)                                 # a replaced module: exported again
    assert cap._EXPORTS[model][1] is not ep
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert (c(ids).logits - model(ids).logits).abs().max() <= 1e-4


def _export_that_rejects_dynamic_tokens(monkeypatch, error_type, message):
    """torch.export as some torch releases (2.11) behave on HF decoders: the dynamic token axis is rejected
    for a guard they cannot prove, unless guards are deferred to runtime asserts."""
    from torch._dynamo.exc import UserError

    real = torch.export.export
    calls = []

    def export(*args, **kwargs):
        calls.append(kwargs.get("prefer_deferred_runtime_asserts_over_guards", False))
        if not calls[-1]:
            raise UserError(error_type, message)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    return calls


def test_capture_defers_guards_a_release_cannot_prove(monkeypatch):
    from torch._dynamo.exc import UserErrorType

    calls = _export_that_rejects_dynamic_tokens(
        monkeypatch, UserErrorType.CONSTRAINT_VIOLATION,
        "Constraints violated (T)! Not all values of T satisfy the generated guard Eq(Min(64*T, 192*T), 64*T)")
    model = tiny_model("llama")
    cm = skimfx.compile(model)
    assert calls == [False, True]                             # retried once, with the guards deferred
    for T in (3, 37):                                         # and the token axis stayed dynamic
        ids = torch.randint(0, 512, (2, T))
        with torch.no_grad():
            assert (cm(ids).logits - model(ids).logits).abs().max() <= 1e-4
    g = cm.generate(ids[:, :9], max_new_tokens=4, stop_tokens=[])
    assert all(len(t) == 4 for t in g.tokens)


def test_capture_does_not_retry_other_export_errors(monkeypatch):
    from torch._dynamo.exc import UserErrorType

    calls = _export_that_rejects_dynamic_tokens(monkeypatch, UserErrorType.DYNAMIC_CONTROL_FLOW,
                                                "data-dependent control flow")
    with pytest.raises(UnsupportedModelError, match="data-dependent control flow"):
        skimfx.compile(tiny_model("llama"))
    assert calls == [False]
