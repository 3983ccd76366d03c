"""Sentence-granular KV selection: SnapKV / H2O keeping whole sentences, and SentenceKV (sentence mean
keys resident, token KV offloaded, whole sentences read per decode step). Exact selections on fixtures,
attention against a direct computation over the chosen set, token identity with dense when the budget
covers the prompt (SmolLM2 and Gemma 3), and the errors."""
import pytest
import torch

import skimfx
from skimfx.eval import passkey_correct, passkey_prompts
from skimfx.recipes import SentenceKVPolicy
from skimfx.runtime import Ctx, KVCache
from skimfx.runtime.policies.scoring import sentence_keep_index
from skimfx.runtime.engine import decode_step, plan_capacity, prefill

INF = float("inf")


def test_sentence_keep_index_keeps_whole_sentences_then_tops_up_per_head():
    # sentences [0-2] [3-4] [5-8] [9-11]; slot 11 is the always-kept window (+inf); keep 7 -> room 6
    sid = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]])
    head0 = [0.1, 0.9, 0.1, 0.95, 0.3, 0.0, 0.0, 0.5, 0.0, 0.05, 0.0, INF]
    head1 = [0.0, 0.0, 0.0, 0.8, 0.1, 0.2, 0.6, 0.0, 0.0, 0.0, 0.0, INF]
    scores = torch.tensor([[head0, head1]])
    got = sentence_keep_index(scores, sid, [7], "max", [12])
    # head 0: s1 (2 tokens, 0.95) -> room 4, s0 (3, 0.9) -> 1, s2 (4) and s3 (2 free) do not fit; the
    # one slot left goes to the best remaining single token (7, 0.5)
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, 7, 11]
    # head 1: s1 (2, 0.8), s2 (4, 0.6) fill the room exactly: no top-up
    assert got[0, 1].tolist() == [3, 4, 5, 6, 7, 8, 11]
    # mean instead of max: head 0 ranks s1 (0.625), s0 (0.37), s2 (0.125), s3 (0.025): the same choice
    got = sentence_keep_index(scores, sid, [7], "mean", [12])
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, 7, 11]


def _centroid_cache(offload: bool, sinks=4, recent=8, budget=30):
    torch.manual_seed(0)
    B, H, D, S = 2, 3, 16, 100
    k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    sid = (torch.arange(S) // 7)[None].repeat(B, 1)
    cache = KVCache(1, B, H, D, S + 4, torch.float32, "cpu",
                    policies={0: SentenceKVPolicy(budget, sinks=sinks, recent=recent, offload=offload)})
    cache.write(0, k, v)
    cache.advance(0, [S, 90])                       # a ragged batch: the second prompt has 90 tokens
    pol = cache.policies[0]
    ctx = Ctx(cache, [S, 90])
    ctx.sentence_ids = sid
    pol.after_prefill(ctx, None, 0.25)
    return pol, cache, k, v, sid


def _reference_sets(k, sid, q, n, sinks, recent, budget):
    """Brute force: per (sequence, KV head) the sentences by (summed group query) . (mean key), best first,
    while their non-resident tokens fit budget - resident."""
    B, H, S, D = k.shape
    out = []
    for b in range(B):
        m = n[b]
        resident = set(range(sinks)) | set(range(m - recent, m))
        rows = []
        for h in range(H):
            qg = q[b, h * 3:(h + 1) * 3, 0].sum(0)
            sents = sorted(set(sid[b, :m].tolist()))
            members = {s: [i for i in range(m) if sid[b, i] == s] for s in sents}
            score = {s: float(qg @ k[b, h, members[s]].mean(0)) for s in sents}
            room, chosen = budget - len(resident), set()
            for s in sorted(sents, key=lambda s: -score[s]):
                extra = [i for i in members[s] if i not in resident]
                if not extra:
                    continue
                if len(extra) > room:
                    break
                chosen |= set(extra)
                room -= len(extra)
            rows.append(sorted(chosen))
        out.append(rows)
    return out


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "on-device"])
def test_sentencekv_reads_the_best_whole_sentences_plus_resident_tokens(offload):
    pol, cache, k, v, sid = _centroid_cache(offload)
    B, H, S, D = k.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 3 * H, 1, D, generator=g)
    kn, vn = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    sets = _reference_sets(k, sid, q, [100, 90], 4, 8, 30)
    index = pol.sentence_index(q)
    for b in range(B):
        for h in range(H):
            assert [i for i in index[b, h].tolist() if i >= 0] == sets[b][h]
    ctx = Ctx(cache, [1, 1])
    out = pol.decode(ctx, q, kn, vn, 0.25, None)
    moved = ctx.moved
    cached = [ctx.reads[0][1]]
    for b, m in enumerate([100, 90]):
        kk, vv = torch.cat([k[b, :, :m], kn[b]], 1), torch.cat([v[b, :, :m], vn[b]], 1)
        for h in range(H):
            slots = sorted(set(sets[b][h]) | set(range(4)) | set(range(m - 8, m)) | {m})
            p = torch.softmax(q[b, 3 * h:3 * h + 3, 0] @ kk[h, slots].T * 0.25, -1)
            torch.testing.assert_close(out[b, 3 * h:3 * h + 3, 0], p @ vv[h, slots], atol=1e-5, rtol=1e-5)
    assert cached == [101 + 91]                         # keys cached, summed over the sequences
    picked = sum(len(r) for rows in sets for r in rows)
    if offload:
        assert moved == picked * D * 2 * 4
        assert cache.lengths(0) == [13, 13]          # 4 sinks + 8 recent + the new token stay on the device
        assert cache.host_bytes() == 2 * B * H * S * D * 4
    else:
        assert moved == 0 and cache.lengths(0) == [101, 91] and cache.host_bytes() == 0


def test_sentencekv_with_a_budget_covering_the_prompt_is_dense_on_real_models(smollm2, gemma3, smollm2_compiled,
                                                                              gemma3_compiled):
    for (model, tok), dense_cm in ((smollm2, smollm2_compiled), (gemma3, gemma3_compiled)):
        text = ("The museum opens at nine. Tickets cost twelve euros! Children enter free? "
                "The north wing holds the paintings.\nThe south wing holds sculpture. ") * 4
        ids = [tok(text + "When does the museum open?").input_ids, tok(text[:150] + " Which wing?").input_ids]
        dense = dense_cm.generate(ids, max_new_tokens=12, stop_tokens=[])
        for offload in (True,):          # the on-device read is checked exactly by the unit test above
            g = skimfx.compile(model, skimfx.SentenceKV(budget=4096, offload=offload), tokenizer=tok).generate(
                ids, max_new_tokens=12, stop_tokens=[])
            assert g.tokens == dense.tokens, (model.config.model_type, offload)
            assert g.stats.attended_fraction == pytest.approx(1.0)
            if offload:      # everything but the 20 resident prompt tokens per layer went to the host store
                assert g.stats.kv_host_bytes > 0 and g.stats.kv_bytes < dense.stats.kv_bytes
                assert g.stats.moved_bytes > 0


def test_sentence_granularity_retrieves_where_the_token_rule_fails(smollm2, smollm2_compiled):
    """A passkey prompt of ~1k tokens at a 10% budget: SnapKV's token rule keeps a few digits of the
    needle, the sentence rule and SentenceKV keep the needle sentence whole."""
    model, tok = smollm2
    p = passkey_prompts(tok, 1000, depths=(0.5,), keys_per_depth=1, seed=0)[0]
    dense = smollm2_compiled.generate([p.ids], max_new_tokens=16)
    assert passkey_correct(tok, p, dense.tokens[0])
    got = {}
    for r in ("snapkv:budget=0.1", "snapkv:budget=0.1,granularity=sentence", "sentencekv:budget=0.1"):
        g = skimfx.compile(model, r, tokenizer=tok).generate([p.ids], max_new_tokens=16)
        got[r] = passkey_correct(tok, p, g.tokens[0])
    assert got == {"snapkv:budget=0.1": False, "snapkv:budget=0.1,granularity=sentence": True,
                   "sentencekv:budget=0.1": True}


def test_h2o_sentence_granularity_keeps_the_budget_per_head(smollm2):
    model, tok = smollm2
    ids = tok("Rain fell all day. The roads were wet. A bus was late. " * 12 + "Was the bus late?").input_ids
    g = skimfx.compile(model, skimfx.H2O(heavy=40, recent=16, granularity="sentence", layers=(3, 9)),
                       tokenizer=tok).generate([ids], max_new_tokens=4)
    for layer in (3, 9):
        heads = g.stats.kv_kept[layer][0]
        assert all(len(h) == 56 for h in heads)
        assert all(set(range(len(ids) - 16, len(ids))) <= set(h) for h in heads)


def test_sentencekv_errors(smollm2):
    model, tok = smollm2
    with pytest.raises(skimfx.RecipeError, match="sinks \\+ recent"):
        skimfx.SentenceKV(budget=16)
    with pytest.raises(skimfx.RecipeError, match="offload"):
        skimfx.SentenceKV(budget=100, offload="yes")
    with pytest.raises(skimfx.RecipeError, match="tokenizer"):
        skimfx.compile(model, "sentencekv:budget=0.2")
    with pytest.raises(skimfx.RecipeError, match="tokenizer"):
        skimfx.compile(model, "snapkv:budget=0.2,granularity=sentence")
    cm = skimfx.compile(model, "sentencekv:budget=0.2", tokenizer=tok)
    assert "SentenceKV" not in str(cm.program) and "prompt KV offloaded to host" in str(cm.program)
    program = cm.program
    ids = tok("One. Two. Three. Four. Five. Six. Seven. Eight.").input_ids
    cache = KVCache.for_program(program, 1, plan_capacity(program, len(ids), 8))
    with torch.inference_mode():
        prefill(program, cache, [ids])
        decode_step(program, cache, torch.tensor([5]))
        with pytest.raises(ValueError, match="offloaded"):
            skimfx.runtime.extend(program, cache, torch.tensor([[5, 6, 7]]))
