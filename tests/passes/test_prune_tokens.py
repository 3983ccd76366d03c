"""prune_tokens + the GemFilter / PromptDistill recipes: selection rules against a direct computation
from HF's own modules, physical KV shrink, ragged batches, decode after pruning, validation."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import skimfx
from skimfx import GemFilter, PromptDistill, RecipeError
from skimfx.program import select_tokens
from tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def reference_qk(model, ids, layer):
    """Layer ``layer``'s post-RoPE q and (GQA-repeated) k, computed with HF's own modules."""
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states[layer]        # input of the layer
        blk = model.model.layers[layer]
        h = blk.input_layernorm(hs)
        B, T, _ = h.shape
        D = model.config.head_dim
        q = blk.self_attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)
        k = blk.self_attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(T)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def topk_rule(scores, keep, keep_last):
    s = scores.clone()
    s[len(s) - keep_last:] = float("inf")
    return sorted(torch.topk(s, keep).indices.tolist())


def test_gemfilter_indices_follow_the_paper_rule(llama):
    ids = torch.randint(0, 512, (1, 90))
    cm = skimfx.compile(llama, GemFilter(layer=1, keep=24, keep_last=3))
    got = cm.generate(ids, max_new_tokens=1, stop_tokens=[]).stats.selected[1][0]
    q, k = reference_qk(llama, ids, 1)
    scores = (q[0, :, -1:] @ k[0].transpose(-1, -2)).sum(0)[0]                # q_last·Kᵀ, summed over heads
    scores = F.avg_pool1d(scores[None, None], 5, 1, 2)[0, 0]
    assert got == topk_rule(scores, 24, 3)


@pytest.mark.parametrize("pool_kernel", [5, 1])
def test_promptdistill_indices_follow_the_paper_rule(llama, pool_kernel):
    ids = torch.randint(0, 512, (1, 77))
    cm = skimfx.compile(llama, PromptDistill(layers=0, keep=20, keep_last=2, pool_kernel=pool_kernel))
    got = cm.generate(ids, max_new_tokens=1, stop_tokens=[]).stats.selected[0][0]
    q, k = reference_qk(llama, ids, 0)
    D = q.shape[-1]
    scores = (q[0, :, -1:] @ k[0].transpose(-1, -2) / D ** 0.5).mean(0)[0]   # q_last·Kᵀ/√d, mean over heads
    if pool_kernel > 1:
        scores = F.avg_pool1d(scores[None, None], pool_kernel, 1, pool_kernel // 2)[0, 0]
    assert got == topk_rule(scores, 20, 2)


def test_gemfilter_generation_equals_hf_on_the_kept_tokens(llama):
    """The GemFilter re-run is the whole model on the kept token ids with fresh positions."""
    ids = torch.randint(0, 512, (1, 70))
    cm = skimfx.compile(llama, GemFilter(layer=2, keep=25))
    g = cm.generate(ids, max_new_tokens=12, stop_tokens=[])
    kept = torch.tensor([g.stats.selected[2][0]])
    with torch.no_grad():
        ref = llama.generate(ids[:, kept[0]], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert g.tokens[0] == ref[0, 25:].tolist()
    assert g.stats.layer_tokens == [25, 25, 25]


def test_promptdistill_shrinks_later_layers_and_decodes(llama):
    prompt = torch.randint(0, 512, (80,)).tolist()
    cm = skimfx.compile(llama, PromptDistill(layers=1, keep=16))
    g = cm.generate(prompt, max_new_tokens=40, stop_tokens=[])
    assert len(g.tokens[0]) == 40
    assert g.stats.layer_tokens == [80, 80, 16]
    info = cm.info
    per_slot = 2 * info.num_kv_heads * info.head_dim * 4
    assert g.stats.kv_prefill_bytes == per_slot * ((80 + 40) * 2 + (16 + 40))
    dense = skimfx.compile(llama).generate(prompt, max_new_tokens=40, stop_tokens=[])
    assert g.stats.kv_bytes < dense.stats.kv_bytes


def test_truncate_earlier_kv_and_two_stages(llama):
    prompt = torch.randint(0, 512, (90,)).tolist()
    cm = skimfx.compile(llama, PromptDistill(layers=(0, 1), keep=(40, 12), truncate_earlier_kv=True))
    g = cm.generate(prompt, max_new_tokens=10, stop_tokens=[])
    assert g.stats.layer_tokens == [12, 12, 12]
    first, second = g.stats.selected[0][0], g.stats.selected[1][0]
    assert len(first) == 40 and len(second) == 12 and second == sorted(second)
    assert dict(cm.program.history)["prune_tokens"] == 2
    assert [s.name for s in cm.program.stages][:6] == ["prologue", "layer.0", "select.0", "layer.1", "select.1",
                                                        "layer.2"]


@pytest.mark.parametrize("recipe", [PromptDistill(layers=0, keep=20), GemFilter(layer=1, keep=20)])
def test_ragged_batch_equals_each_prompt_alone(llama, recipe):
    cm = skimfx.compile(llama, recipe)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (64, 33, 47)]
    batch = cm.generate(prompts, max_new_tokens=8, stop_tokens=[])
    for b, p in enumerate(prompts):
        alone = cm.generate(p, max_new_tokens=8, stop_tokens=[])
        assert alone.tokens[0] == batch.tokens[b]
        assert alone.stats.selected == {k: [v[b]] for k, v in batch.stats.selected.items()}


@pytest.mark.parametrize("granularity", ["token", "sentence"])
def test_keep_as_a_fraction_of_each_prompt(llama, granularity):
    """keep=0.25/0.1 keeps a quarter of each prompt (as given) at the first stage and a tenth at the second, per
    sequence of a ragged batch; the same as the token counts for each prompt alone, and the capacity follows."""
    from tests.runtime.test_speculation_over_policies import TOKENIZER
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (120, 60)]
    frac = skimfx.compile(llama, PromptDistill(layers=(0, 1), keep=(0.25, 0.1), keep_last=4, granularity=granularity),
                          tokenizer=TOKENIZER)
    g = frac.generate(prompts, max_new_tokens=6, stop_tokens=[])
    if granularity == "token":
        assert [len(r) for r in g.stats.selected[0]] == [30, 15]
        assert [len(r) for r in g.stats.selected[1]] == [12, 6]
    for b, (p, (k1, k2)) in enumerate(zip(prompts, [(30, 12), (15, 6)])):
        alone = skimfx.compile(llama, PromptDistill(layers=(0, 1), keep=(k1, k2), keep_last=4, granularity=granularity),
                               tokenizer=TOKENIZER).generate(p, max_new_tokens=6, stop_tokens=[])
        assert alone.tokens[0] == g.tokens[b]
        assert alone.stats.selected == {k: [v[b]] for k, v in g.stats.selected.items()}
    assert skimfx.parse_recipe("promptdistill:layers=0/1,keep=25%/10%") == [PromptDistill(layers=(0, 1),
                                                                                           keep=(0.25, 0.1))]
    from skimfx.runtime.steps import plan_capacity
    assert plan_capacity(frac.program, 120, 6) == [126, 36, 18]


def test_delta_adds_a_select_layer_above_a_pruning_stage():
    """DELTA's default layout over a PromptDistill stage listed before it gets a select layer right above the
    pruning, so no reuse layer reads a set chosen over other tokens; listed after it, the clear refusal."""
    import transformers as tf
    from tiny import tiny_configs
    cfg = tiny_configs()["llama"]
    cfg.num_hidden_layers = 8
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    alone = skimfx.compile(model, "delta:budget=8,recent=4")
    assert sorted(l for l, p in alone.program.policies.items() if p.role == "select") == [2, 5]
    cm = skimfx.compile(model, "promptdistill:layers=3,keep=0.5+delta:budget=8,recent=4")
    assert sorted(l for l, p in cm.program.policies.items() if p.role == "select") == [2, 4, 5]
    g = cm.generate([torch.randint(0, 512, (60,)).tolist()], max_new_tokens=6, stop_tokens=[])
    assert [len(r) for r in g.stats.selected[3]] == [30] and len(g.tokens[0]) == 6
    with pytest.raises(skimfx.passes.PolicyError, match="list the pruning recipe before delta"):
        skimfx.compile(model, "delta:budget=8,recent=4+promptdistill:layers=3,keep=0.5")


def test_keep_at_least_the_prompt_is_dense_and_says_so(llama):
    prompt = torch.randint(0, 512, (30,)).tolist()
    cm = skimfx.compile(llama, PromptDistill(layers=0, keep=64))
    with pytest.warns(UserWarning, match="no tokens are pruned"):
        g = cm.generate(prompt, max_new_tokens=10, stop_tokens=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert g.tokens == skimfx.compile(llama).generate(prompt, max_new_tokens=10, stop_tokens=[]).tokens


def test_full_logits_forward_is_dense(llama):
    ids = torch.randint(0, 512, (1, 50))
    cm = skimfx.compile(llama, PromptDistill(layers=0, keep=8))
    with torch.no_grad():
        assert (cm(ids).logits - llama(ids).logits).abs().max() <= 1e-4


def test_pass_inserts_one_select_stage_per_layer(llama):
    cm = skimfx.compile(llama, PromptDistill(layers=(0, 1), keep=(30, 10)))
    sel = [s for s in cm.program.stages if s.kind == "select"]
    assert [s.layer for s in sel] == [0, 1]
    for s in sel:
        calls = [n for n in s.module.graph.nodes if n.target is select_tokens]
        assert len(calls) == 1
        q = cm.program.values[s.inputs[0]]
        assert q.token_axis == 2 and q.producer == f"layer.{s.layer}"
    dense = skimfx.compile(llama)
    assert not [s for s in dense.program.stages if s.kind == "select"]   # negative: no recipe, no rewrite


@pytest.mark.parametrize("make,match", [
    (lambda: PromptDistill(layers=0, keep=0), "keep must be > 0"),
    (lambda: PromptDistill(layers=0, keep=-5), "keep must be > 0"),
    (lambda: PromptDistill(layers=0, keep=1.0), r"keep as a fraction must be in \(0, 1\)"),
    (lambda: GemFilter(layer=0, keep=0.0), r"keep as a fraction must be in \(0, 1\)"),
    (lambda: PromptDistill(layers=(0, 1), keep=(10, 20, 30)), "one keep per selection layer"),
    (lambda: GemFilter(layer=-1, keep=10), "layer must be a layer index"),
    (lambda: GemFilter(layer=1, keep=4, keep_last=8), "keep_last must be in 0..keep"),
])
def test_invalid_recipe_parameters(make, match):
    with pytest.raises(RecipeError, match=match):
        make()


@pytest.mark.parametrize("recipe,match", [
    (PromptDistill(layers=2, keep=10), r"valid layers are 0\.\.1 for this 3-layer model"),
    (PromptDistill(layers=7, keep=10), r"selection layer 7 is out of range"),
    (GemFilter(layer=3, keep=10), r"valid layers are 0\.\.2"),
    (PromptDistill(layers=(1, 0), keep=10), "strictly increasing"),
    (PromptDistill(layers=(0, 1), keep=(10, 20)), "must not grow"),
])
def test_recipe_that_does_not_fit_the_model(llama, recipe, match):
    with pytest.raises(ValueError, match=match):
        skimfx.compile(llama, recipe)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_recipes_on_every_random_config(arch):
    model = tiny_model(arch)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (70, 52)]
    gf = skimfx.compile(model, GemFilter(layer=1, keep=30)).generate(prompts, max_new_tokens=6, stop_tokens=[])
    for b, p in enumerate(prompts):
        kept = gf.stats.selected[1][b]
        with torch.no_grad():
            ref = model.generate(torch.tensor([[p[i] for i in kept]]), max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
        assert gf.tokens[b] == ref[0, 30:].tolist()
    pd = skimfx.compile(model, PromptDistill(layers=1, keep=20)).generate(prompts, max_new_tokens=30, stop_tokens=[])
    assert [len(t) for t in pd.tokens] == [30, 30]
    L = model.config.num_hidden_layers
    assert pd.stats.layer_tokens == [70, 70] + [20] * (L - 2)
