"""KV cache policies (kv_policy pass + runtime): SnapKV, StreamingLLM, H2O, PyramidKV budgets, Quest,
DELTA. Selection rules against direct computations from HF's own modules; generation against HF run
with the attention mask that the policy implies; physical KV shrink; validation."""
import pytest
import torch
import torch.nn.functional as F

import skimfx
from skimfx import H2O, Delta, PromptDistill, Quest, RecipeError, SnapKV, StreamingLLM
from skimfx.kernels import attention_ref, page_minmax_ref, page_scores_ref
from skimfx.passes import PolicyError
from skimfx.recipes import DeltaPolicy, H2OPolicy, QuestPolicy, pyramid_budgets
from skimfx.runtime import Ctx, KVCache
from tiny import tiny_model

from tests.passes.test_prune_tokens import reference_qk  # noqa: E402  (HF-module q/k of a layer)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def prompts(*lens, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lens]


def hf_greedy_under_mask(model, ids, mask):
    """Teacher-forced argmax of HF run on ``ids`` [1, T] with a boolean attention mask [1, H|1, T, T]."""
    with torch.no_grad():
        return model(torch.tensor([ids]), attention_mask=mask).logits[0].argmax(-1)


@pytest.mark.parametrize("recipe", [SnapKV(budget=400), StreamingLLM(recent=400), H2O(heavy=200, recent=200),
                                    Quest(token_budget=512), Delta(budget=400, full_layers=1, selection_layers=1)],
                         ids=lambda r: r.name)
def test_a_budget_that_covers_the_prompt_is_exactly_dense(llama, recipe):
    ps = prompts(150, 97)
    dense = skimfx.compile(llama).generate(ps, max_new_tokens=24)
    got = skimfx.compile(llama, recipe).generate(ps, max_new_tokens=24)
    assert got.tokens == dense.tokens
    assert got.stats.attended_fraction == 1.0


def snapkv_reference(model, ids, layer, budget, window, kernel=5):
    """SnapKV's rule from HF modules: softmax attention of the last ``window`` queries (causal, over all
    keys), summed over the window, mean over the GQA group, avg-pooled over the prefix; top
    (budget - window) of the prefix plus the window, per KV head."""
    q, k = reference_qk(model, torch.tensor([ids]), layer)
    T, D, Hq = len(ids), q.shape[-1], q.shape[1]
    Hkv = model.config.num_key_value_heads
    s = q[0, :, -window:] @ k[0].transpose(-1, -2) / D ** 0.5                   # [Hq, w, T]
    causal = torch.arange(T)[None] <= (T - window + torch.arange(window))[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)[:, :, :T - window].sum(1)   # [Hq, prefix]
    p = p.view(Hkv, Hq // Hkv, -1).mean(1)
    p = F.avg_pool1d(p[:, None], kernel, 1, kernel // 2)[:, 0]
    top = p.topk(budget - window, dim=-1).indices
    return [sorted(top[h].tolist() + list(range(T - window, T))) for h in range(Hkv)]


def test_snapkv_keeps_what_the_rule_selects_per_kv_head(llama):
    ids = prompts(180)[0]
    g = skimfx.compile(llama, SnapKV(budget=60, window=16)).generate([ids], max_new_tokens=1)
    for layer in range(3):
        assert g.stats.kv_kept[layer][0] == snapkv_reference(llama, ids, layer, 60, 16)
    # the heads keep different tokens (so per-head compaction matters)
    assert len({tuple(h) for h in g.stats.kv_kept[1][0]}) > 1


def test_snapkv_generation_equals_hf_with_the_per_head_mask(llama):
    """After compression, query heads read only their KV head's kept prompt tokens plus everything
    generated: HF with exactly that mask gives the same greedy tokens."""
    ids = prompts(120)[0]
    # one layer only, so the mask of that layer is the whole difference to dense
    recipe = SnapKV(budget=40, window=8, layers=1)
    g = skimfx.compile(llama, recipe).generate([ids], max_new_tokens=16)
    kept = g.stats.kv_kept[1][0]
    seq = ids + g.tokens[0]
    T, n, G = len(seq), len(ids), 3
    mask = per_head_kept_mask(kept, n, T, 6, G)
    # the mask applies to layer 1 only: patch the other layers' masks by running HF per layer is not
    # possible, so compare against a model whose layers 0 and 2 see the same tokens under both masks:
    # layer 0/2 read everything, which the per-layer mask cannot express -> use the layer-1-only check
    ref = _hf_with_layer_mask(llama, seq, {1: mask})
    assert ref[n - 1:T - 1].tolist() == g.tokens[0]


def per_head_kept_mask(kept, n: int, T: int, heads: int, group: int) -> torch.Tensor:
    """[1, heads, T, T] causal mask whose rows from ``n`` on (the generated tokens) let query head h read
    only the prompt positions ``kept[h // group]`` (its KV head's kept set) and every generated token."""
    mask = torch.ones(1, heads, T, T, dtype=torch.bool).tril()
    for h in range(heads):
        row = torch.zeros(T, dtype=torch.bool)
        row[kept[h // group]] = True
        row[n:] = True
        mask[0, h, n:] &= row
    return mask


def _hf_with_layer_mask(model, seq, masks: dict):
    """HF greedy argmax with a custom boolean mask for some layers (dense causal for the others)."""
    handles = []
    T = len(seq)
    causal = torch.ones(1, 1, T, T, dtype=torch.bool).tril()

    def pre_hook(layer):
        def hook(mod, args, kwargs):
            kwargs["attention_mask"] = masks.get(layer, causal)
            return args, kwargs
        return hook

    for i, blk in enumerate(model.model.layers):
        handles.append(blk.self_attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0].argmax(-1)
    finally:
        for h in handles:
            h.remove()


def test_streamingllm_equals_hf_with_the_sink_and_window_mask(llama):
    ids = prompts(90)[0]
    sinks, recent = 4, 20
    g = skimfx.compile(llama, StreamingLLM(recent=recent, sinks=sinks)).generate([ids], max_new_tokens=20)
    seq, n = ids + g.tokens[0], len(ids)
    T = len(seq)
    mask = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    for p in range(n, T):                      # decode query p sees the sinks and (p - recent, p]
        row = torch.zeros(T, dtype=torch.bool)
        row[:sinks] = True
        row[p - recent + 1:p + 1] = True
        mask[0, 0, p] = row
    ref = _hf_with_layer_mask(llama, seq, {i: mask for i in range(3)})
    assert ref[n - 1:T - 1].tolist() == g.tokens[0]
    for layer in range(3):                     # prefill kept the sinks and the last `recent` tokens
        assert g.stats.kv_kept[layer][0][0] == list(range(sinks)) + list(range(n - recent, n))
    kv = 3 * 2 * 2 * 16 * 4 * (sinks + recent)    # layers * k/v * kv heads * D * fp32; + slot ages
    assert kv <= g.stats.kv_bytes <= 1.07 * kv


def test_h2o_prefill_keeps_heavy_hitters_and_recent(llama):
    ids = prompts(100)[0]
    heavy, recent = 20, 10
    g = skimfx.compile(llama, H2O(heavy=heavy, recent=recent)).generate([ids], max_new_tokens=1)
    n = len(ids)
    for layer in range(3):
        q, k = reference_qk(llama, torch.tensor([ids]), layer)
        D = q.shape[-1]
        s = q[0] @ k[0].transpose(-1, -2) / D ** 0.5
        p = torch.softmax(s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)
        received = p.sum(1).view(2, 3, n).sum(1)                            # over queries, then the group
        received[:, n - recent:] = float("inf")
        want = [sorted(received[h].topk(heavy + recent).indices.tolist()) for h in range(2)]
        assert g.stats.kv_kept[layer][0] == want


def test_h2o_decode_evicts_the_lowest_scoring_non_recent_token():
    """One decode step on a synthetic full cache: the victim is the argmin of the accumulated scores
    outside the recent window, the new token takes its slot, and this step's attention is added."""
    torch.manual_seed(0)
    B, H, D, cap = 2, 2, 8, 12
    cache = KVCache(1, B, H, D, cap, torch.float32, "cpu", policies={0: H2OPolicy(cap, recent=3)})
    k0 = torch.randn(B, H, cap, D)
    cache.write(0, k0, k0)
    cache.advance(0, [cap, cap])
    score = torch.rand(B, H, cap)
    pol = cache.policies[0]
    pol.seen, pol.budget_tokens, pol.recent = torch.tensor([cap, cap]), torch.tensor([cap, cap]), torch.tensor([3, 3])
    pol.age, pol.score = torch.arange(cap).expand(B, H, cap).clone(), score.clone()
    q, k, v = torch.randn(B, 4, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    pol.decode(Ctx(cache, [1, 1]), q, k, v, D ** -0.5, None)
    victim = score[:, :, :cap - 3].argmin(-1)
    for b in range(B):
        for h in range(H):
            j = int(victim[b, h])
            assert torch.equal(cache.k[0][b, h, j], k[b, h, 0])
            assert int(pol.age[b, h, j]) == cap
    assert cache.lengths(0) == [cap, cap]
    probs = torch.softmax(torch.einsum("bkgd,bksd->bkgs", q.view(B, H, 2, D), cache.k[0]) * D ** -0.5, -1).sum(2)
    expect = score.scatter(2, victim[..., None], 0.0) + probs
    torch.testing.assert_close(pol.score, expect)


def test_h2o_and_streaming_keep_the_cache_at_the_budget_during_decode(llama):
    for recipe, budget in [(H2O(heavy=16, recent=8), 24), (StreamingLLM(recent=20, sinks=4), 24)]:
        cm = skimfx.compile(llama, recipe)
        g = cm.generate(prompts(70, 40), max_new_tokens=30)
        kv = 3 * 2 * 2 * 16 * 4 * 2 * budget       # layers, k/v, heads, D, fp32, batch; + slot ages/scores
        assert kv <= g.stats.kv_bytes <= 1.1 * kv
        assert g.stats.attended_fraction == 1.0                          # reads all it keeps


def test_snapkv_shrinks_the_cache_physically(llama):
    ps = prompts(300)
    dense = skimfx.compile(llama).generate(ps, max_new_tokens=8)
    g = skimfx.compile(llama, SnapKV(budget=50)).generate(ps, max_new_tokens=8)
    assert g.stats.kv_prefill_bytes == 3 * 2 * 2 * 16 * 4 * (50 + 8)
    assert dense.stats.kv_prefill_bytes == 3 * 2 * 2 * 16 * 4 * (300 + 8)


def test_ragged_batch_equals_each_prompt_alone(llama):
    ps = prompts(130, 61, 95)
    for recipe in [SnapKV(budget=0.4, window=8), H2O(heavy=20, recent=10), Quest(token_budget=32),
                   Delta(budget=24, full_layers=1, selection_layers=1, recent=4)]:
        cm = skimfx.compile(llama, recipe)
        batch = cm.generate(ps, max_new_tokens=12)
        alone = [cm.generate([p], max_new_tokens=12).tokens[0] for p in ps]
        assert batch.tokens == alone, recipe


def test_pyramid_budgets_keep_the_total():
    b = pyramid_budgets(256, 30, 32)
    assert b[0] > b[-1] and all(x >= y for x, y in zip(b, b[1:]))
    assert abs(sum(b) - 256 * 30) <= 30
    f = pyramid_budgets(0.25, 10, 0.0)
    assert abs(sum(f) / 10 - 0.25) < 1e-9


def test_pyramid_snapkv_gives_lower_layers_more(llama):
    g = skimfx.compile(llama, SnapKV(budget=60, window=8, pyramid=True)).generate(prompts(200), max_new_tokens=1)
    kept = [len(g.stats.kv_kept[l][0][0]) for l in range(3)]
    assert kept[0] > kept[1] > kept[2] and abs(sum(kept) - 180) <= 3


# ---------------------------------------------------------------------------------------------- sparse reads
def test_quest_reads_the_pages_with_the_highest_bound():
    torch.manual_seed(1)
    B, H, D, S, ps = 2, 2, 8, 70, 16
    cache = KVCache(1, B, H, D, 80, torch.float32, "cpu", policies={0: QuestPolicy(32, page_size=ps)})
    k = torch.randn(B, H, S, D)
    cache.write(0, k, k)
    cache.advance(0, [S, S - 20])
    pol = cache.policies[0]
    pol.after_write(Ctx(cache, [S, S - 20]), [0, 0])
    q = torch.randn(B, 4, 1, D)
    lens = torch.tensor([S, S - 20])
    idx = pol.page_index(q, lens, S, 32)                                     # 2 pages per KV head
    kmin, kmax = page_minmax_ref(k, lens, ps)
    sc = page_scores_ref(q[:, :, 0], kmin, kmax, lens, ps)
    for b in range(B):
        newest = (int(lens[b]) - 1) // ps
        for h in range(H):
            s = sc[b, h].clone()
            s[newest] = float("inf")
            pages = set(s.topk(2).indices.tolist())
            assert {int(i) // ps for i in idx[b, h]} == pages


def test_quest_pages_stay_current_during_decode(llama):
    cm = skimfx.compile(llama, Quest(token_budget=32, dense_layers=1))
    from skimfx.runtime.engine import decode_step, prefill
    cache = KVCache.for_program(cm.program, 1, 200)
    prefill(cm.program, cache, prompts(70))
    for t in range(20):
        decode_step(cm.program, cache, torch.tensor([t]))
    n = cache.lengths(1)[0]
    kmin, kmax = page_minmax_ref(cache.k[1], torch.tensor([n]), 16)
    torch.testing.assert_close(cache.policies[1].kmin[:, :, :kmin.shape[2]], kmin)
    torch.testing.assert_close(cache.policies[1].kmax[:, :, :kmax.shape[2]], kmax)


def test_quest_and_delta_read_a_fraction_of_the_cache(llama):
    ps = prompts(400)
    q = skimfx.compile(llama, Quest(token_budget=64, dense_layers=1)).generate(ps, max_new_tokens=10)
    fr = q.stats.layer_attended_fraction()
    assert fr[0] == 1.0 and all(0.15 < fr[l] < 0.2 for l in (1, 2))           # 64 of ~405 tokens
    d = skimfx.compile(llama, Delta(budget=48, full_layers=1, selection_layers=1, recent=16)).generate(
        ps, max_new_tokens=10)
    fr = d.stats.layer_attended_fraction()
    assert fr[0] == fr[1] == 1.0 and 0.15 < fr[2] < 0.17                        # 64 of ~405 tokens


def test_delta_set_is_the_top_attention_summed_over_heads():
    torch.manual_seed(2)
    B, Hq, H, D, S = 2, 6, 2, 8, 50
    q, keys, values = torch.randn(B, Hq, 1, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    kv_len = torch.tensor([50, 33])
    cache = KVCache(1, B, H, D, S, torch.float32, "cpu", policies={0: DeltaPolicy(10, recent=4, role="select")})
    cache.write(0, keys, values)
    cache.advance(0, kv_len.tolist())
    pol = cache.policies[0]
    idx, out = pol.read_index(Ctx(cache, [1, 1]), q, keys, values, kv_len, 0.3, None)
    assert idx is None and pol.index is not None                               # the set is the layer's state
    idx = pol.index
    # the select layer's own output is its full attention (same pass that scored the tokens)
    torch.testing.assert_close(out, attention_ref(q, keys, values, kv_len - 1, kv_len, 0.3))
    for b in range(B):
        n = int(kv_len[b])
        s = torch.einsum("hd,hsd->hs", q[b, :, 0], keys[b].repeat_interleave(3, 0)[:, :n]) * 0.3
        p = torch.softmax(s, -1).sum(0)
        p[n - 4:] = float("inf")
        want = set(p.topk(14).indices.tolist())
        assert {int(i) for i in idx[b] if i < n} == want
        assert idx[b].tolist() == sorted(idx[b].tolist())                          # slot order


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("make,match", [
    (lambda: SnapKV(budget=0), "budget"), (lambda: SnapKV(budget=1.5), "fraction"),
    (lambda: SnapKV(budget=16, window=32), "window"), (lambda: SnapKV(budget=64, pool_kernel=4), "odd"),
    (lambda: StreamingLLM(recent=-1), "recent"), (lambda: H2O(heavy=10, recent=0.1), "both"),
    (lambda: H2O(heavy=0.6, recent=0.5), "below 1"), (lambda: Quest(token_budget=8), "one page"),
    (lambda: Delta(budget=64, full_layers=4, selection_layers=(2, 8)), ">= full_layers"),
    (lambda: Delta(budget=64, selection_layers=(9, 5)), "increasing"), (lambda: SnapKV(budget="x"), "token count"),
])
def test_bad_policy_parameters(make, match):
    with pytest.raises(RecipeError, match=match):
        make()


def test_policies_that_do_not_fit_the_model(llama):
    with pytest.raises(RecipeError, match="no layer above"):
        skimfx.compile(llama, Delta(budget=64, full_layers=0, selection_layers=2))
    with pytest.raises(PolicyError, match="out of range"):
        skimfx.compile(llama, SnapKV(budget=64, layers=7))
    with pytest.raises(PolicyError, match="already has"):
        skimfx.compile(llama, [SnapKV(budget=64, layers=1), H2O(heavy=8, recent=8, layers=1)])
    with pytest.raises(PolicyError, match="between select layer"):
        skimfx.compile(llama, [Delta(budget=16, full_layers=0, selection_layers=0),
                               PromptDistill(layers=0, keep=32)])
    # with truncate_earlier_kv both layers hold the same tokens again
    skimfx.compile(llama, [Delta(budget=16, full_layers=0, selection_layers=0),
                           PromptDistill(layers=0, keep=32, truncate_earlier_kv=True)])


def test_sliding_window_layers_keep_their_window():
    g3 = tiny_model("gemma3")
    cm = skimfx.compile(g3, SnapKV(budget=30, window=8))
    assert sorted(cm.program.policies) == [1, 3]                              # the full-attention layers
    with pytest.raises(PolicyError, match="sliding-window"):
        skimfx.compile(g3, SnapKV(budget=30, window=8, layers=0))
    ps = prompts(120, 70)
    dense = skimfx.compile(g3).generate(ps, max_new_tokens=16)
    wide = skimfx.compile(g3, SnapKV(budget=200)).generate(ps, max_new_tokens=16)
    assert wide.tokens == dense.tokens
    g = cm.generate(ps, max_new_tokens=16)
    assert g.stats.kv_prefill_bytes < dense.stats.kv_prefill_bytes


def test_recipe_strings_and_printout(llama):
    rs = skimfx.parse_recipe("snapkv:budget=0.25,window=16,pyramid=true")
    assert rs == [SnapKV(budget=0.25, window=16, pyramid=True)]
    assert skimfx.recipe_label(rs) == "snapkv:budget=0.25,window=16,pyramid=true"
    assert skimfx.parse_recipe("delta:budget=128,selection_layers=3/15") == [Delta(budget=128, selection_layers=(3, 15))]
    with pytest.raises(RecipeError, match="one KV cache policy"):
        skimfx.parse_recipe("snapkv:budget=64+h2o:heavy=8,recent=8")
    cm = skimfx.compile(llama, "promptdistill:layers=1,keep=64+quest:token_budget=32,dense_layers=1")
    text = str(cm.program)
    assert "quest: read 32" in text and "kv_policy (2 rewrites)" in text


def test_multi_token_extend_of_an_evicting_cache_is_a_clear_error(llama):
    from skimfx.runtime.engine import extend, prefill
    cm = skimfx.compile(llama, H2O(heavy=16, recent=8))
    cache = KVCache.for_program(cm.program, 1, 200)
    prefill(cm.program, cache, prompts(60))
    before = [list(cache.lengths(l)) for l in range(3)]
    with pytest.raises(ValueError, match="one new token per step"):
        extend(cm.program, cache, torch.tensor([[1, 2, 3]]))
    assert [list(cache.lengths(l)) for l in range(3)] == before      # nothing written


def test_full_logits_forward_does_not_evict(llama):
    """``cm(input_ids)`` is the dense forward whatever the recipe."""
    ids = torch.randint(0, 512, (1, 90))
    with torch.no_grad():
        want = llama(ids).logits
    torch.testing.assert_close(skimfx.compile(llama, SnapKV(budget=20, window=4))(ids).logits, want, rtol=0, atol=0)


def test_quest_pages_stay_current_in_a_ragged_batch(llama):
    from skimfx.runtime.engine import decode_step, prefill
    cm = skimfx.compile(llama, Quest(token_budget=32, dense_layers=1))
    cache = KVCache.for_program(cm.program, 2, 200)
    prefill(cm.program, cache, prompts(70, 33))
    for t in range(19):
        decode_step(cm.program, cache, torch.tensor([t, t + 1]))
    n = torch.tensor(cache.lengths(2))
    kmin, kmax = page_minmax_ref(cache.k[2], n, 16)
    used = -(-int(n.max()) // 16)
    torch.testing.assert_close(cache.policies[2].kmin[:, :, :used], kmin[:, :, :used])
    torch.testing.assert_close(cache.policies[2].kmax[:, :, :used], kmax[:, :, :used])
