"""KV cache policies on the embedded real models: SnapKV's kept slots follow the rule computed from
HF's modules on SmolLM2-135M, budgets that cover the prompt reproduce dense exactly, eviction and
sparse reads keep the passkey at 25% budgets, and Gemma3's full-attention layers compress while its
sliding-window layers keep their window."""
import pytest

import skimfx
from skimfx import H2O, Delta, Quest, SnapKV, StreamingLLM
from skimfx.eval import passkey_correct, passkey_prompts
from tests.runtime.test_kv_policies import snapkv_reference

pytestmark = pytest.mark.slow


def test_snapkv_kept_slots_follow_the_rule_on_smollm2(smollm2):
    model, tok = smollm2
    ids = passkey_prompts(tok, 600, depths=(0.5,), keys_per_depth=1, seed=5)[0].ids
    g = skimfx.compile(model, SnapKV(budget=150, window=32, layers=(4, 21)), tokenizer=tok).generate(
        [ids], max_new_tokens=1)
    for layer in (4, 21):
        want = snapkv_reference(model, ids, layer, 150, 32)
        got = g.stats.kv_kept[layer][0]
        # fp32 score ties aside, the sets are the rule's (>= 149 of 150 slots per head)
        assert all(len(set(a) & set(b)) >= 149 for a, b in zip(got, want)), layer


@pytest.mark.parametrize("recipe", [SnapKV(budget=2000), H2O(heavy=1000, recent=1000),
                                    Quest(token_budget=2048), Delta(budget=2000)], ids=lambda r: r.name)
def test_covering_budgets_are_dense_on_smollm2(smollm2, recipe):
    model, tok = smollm2
    ids = passkey_prompts(tok, 400, depths=(0.3,), keys_per_depth=1, seed=1)[0].ids
    dense = skimfx.compile(model, tokenizer=tok).generate([ids], max_new_tokens=24, stop_tokens=[])
    got = skimfx.compile(model, recipe, tokenizer=tok).generate([ids], max_new_tokens=24, stop_tokens=[])
    assert got.tokens == dense.tokens


@pytest.mark.parametrize("recipe", ["delta:budget=0.25", "quest:token_budget=0.25,page_size=8"])
def test_sparse_reads_keep_the_passkey_at_a_25_percent_budget(smollm2, recipe):
    model, tok = smollm2
    prompts = passkey_prompts(tok, 1000, depths=(0.25, 0.5), keys_per_depth=1, seed=3)
    g = skimfx.compile(model, recipe, tokenizer=tok).generate([p.ids for p in prompts], max_new_tokens=12)
    assert [passkey_correct(tok, p, t) for p, t in zip(prompts, g.tokens)] == [True, True]
    assert 0.2 < g.stats.attended_fraction < 0.45


def test_snapkv_holds_a_quarter_of_the_kv(smollm2):
    """SnapKV at 25% keeps a quarter of each layer's prompt KV. (On this model it does not keep the
    pass key at 25% or even 50%; bench/sparse.py reports it, and kvpress's SnapKVPress, which keeps
    exactly the same tokens, answers the same.)"""
    model, tok = smollm2
    prompts = passkey_prompts(tok, 1000, depths=(0.5,), keys_per_depth=1, seed=3)
    g = skimfx.compile(model, "snapkv:budget=0.25", tokenizer=tok).generate([p.ids for p in prompts],
                                                                          max_new_tokens=12, stop_tokens=[])
    n = len(prompts[0].ids)
    assert all(len(heads[0][0]) == round(0.25 * n) for heads in g.stats.kv_kept.values())
    dense = skimfx.compile(model, tokenizer=tok).generate([p.ids for p in prompts], max_new_tokens=12, stop_tokens=[])
    assert g.stats.kv_bytes < 0.3 * dense.stats.kv_bytes


def test_gemma3_compresses_only_its_full_attention_layers(gemma3):
    model, tok = gemma3
    cm = skimfx.compile(model, StreamingLLM(recent=200, sinks=4), tokenizer=tok)
    full = [l for l, w in enumerate(cm.program.info.sliding_window) if w is None]
    assert sorted(cm.program.policies) == full and len(full) == 3
    text = "The river runs north through the valley, past the old mill and the stone bridge. " * 40
    ids = tok(text).input_ids
    g = cm.generate(ids, max_new_tokens=20, stop_tokens=[])
    assert set(g.stats.kv_kept) == set(full)
    assert all(len(g.stats.kv_kept[l][0][0]) == 204 for l in full)
    out = tok.decode(g.tokens[0])
    assert "river" in out or "valley" in out or "bridge" in out
    wide = skimfx.compile(model, StreamingLLM(recent=2000, sinks=4), tokenizer=tok).generate(ids, max_new_tokens=20,
                                                                                           stop_tokens=[])
    dense = skimfx.compile(model, tokenizer=tok).generate(ids, max_new_tokens=20, stop_tokens=[])
    assert wide.tokens == dense.tokens
