"""Knorm and KeyDiff: scores of the cached keys alone. The kept sets against the papers' rules computed
from HF's own modules (the layer's post-RoPE keys); generation after compression against HF with the
per-head mask it implies; ragged batches; physical shrink; bad parameters; SmolLM2."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import skimfx
from skimfx import KeyDiff, Knorm, RecipeError
from tiny import tiny_model

from tests.passes.test_prune_tokens import reference_qk  # noqa: E402
from tests.runtime.test_kv_policies import _hf_with_layer_mask, per_head_kept_mask, prompts  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def hf_keys(model, ids, layer):
    """The layer's post-RoPE keys per KV head, [Hkv, T, D], from HF's modules."""
    _, k = reference_qk(model, torch.tensor([ids]), layer)
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    return k[0, ::G]                                                  # k arrives GQA-repeated


def knorm_rule(k, budget):
    """Knorm: the ``budget`` keys with the lowest L2 norm, per KV head."""
    return [sorted((-k[h].norm(dim=-1)).topk(budget).indices.tolist()) for h in range(k.shape[0])]


def keydiff_rule(k, budget):
    """KeyDiff: anchor = mean of the L2-normalised keys; keep the ``budget`` keys with the lowest cosine
    similarity to it, per KV head."""
    out = []
    for h in range(k.shape[0]):
        anchor = (k[h] / k[h].norm(dim=-1, keepdim=True)).mean(0)
        cos = (k[h] @ anchor) / (k[h].norm(dim=-1) * anchor.norm())
        out.append(sorted((-cos).topk(budget).indices.tolist()))
    return out


RULES = {"knorm": (Knorm, knorm_rule), "keydiff": (KeyDiff, keydiff_rule)}


@pytest.mark.parametrize("method", sorted(RULES))
def test_kept_keys_follow_the_rule_per_kv_head(llama, method):
    recipe, rule = RULES[method]
    ids = prompts(140)[0]
    g = skimfx.compile(llama, recipe(budget=35)).generate([ids], max_new_tokens=1)
    for layer in range(3):
        assert g.stats.kv_kept[layer][0] == rule(hf_keys(llama, ids, layer), 35), (method, layer)
    assert len({tuple(h) for h in g.stats.kv_kept[1][0]}) > 1


@pytest.mark.parametrize("method", sorted(RULES))
def test_generation_equals_hf_with_the_per_head_mask(llama, method):
    recipe, rule = RULES[method]
    ids = prompts(110)[0]
    g = skimfx.compile(llama, recipe(budget=0.3, layers=1)).generate([ids], max_new_tokens=16)
    kept = g.stats.kv_kept[1][0]
    assert kept == rule(hf_keys(llama, ids, 1), 33)
    seq, n, G = ids + g.tokens[0], len(ids), 3
    T = len(seq)
    mask = per_head_kept_mask(kept, n, T, 6, G)
    ref = _hf_with_layer_mask(llama, seq, {1: mask})
    assert ref[n - 1:T - 1].tolist() == g.tokens[0]


@pytest.mark.parametrize("method", sorted(RULES))
def test_ragged_batch_equals_each_prompt_alone_and_the_cache_shrinks(llama, method):
    """The KeyDiff anchor of a shorter sequence leaves the padding out."""
    recipe, _ = RULES[method]
    ps = prompts(130, 61, 95)
    cm = skimfx.compile(llama, recipe(budget=30))
    batch = cm.generate(ps, max_new_tokens=10)
    alone = [cm.generate([p], max_new_tokens=10) for p in ps]
    assert batch.tokens == [a.tokens[0] for a in alone]
    assert batch.stats.kv_kept[2] == [a.stats.kv_kept[2][0] for a in alone]
    assert batch.stats.kv_prefill_bytes == 3 * 2 * 2 * 16 * 4 * 3 * (30 + 10)   # layers, k/v, heads, D, fp32, batch


@pytest.mark.parametrize("method", sorted(RULES))
def test_a_budget_that_covers_the_prompt_is_exactly_dense(llama, method):
    recipe, _ = RULES[method]
    ps = prompts(80, 41)
    dense = skimfx.compile(llama).generate(ps, max_new_tokens=12)
    assert skimfx.compile(llama, recipe(budget=300)).generate(ps, max_new_tokens=12).tokens == dense.tokens


@pytest.mark.parametrize("recipe", [Knorm, KeyDiff])
@pytest.mark.parametrize("kw, match", [
    (dict(budget=0), "budget must be > 0"),
    (dict(budget=1.0), r"budget as a fraction must be in \(0, 1\)"),
    (dict(budget="half"), "budget must be a token count"),
    (dict(budget=10, layers=(-1,)), "layers must be layer indices"),
])
def test_bad_parameters(recipe, kw, match):
    with pytest.raises(RecipeError, match=match):
        recipe(**kw)


def test_recipe_strings_and_printout(llama):
    assert skimfx.parse_recipe("knorm:budget=0.25,layers=1/2") == [Knorm(budget=0.25, layers=(1, 2))]
    assert skimfx.recipe_label(skimfx.parse_recipe("keydiff:budget=64")) == "keydiff:budget=64"
    assert "knorm: keep 25%, lowest key norms" in str(skimfx.compile(llama, "knorm:budget=0.25").program)
    assert "keydiff: keep 40, keys least like their head's mean key" in str(
        skimfx.compile(llama, "keydiff:budget=40").program)


SMOLLM2_LAYERS = {"knorm": (2, 20), "keydiff": (5, 25)}


@pytest.fixture(scope="module")
def smollm2_scored(smollm2):
    """One SmolLM2 generation with Knorm on some layers and KeyDiff on others, and the HF keys of those
    layers (about 300 prompt tokens)."""
    model, tok = smollm2
    text = " ".join(f"The code for door {i} is {1000 + 37 * i}." for i in range(25))
    ids = tok(text)["input_ids"]
    recipes = [RULES[m][0](budget=0.25, layers=SMOLLM2_LAYERS[m]) for m in sorted(RULES)]
    g = skimfx.compile(model, recipes, tokenizer=tok).generate([ids], max_new_tokens=4)
    cfg = model.config
    G, D = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        keys = {}
        for layer in sum(SMOLLM2_LAYERS.values(), ()):
            blk = model.model.layers[layer]
            h = blk.input_layernorm(hs[layer])
            k = blk.self_attn.k_proj(h).view(1, len(ids), -1, D).transpose(1, 2)
            cos, sin = model.model.rotary_emb(h, torch.arange(len(ids))[None])
            keys[layer] = apply_rotary_pos_emb(k, k, cos, sin)[0][0]                   # [Hkv, T, D]
    return g, keys, round(0.25 * len(ids))


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RULES))
def test_on_smollm2(smollm2_scored, method):
    g, keys, budget = smollm2_scored
    _, rule = RULES[method]
    for layer in SMOLLM2_LAYERS[method]:
        assert g.stats.kv_kept[layer][0] == rule(keys[layer], budget), (method, layer)
        assert g.stats.layer_tokens[layer] == budget
    assert len(g.tokens[0]) == 4
