"""fold_selection: a selection folded into its layer (right after the attention) gives the tokens, kept indices
and logits of the selection run after the layer, while the rest of the layer runs on the kept tokens only."""
import pytest
import torch

import skimfx
from skimfx import GemFilter, PromptDistill
from skimfx.kernels.linear import linear, linear_packable
from skimfx.program import cached_attention, select_tokens
from skimfx.runtime import Ctx
from skimfx.runtime.cache import KVCache
from skimfx.runtime.executor import Executor
from skimfx.runtime.steps import plan_capacity, prefill
from tests.runtime.test_speculation_over_policies import TOKENIZER
from tiny import tiny_model

RECIPES = [PromptDistill(layers=(0, 1), keep=(0.5, 0.2), keep_last=3),
           PromptDistill(layers=1, keep=0.3, window=4, softmax=True, heads="max", granularity="sentence"),
           GemFilter(layer=1, keep=25)]


def unfolded(cm):
    for st in cm.program.stages:
        if st.kind == "select":
            st.folded = None
    return cm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
@pytest.mark.parametrize("recipe", RECIPES, ids=["two-stage", "sentence", "gemfilter"])
def test_folded_selection_equals_selection_after_the_layer(arch, recipe):
    model = tiny_model(arch)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (90, 57)]
    folded = skimfx.compile(model, recipe, tokenizer=TOKENIZER)
    assert all(st.folded is not None for st in folded.program.stages if st.kind == "select")
    after = unfolded(skimfx.compile(model, recipe, tokenizer=TOKENIZER))
    a = folded.generate(prompts, max_new_tokens=8, stop_tokens=[])
    b = after.generate(prompts, max_new_tokens=8, stop_tokens=[])
    assert a.tokens == b.tokens
    assert a.stats.selected == b.stats.selected
    assert a.stats.layer_tokens == b.stats.layer_tokens
    # the first token's logits: the same values to float rounding (a matmul over fewer rows may sum differently)
    logits = []
    for cm in (folded, after):
        cache = KVCache.for_program(cm.program, 2, plan_capacity(cm.program, 90, 1))
        with torch.inference_mode():
            logits.append(prefill(cm.program, cache, prompts))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def _run_folded(cm, ids, layer):
    """Layers below ``layer`` as usual, then the folded module of ``select.layer``; returns (outputs by name,
    index, ctx, the layer's own outputs on the same inputs)."""
    prog = cm.program
    T = ids.shape[1]
    cache = KVCache.for_program(prog, 1, [T + 1] * prog.info.num_layers)
    ctx = Ctx(cache, [T], prog, prune=True)
    ex = Executor(prog)
    with torch.inference_mode():
        env = ex.embed(ctx, ids, torch.arange(T)[None])
        ex.run_layers(ctx, env, 0, layer)
        st = prog.stage(f"layer.{layer}")
        args = [env[n] for n in st.inputs]
        *outs, index = prog.stage(f"select.{layer}").folded(ctx, *args)
        whole = st.module(Ctx(KVCache.for_program(prog, 1, [T + 1] * prog.info.num_layers), [T], prog), *args)
    return dict(zip(st.outputs, outs)), index, ctx, dict(zip(st.outputs, whole))


def test_the_rest_of_the_selection_layer_runs_on_the_kept_tokens():
    model = tiny_model("llama")
    cm = skimfx.compile(model, PromptDistill(layers=1, keep=16))
    ids = torch.randint(0, 512, (1, 80))
    outs, index, ctx, whole = _run_folded(cm, ids, 1)
    name = cm.program.hidden_output(1)
    assert index.shape == (1, 16) and ctx.kept == [16]
    assert outs[name].shape[1] == 16                               # the layer's output: kept tokens only
    assert ctx.cache.lengths(1) == [80]                            # its cache: every token (the attention ran on all)
    assert cm.program.stage("select.1").folded_gathered == (name,)
    # the unfolded layer computes all 80 tokens; its rows at the kept indices are the folded output
    assert whole[name].shape[1] == 80
    torch.testing.assert_close(outs[name], whole[name][:, index[0]], rtol=1e-5, atol=1e-5)


def test_gemfilter_first_pass_stops_after_the_selection():
    model = tiny_model("llama")
    cm = skimfx.compile(model, GemFilter(layer=1, keep=20))
    folded = cm.program.stage("select.1").folded
    layer = cm.program.stage("layer.1").module
    linears = lambda g: [n for n in g.nodes if n.target in (linear, linear_packable)]  # noqa: E731
    nodes = list(folded.graph.nodes)
    assert [n.target for n in nodes if n.op == "call_function"].count(select_tokens) == 1
    attn = next(i for i, n in enumerate(nodes) if n.target is cached_attention)
    assert linears(folded.graph) and all(nodes.index(n) < attn for n in linears(folded.graph))
    assert len(linears(folded.graph)) < len(linears(layer.graph))   # the output projection and MLP are gone
    outs, index, _, _ = _run_folded(cm, torch.randint(0, 512, (1, 60)), 1)
    assert outs == {} and index.shape == (1, 20)


def test_no_selection_no_fold():
    cm = skimfx.compile(tiny_model("llama"))
    assert "fold_selection" not in dict(cm.program.history)
    pruned = skimfx.compile(tiny_model("llama"), PromptDistill(layers=(0, 1), keep=(30, 10)))
    assert dict(pruned.program.history)["fold_selection"] == 2
