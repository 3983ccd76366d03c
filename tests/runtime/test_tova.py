"""TOVA: the paper's rule computed directly from HF's own modules, against what the runtime keeps and
generates; the decode-time eviction on a synthetic cache; sentence granularity; bad parameters."""
import pytest
import torch

import skimfx
from skimfx import TOVA, RecipeError
from skimfx.kernels import attention_ref
from skimfx.recipes import TOVAPolicy
from skimfx.runtime import Ctx, KVCache
from tiny import tiny_model

from tests.passes.test_prune_tokens import reference_qk  # noqa: E402
from tests.runtime.test_kv_policies import _hf_with_layer_mask, prompts  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _attention_mean(q, k, p, keys):
    """Softmax attention of query position ``p`` over the key positions ``keys``, mean over all heads."""
    D = q.shape[-1]
    s = torch.einsum("hd,hkd->hk", q[0, :, p], k[0][:, keys]) / D ** 0.5          # [Hq, len(keys)]
    return torch.softmax(s, -1).mean(0)


def tova_reference(model, seq, n, layer, budget):
    """TOVA on one layer, from HF modules (the layer's q/k do not depend on its own mask when the layers
    below it are dense): after prefill the last prompt query keeps the ``budget`` best prompt tokens (the
    last always); each decode query p attends to the kept tokens plus itself, then the lowest goes while
    more than ``budget`` are held. Returns (kept after prefill, the key set each decode query read)."""
    q, k = reference_qk(model, torch.tensor([seq]), layer)
    p = _attention_mean(q, k, n - 1, list(range(n)))
    p[n - 1] = float("inf")
    kept = sorted(p.topk(budget).indices.tolist())
    prefill_kept = list(kept)
    reads = []
    for pos in range(n, len(seq)):
        keys = kept + [pos]
        reads.append(list(keys))
        if len(keys) > budget:
            a = _attention_mean(q, k, pos, keys)
            del keys[int(a.argmin())]
        kept = keys
    return prefill_kept, reads


def test_tova_prefill_keeps_the_last_querys_top_tokens_for_every_head(llama):
    ids = prompts(150)[0]
    g = skimfx.compile(llama, TOVA(budget=40)).generate([ids], max_new_tokens=1)
    for layer in range(3):
        want, _ = tova_reference(llama, ids, len(ids), layer, 40)
        assert g.stats.kv_kept[layer][0] == [want, want]                          # both KV heads alike


def test_tova_decode_equals_hf_with_the_evolving_mask(llama):
    ids = prompts(120)[0]
    budget = 40
    g = skimfx.compile(llama, TOVA(budget=budget, layers=1)).generate([ids], max_new_tokens=24)
    seq, n = ids + g.tokens[0], len(ids)
    T = len(seq)
    _, reads = tova_reference(llama, seq, n, 1, budget)
    mask = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    kept0, _ = tova_reference(llama, seq, n, 1, budget)
    for pos, keys in zip(range(n, T), reads):
        row = torch.zeros(T, dtype=torch.bool)
        row[keys] = True
        mask[0, 0, pos] = row
    ref = _hf_with_layer_mask(llama, seq, {1: mask})
    assert ref[n - 1:T - 1].tolist() == g.tokens[0]
    assert g.stats.layer_tokens[1] == budget and kept0 == g.stats.kv_kept[1][0][0]


def test_tova_decode_step_on_a_synthetic_cache():
    """A layer at its budget: the new token is attended to with all the others (exact attention over
    budget + 1 keys), then the lowest-scoring token's slot takes the new token; the length stays."""
    torch.manual_seed(0)
    B, H, Hq, D, budget = 2, 2, 4, 8, 10
    cache = KVCache(1, B, H, D, budget + 1, torch.float32, "cpu", policies={0: TOVAPolicy(budget)})
    k0, v0 = torch.randn(B, H, budget, D), torch.randn(B, H, budget, D)
    cache.write(0, k0, v0)
    cache.advance(0, [budget, budget])
    pol = cache.policies[0]
    pol.budget_tokens = torch.tensor([budget, budget])
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    out = pol.decode(Ctx(cache, [1, 1]), q, k, v, D ** -0.5, None)
    keys, values = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
    n = torch.tensor([budget + 1] * B)
    torch.testing.assert_close(out, attention_ref(q, keys, values, n - 1, n, D ** -0.5))
    s = torch.einsum("bgd,bgsd->bgs", q[:, :, 0], keys.repeat_interleave(2, 1)) * D ** -0.5
    victim = torch.softmax(s, -1).mean(1).argmin(-1)                              # [B]
    assert cache.lengths(0) == [budget, budget]
    assert bool((victim < budget).any())                                          # an old token goes
    for b in range(B):
        j = int(victim[b])
        want = keys[b, :, :budget].clone()
        if j < budget:
            want[:, j] = k[b, :, 0]                                               # the new token in its slot
        torch.testing.assert_close(cache.k[0][b, :, :budget], want)


def test_tova_keeps_the_cache_at_the_budget_and_dense_when_it_covers_the_prompt(llama):
    ps = prompts(90, 55)
    dense = skimfx.compile(llama).generate(ps, max_new_tokens=12)
    assert skimfx.compile(llama, TOVA(budget=400)).generate(ps, max_new_tokens=12).tokens == dense.tokens
    g = skimfx.compile(llama, TOVA(budget=30)).generate(ps, max_new_tokens=20)
    assert g.stats.layer_tokens == [30, 30, 30]
    kv = 3 * 2 * 2 * 16 * 4 * 2 * 31           # layers, k/v, kv heads, D, fp32, batch; budget + the spare slot
    assert kv <= g.stats.kv_bytes <= 1.1 * kv


def test_tova_sentence_granularity_keeps_whole_sentences(smollm2):
    model, tok = smollm2
    text = " ".join(f"Sentence number {i} talks about the color of item {i}." for i in range(40))
    ids = tok(text)["input_ids"]
    cm = skimfx.compile(model, TOVA(budget=0.25, granularity="sentence", layers=(5,)), tokenizer=tok)
    g = cm.generate([ids], max_new_tokens=2)
    kept = g.stats.kv_kept[5][0]
    assert len({tuple(h) for h in kept}) == 1                                    # one set for every KV head
    from skimfx.runtime.sentences import segment_batch
    sid = segment_batch(torch.tensor([ids]), [len(ids)], cm.program.sentence_ends, 64)[0].tolist()
    kept_set = set(kept[0])
    whole = [s for s in set(sid) if all(i in kept_set for i, x in enumerate(sid) if x == s)]
    partial = [s for s in set(sid) if s not in whole and any(i in kept_set for i, x in enumerate(sid) if x == s)]
    assert len(whole) >= 3 and len(partial) <= 2                                # whole sentences, topped up


@pytest.mark.parametrize("kw, match", [
    (dict(budget=0), "budget must be > 0"),
    (dict(budget=1.5), r"budget as a fraction must be in \(0, 1\)"),
    (dict(budget=10, granularity="word"), "granularity must be 'token' or 'sentence'"),
    (dict(budget=10, evict_during_decode="yes"), "evict_during_decode must be true or false"),
])
def test_tova_bad_parameters(kw, match):
    with pytest.raises(RecipeError, match=match):
        TOVA(**kw)


def test_tova_recipe_string_and_printout(llama):
    cm = skimfx.compile(llama, "tova:budget=0.2,evict_during_decode=false")
    assert "tova: keep 20%" in str(cm.program)
    assert skimfx.recipe_label(skimfx.parse_recipe("tova:budget=0.2")) == "tova:budget=0.2"
