"""Expected Attention: the kept sets against the rule computed from HF's own modules (pre-RoPE queries from
q_proj / q_norm, the model's rotary embedding at the future positions, kvpress's formula written out with
loops over heads), generation after compression against HF with the per-head mask, ragged batches,
bad parameters, SmolLM2."""
import math

import pytest
import torch

import skimfx
from skimfx import ExpectedAttention, RecipeError
from tiny import tiny_model

from tests.runtime.test_kv_policies import _hf_with_layer_mask, per_head_kept_mask, prompts  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def hf_layer_qkv(model, ids, layer):
    """Layer ``layer``'s pre-RoPE queries [Hq, T, D], post-RoPE keys and values [Hkv, T, D] from HF's modules."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer]
        att = model.model.layers[layer].self_attn
        h = model.model.layers[layer].input_layernorm(hs)
        T, D = len(ids), att.head_dim
        q = att.q_proj(h).view(1, T, -1, D)
        k = att.k_proj(h).view(1, T, -1, D)
        if hasattr(att, "q_norm"):
            q, k = att.q_norm(q), att.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = att.v_proj(h).view(1, T, -1, D).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(T)[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return q[0], k[0], v[0]


def expected_attention_rule(model, ids, layer, budget, future=512, sinks=4, covariance=True, vnorm=True):
    """kvpress's ExpectedAttentionPress rule, per KV head: the kept prompt positions."""
    q, k, v = hf_layer_qkv(model, ids, layer)
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    scale = model.model.layers[layer].self_attn.scaling
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(q, torch.arange(T, T + future)[None])
    cos, sin = cos[0].double(), sin[0].double()
    half = D // 2
    P = torch.zeros(D, D, dtype=torch.float64)
    P[half:, :half], P[:half, half:] = torch.eye(half), -torch.eye(half)
    R = torch.stack([torch.diag(cos[p]) + torch.diag(sin[p]) @ P for p in range(future)]).mean(0)
    kept = []
    for kh in range(Hkv):
        kk = k[kh, sinks:].double()
        probs = []
        for g in range(G):
            qs = q[kh * G + g, sinks:].double()                 # the queries after the sinks
            mu = qs.mean(0)
            cov = (qs - mu).T @ (qs - mu) / qs.shape[0]
            mu, cov = R @ mu, R @ cov @ R.T
            logit = scale * kk @ mu
            if covariance:
                logit = logit + 0.5 * scale ** 2 * torch.einsum("si,ij,sj->s", kk, cov, kk)
            probs.append(torch.softmax(logit, 0))
        s = torch.stack(probs).mean(0)
        if vnorm:
            s = s * v[kh, sinks:].double().norm(dim=-1)
        s = torch.cat([torch.full((sinks,), math.inf, dtype=s.dtype), s])
        kept.append(sorted(s.topk(budget).indices.tolist()))
    return kept


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("kw", [{}, dict(covariance=False), dict(vnorm=False, future=64, sinks=2)],
                         ids=["default", "mean-only", "no-vnorm"])
def test_kept_keys_follow_the_rule_per_kv_head(arch, kw):
    model = tiny_model(arch)
    ids = prompts(150)[0]
    g = skimfx.compile(model, ExpectedAttention(budget=40, **kw)).generate([ids], max_new_tokens=1)
    for layer in range(3):
        assert g.stats.kv_kept[layer][0] == expected_attention_rule(model, ids, layer, 40, **kw), (arch, layer)
    assert len({tuple(h) for h in g.stats.kv_kept[1][0]}) > 1


def test_generation_equals_hf_with_the_per_head_mask(llama):
    ids = prompts(110)[0]
    g = skimfx.compile(llama, ExpectedAttention(budget=0.3, layers=1)).generate([ids], max_new_tokens=16)
    kept = g.stats.kv_kept[1][0]
    assert kept == expected_attention_rule(llama, ids, 1, 33)
    seq, n = ids + g.tokens[0], len(ids)
    mask = per_head_kept_mask(kept, n, len(seq), 6, 3)
    assert _hf_with_layer_mask(llama, seq, {1: mask})[n - 1:len(seq) - 1].tolist() == g.tokens[0]


def test_ragged_batch_equals_each_prompt_alone(llama):
    """Padding queries are left out of the statistics, padding keys out of the softmax, and each sequence
    rotates to its own future positions."""
    ps = prompts(130, 61, 95)
    cm = skimfx.compile(llama, ExpectedAttention(budget=30))
    batch = cm.generate(ps, max_new_tokens=10)
    alone = [cm.generate([p], max_new_tokens=10) for p in ps]
    assert batch.tokens == [a.tokens[0] for a in alone]
    assert batch.stats.kv_kept[2] == [a.stats.kv_kept[2][0] for a in alone]
    assert batch.stats.kv_prefill_bytes == 3 * 2 * 2 * 16 * 4 * 3 * (30 + 10)


@pytest.mark.parametrize("kw, match", [
    (dict(budget=0), "budget must be > 0"),
    (dict(budget=4), r"budget \(4\) must exceed sinks \(4\)"),
    (dict(budget=0.2, future=0), "future must be a positive integer"),
    (dict(budget=0.2, sinks=-1), "sinks must be an integer >= 0"),
    (dict(budget=0.2, covariance="yes"), "covariance must be true or false"),
])
def test_bad_parameters(kw, match):
    with pytest.raises(RecipeError, match=match):
        ExpectedAttention(**kw)


def test_recipe_string_and_printout(llama):
    r = skimfx.parse_recipe("expected_attention:budget=0.25,future=256,covariance=false")
    assert r == [ExpectedAttention(budget=0.25, future=256, covariance=False)]
    assert skimfx.recipe_label(r) == "expected_attention:budget=0.25,future=256,covariance=false"
    assert "expected_attention: keep 25%, expected attention of the next 512 queries, 4 sinks" in str(
        skimfx.compile(llama, "expected_attention:budget=0.25").program)


@pytest.mark.slow
def test_on_smollm2(smollm2):
    model, tok = smollm2
    text = " ".join(f"The code for door {i} is {1000 + 37 * i}." for i in range(25))
    ids = tok(text)["input_ids"]
    budget = round(0.25 * len(ids))
    g = skimfx.compile(model, ExpectedAttention(budget=0.25, layers=(3, 17)), tokenizer=tok).generate(
        [ids], max_new_tokens=4)
    for layer in (3, 17):
        assert g.stats.kv_kept[layer][0] == expected_attention_rule(model, ids, layer, budget), layer
        assert g.stats.layer_tokens[layer] == budget
