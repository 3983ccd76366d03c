"""KV heads that keep different numbers of tokens: the cache's head groups, AdaKV's adaptive head budgets
(kept sets against the rule written out in plain torch over the scorer's scores from HF's modules) and
DuoAttention (the calibration against a direct computation from HF's modules; retrieval heads keep
everything, streaming heads sinks + recent). Generation against HF with the per-head masks they imply,
ragged batches, the bytes really allocated, speculation over them, bad parameters."""
import pytest
import torch

import skimfx
from skimfx import AdaKV, DuoAttention, Knorm, RecipeError, SelfSpeculative
from skimfx.calibrate.duo import DuoCalibration, calibrate_duo
from skimfx.runtime.cache import KVCache
from tiny import tiny_model

from tests.runtime.test_expected_attention import expected_attention_rule, hf_layer_qkv  # noqa: E402
from tests.runtime.test_kv_policies import _hf_with_layer_mask, per_head_kept_mask, prompts  # noqa: E402

D, FP32 = 16, 4


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# -- the cache -------------------------------------------------------------------------------------
def test_split_layer_holds_exactly_its_heads_tokens():
    cache = KVCache(2, 2, 3, D, 20, torch.float32, "cpu")
    k = torch.randn(2, 3, 12, D)
    v = torch.randn(2, 3, 12, D)
    cache.write(0, k, v)
    cache.advance(0, [12, 9])
    counts = [[5, 2, 5], [7, 1, 7]]                  # heads 0 and 2 agree for both sequences: one group
    index = torch.tensor([[[0, 2, 4, 6, 8, 0, 0], [3, 11, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 0, 0]],
                          [[0, 1, 2, 3, 4, 5, 6], [8, 0, 0, 0, 0, 0, 0], [2, 3, 4, 5, 6, 7, 8]]])
    cache.split_heads(0, index, counts, headroom=3)
    groups = cache.groups[0]
    assert [g.heads for g in groups] == [(0, 2), (1,)]
    assert [g.k.shape[2] for g in groups] == [7 + 3, 2 + 3]
    assert torch.equal(groups[0].k[0, 1, :5], k[0, 2, 1:6])
    assert torch.equal(groups[1].v[1, 0, :1], v[1, 1, 8:9])
    assert cache.lengths(0) == [5, 7] and cache.head_lengths(0) == [[5, 2, 5], [7, 1, 7]]
    assert cache.nbytes() == (3 * 20 + 2 * 10 + 1 * 5) * 2 * 2 * D * FP32   # layer 1 uniform; layer 0 groups
    assert cache.used_bytes() == ((5 + 2 + 5) + (7 + 1 + 7)) * 2 * D * FP32
    cache.write(0, k[:, :, :1], v[:, :, :1])             # a decode step appends to every head
    cache.advance(0, [1, 1])
    assert cache.head_lengths(0) == [[6, 3, 6], [8, 2, 8]]
    assert torch.equal(groups[1].k[0, 0, 2], k[0, 1, 0])
    cache.truncate(0, [5, 7])                              # a rejected draft: every head forgets it
    assert cache.head_lengths(0) == [[5, 2, 5], [7, 1, 7]]
    assert cache.capacity(0) == 7 + 3
    cache.resize(0, 7 + 8)
    assert [g.k.shape[2] for g in cache.groups[0]] == [15, 10] and cache.capacity(0) == 15
    for what in (lambda: cache.view(0, 3), lambda: cache.compact(0, index[..., :2], [2, 2])):
        with pytest.raises(ValueError, match="stored as head groups"):
            what()
    cache.reset(headroom=4, tokens=4)
    assert not cache.is_split(0)


# -- AdaKV -----------------------------------------------------------------------------------------
def adakv_rule(scores: torch.Tensor, budget: int, alpha: float) -> list[list[int]]:
    """AdaKV over per-head scores [Hkv, n] of one sequence: each head's int(alpha * budget) best are
    safeguarded, then the budget * Hkv best of the layer; the kept positions per head."""
    H, n = scores.shape
    s = scores.double().clone()
    safe = int(budget * alpha)
    for h in range(H):
        for j in s[h].topk(safe).indices.tolist():
            s[h, j] = 1e300
    flat = sorted(range(H * n), key=lambda i: -s.view(-1)[i].item())[:budget * H]
    return [sorted(i % n for i in flat if i // n == h) for h in range(H)]


def knorm_scores(model, ids, layer):
    _, k, _ = hf_layer_qkv(model, ids, layer)
    return -k.norm(dim=-1)


@pytest.mark.parametrize("alpha", [0.2, 0.0, 0.5])
def test_adakv_over_knorm_follows_the_rule(llama, alpha):
    ids = prompts(140)[0]
    g = skimfx.compile(llama, AdaKV(budget=30, scorer="knorm", alpha=alpha)).generate([ids], max_new_tokens=1)
    uneven = False
    for layer in range(3):
        kept = g.stats.kv_kept[layer][0]
        assert kept == adakv_rule(knorm_scores(llama, ids, layer), 30, alpha), layer
        assert sum(map(len, kept)) == 30 * 2 and min(map(len, kept)) >= int(30 * alpha)
        uneven |= len(kept[0]) != len(kept[1])
    assert uneven                                          # the heads do keep different counts


def test_adakv_with_a_full_safeguard_is_the_uniform_scorer(llama):
    # (not layer 0: there a repeated token has equal key norms at every position, and ties may go either way)
    ps = prompts(120, 77)
    uniform = skimfx.compile(llama, Knorm(budget=25, layers=(1, 2))).generate(ps, max_new_tokens=8)
    ada = skimfx.compile(llama, AdaKV(budget=25, scorer="knorm", alpha=1.0, layers=(1, 2))).generate(
        ps, max_new_tokens=8)
    assert ada.stats.kv_kept == uniform.stats.kv_kept and ada.tokens == uniform.tokens


def test_adakv_over_expected_attention_generation_equals_hf_with_the_per_head_mask(llama):
    ids = prompts(110)[0]
    g = skimfx.compile(llama, AdaKV(budget=0.3, scorer="expected_attention", layers=1)).generate(
        [ids], max_new_tokens=16)
    kept = g.stats.kv_kept[1][0]
    assert len(kept[0]) != len(kept[1]) and sum(map(len, kept)) == 2 * 33
    # the scorer's own rule keeps each head's top 33; AdaKV keeps a head's top len(kept[h]) of the same scores
    for h in range(2):
        if len(kept[h]) <= 33:
            assert set(kept[h]) <= set(expected_attention_rule(llama, ids, 1, 33)[h])
    seq, n = ids + g.tokens[0], len(ids)
    mask = per_head_kept_mask(kept, n, len(seq), 6, 3)
    assert _hf_with_layer_mask(llama, seq, {1: mask})[n - 1:len(seq) - 1].tolist() == g.tokens[0]


def test_adakv_ragged_batch_and_the_bytes_really_allocated(llama):
    ps = prompts(130, 61, 95)
    cm = skimfx.compile(llama, AdaKV(budget=30, scorer="keydiff"))
    batch = cm.generate(ps, max_new_tokens=10)
    alone = [cm.generate([p], max_new_tokens=10) for p in ps]
    assert batch.tokens == [a.tokens[0] for a in alone]
    assert batch.stats.kv_kept == {l: [a.stats.kv_kept[l][0] for a in alone] for l in range(3)}
    for a in alone:      # one sequence: each head's group holds its kept count plus the 10 new tokens' room
        held = sum(len(h) + 10 for l in range(3) for h in a.stats.kv_kept[l][0])
        assert a.stats.kv_prefill_bytes == held * 2 * D * FP32
        assert a.stats.kv_prefill_bytes == 3 * 2 * (30 + 10) * 2 * D * FP32     # the layer's total is fixed


def test_adakv_over_kvzip_keeps_the_layer_total(llama):
    g = skimfx.compile(llama, AdaKV(budget=24, scorer="kvzip")).generate(prompts(100), max_new_tokens=4)
    for layer in range(3):
        assert sum(map(len, g.stats.kv_kept[layer][0])) == 48


def test_adakv_sharing_one_budget_over_the_model(llama):
    # share="model": one threshold over every head of every covered layer, layers decided together after the
    # last one's scores (a prefill scorer: the layers below wait with their full prompt); ragged batch = alone
    ps = prompts(130, 70, 95)
    cm = skimfx.compile(llama, AdaKV(budget=25, scorer="knorm", alpha=0.2, share="model"))
    batch = cm.generate(ps, max_new_tokens=6)
    alone = [cm.generate([p], max_new_tokens=6) for p in ps]
    assert batch.tokens == [a.tokens[0] for a in alone]
    assert batch.stats.kv_kept == {l: [a.stats.kv_kept[l][0] for a in alone] for l in range(3)}
    ids = ps[0]
    scores = torch.stack([knorm_scores(llama, ids, l) for l in range(3)])              # [L, Hkv, n]
    L, H, n = scores.shape
    s = scores.double().clone()
    for l in range(L):
        for h in range(H):
            s[l, h, s[l, h].topk(int(25 * 0.2)).indices] = 1e300                       # per-head safeguard
    top = set(s.reshape(-1).topk(25 * H * L).indices.tolist())
    want = [[sorted(i % n for i in top if i // n == l * H + h) for h in range(H)] for l in range(L)]
    kept = [alone[0].stats.kv_kept[l][0] for l in range(L)]
    assert kept == want and len({sum(map(len, k)) for k in kept}) > 1
    # a prompt within the budget evicts nothing anywhere, and the next prompt is decided afresh
    short = cm.generate([prompts(20)[0]], max_new_tokens=2)
    assert short.stats.kv_kept == {} or all(len(h) == 20 for l in short.stats.kv_kept.values() for h in l[0])
    assert cm.generate([ids], max_new_tokens=6).stats.kv_kept == alone[0].stats.kv_kept


def test_self_speculation_over_adakv_is_its_own_greedy_output(llama):
    ps = prompts(60, 45)
    plain = skimfx.compile(llama, AdaKV(budget=20, scorer="knorm")).generate(ps, max_new_tokens=20)
    spec = skimfx.compile(llama, [AdaKV(budget=20, scorer="knorm"),
                                  SelfSpeculative(adaptive=False, draft_tokens=4)]).generate(ps, max_new_tokens=20)
    assert spec.tokens == plain.tokens


@pytest.mark.parametrize("kw, match", [
    (dict(scorer="knorm"), "adakv needs a budget"),
    (dict(budget=20, scorer="h2o"), "scorer must be one of"),
    (dict(budget=20, alpha=1.5), r"alpha .* must be in \[0, 1\]"),
    (dict(budget=20, share="global"), "share must be 'layer'"),
    (dict(budget=20, scorer="snapkv"), "window \\(32\\) must be smaller than budget"),
    (dict(scorer=Knorm(budget=20), budget=30), "differs from its scorer's"),
    (dict(scorer=skimfx.TOVA(budget=20)), "must not evict during decode"),
    (dict(scorer=skimfx.SnapKV(budget=40, granularity="chunk")), "granularity='token'"),
])
def test_adakv_bad_parameters(kw, match):
    with pytest.raises(RecipeError, match=match):
        AdaKV(**kw)


def test_adakv_recipe_string_and_printout(llama):
    r = skimfx.parse_recipe("adakv:budget=0.2,scorer=keydiff,alpha=0.3")
    assert r == [AdaKV(budget=0.2, scorer="keydiff", alpha=0.3)]
    assert skimfx.recipe_label(r) == "adakv:budget=0.2,scorer=keydiff,alpha=0.3"
    assert "adakv: keep 20%, head budgets from keydiff: keep 20%" in str(skimfx.compile(llama, r).program)
    r = skimfx.parse_recipe("adakv:budget=0.1,scorer=kvzip,alpha=0,share=model")
    assert r == [AdaKV(budget=0.1, scorer="kvzip", alpha=0, share="model")]
    assert "one budget over all its layers" in str(skimfx.compile(llama, r).program)


# -- DuoAttention ------------------------------------------------------------------------------------
def test_duo_calibration_scores_follow_a_direct_computation(llama, tmp_path):
    """One piece: each KV head's mean relative output change when restricted to sinks + recent, from HF's
    own q/k/v, equals the calibration's score."""
    ids = prompts(90, seed=5)[0]
    cal = calibrate_duo(llama, [ids], tokens=90, length=90, sinks=4, recent=16)
    assert cal.scores.shape == (3, 2) and cal.tokens == 90
    for layer in range(3):
        q, k, v = hf_layer_qkv(llama, ids, layer)
        cos, sin = llama.model.rotary_emb(q, torch.arange(90)[None])
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        q, _ = apply_rotary_pos_emb(q[None], q[None], cos, sin)
        q = q[0].double()
        scale = llama.model.layers[layer].self_attn.scaling
        for kh in range(2):
            rel = []
            for g in range(3):
                s = (q[kh * 3 + g] @ k[kh].double().T) * scale
                i, j = torch.arange(90)[:, None], torch.arange(90)[None]
                full = torch.softmax(s.masked_fill(j > i, -torch.inf), -1) @ v[kh].double()
                keep = (j <= i) & ((j < 4) | (j > i - 16))
                stream = torch.softmax(s.masked_fill(~keep, -torch.inf), -1) @ v[kh].double()
                rel.append(((full - stream) ** 2).sum(-1)[20:] / (full ** 2).sum(-1)[20:])
            want = torch.stack(rel).mean(0).mean().item()
            assert cal.scores[layer, kh].item() == pytest.approx(want, rel=1e-4), (layer, kh)
    cal.save(tmp_path / "duo.safetensors")
    back = DuoCalibration.load(tmp_path / "duo.safetensors")
    assert torch.equal(back.scores, cal.scores) and (back.sinks, back.recent) == (4, 16)


SCORES = [[0.1, 0.9], [0.5, 0.2], [0.3, 0.8]]


def duo_mask(streaming: dict, n: int, T: int, sinks: int, recent: int, roll: bool) -> dict:
    """Per layer a [1, Hq, T, T] mask: the prompt rows causal; a generated token's row on a streaming head reads
    the prompt's sinks and last ``recent`` tokens and every generated token (``roll``: the sinks and the
    ``recent`` newest tokens, itself included), on a retrieval head everything before it."""
    out = {}
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    causal = j <= i
    for layer, heads in streaming.items():
        mask = causal.expand(1, 6, T, T).clone()
        for kh in heads:
            if roll:
                window = causal & ((j < sinks) | (j > i - recent))
            else:
                window = causal & ((j < sinks) | (j >= n - recent))
            rows = window.clone()
            rows[:n] = causal[:n]
            mask[0, kh * 3:(kh + 1) * 3] = rows
        out[layer] = mask
    return out


def test_duo_rolls_the_streaming_window_during_decode(llama):
    """The paper's rule: a streaming head's decode query reads the sinks and the ``recent`` newest tokens, and
    its group never grows past that."""
    r = DuoAttention(calibration=SCORES, streaming=0.5, sinks=4, recent=16)
    ids = prompts(120)[0]
    g = skimfx.compile(llama, r).generate([ids], max_new_tokens=30)
    seq, n = ids + g.tokens[0], len(ids)
    masks = duo_mask({0: (0,), 1: (1,), 2: (0,)}, n, len(seq), 4, 16, roll=True)
    assert _hf_with_layer_mask(llama, seq, masks)[n - 1:len(seq) - 1].tolist() == g.tokens[0]
    # streaming groups stay at their 20-slot window; retrieval groups hold the prompt and the new tokens' room
    assert g.stats.kv_prefill_bytes == g.stats.kv_bytes == 3 * ((120 + 30) + 20) * 2 * D * FP32
    short = prompts(9)[0]                                   # shorter than the window: it fills, then rolls
    g = skimfx.compile(llama, r).generate([short], max_new_tokens=25)
    seq = short + g.tokens[0]
    masks = duo_mask({0: (0,), 1: (1,), 2: (0,)}, 9, len(seq), 4, 16, roll=True)
    assert _hf_with_layer_mask(llama, seq, masks)[8:len(seq) - 1].tolist() == g.tokens[0]


def test_duo_with_rolling_under_speculation_gives_its_own_greedy_output(llama):
    """The streaming heads roll their window at every draft token (verified step by step, after a snapshot
    of the head groups and the roll positions); rejected drafts are rolled back per sequence, batched or not."""
    r = DuoAttention(calibration=SCORES, sinks=4, recent=16)
    base = prompts(40)[0]
    ps = [base + base[:30], base[:36] * 2]
    want = skimfx.compile(llama, r).generate(ps, max_new_tokens=30, stop_tokens=[])
    for batched in (False, True):
        g = skimfx.compile(llama, [r, SelfSpeculative(adaptive=False, draft_tokens=4, batched=batched)]).generate(
            ps, max_new_tokens=30, stop_tokens=[])
        assert g.tokens == want.tokens
        assert 0 < g.stats.decoding.accepted["lookahead"] < g.stats.decoding.drafted["lookahead"]


def test_duo_streams_the_lowest_scoring_heads_and_keeps_the_others_whole(llama):
    r = DuoAttention(calibration=SCORES, streaming=0.5, sinks=4, recent=16, evict_during_decode=False)
    pols = r.policies(skimfx.compile(llama).info)
    assert {l: p.streaming for l, p in pols.items()} == {0: (0,), 1: (1,), 2: (0,)}
    ids = prompts(120)[0]
    g = skimfx.compile(llama, r).generate([ids], max_new_tokens=12)
    window = list(range(4)) + list(range(120 - 16, 120))
    for layer, stream in ((0, 0), (1, 1), (2, 0)):
        kept = g.stats.kv_kept[layer][0]
        assert kept[stream] == window and kept[1 - stream] == list(range(120))
    # real memory: full heads hold the prompt, streaming heads sinks + recent (plus the 12 new tokens' room)
    assert g.stats.kv_prefill_bytes == 3 * ((120 + 12) + (20 + 12)) * 2 * D * FP32
    seq, n = ids + g.tokens[0], len(ids)
    masks = {l: per_head_kept_mask(g.stats.kv_kept[l][0], n, len(seq), 6, 3) for l in range(3)}
    assert _hf_with_layer_mask(llama, seq, masks)[n - 1:len(seq) - 1].tolist() == g.tokens[0]
    want = duo_mask({0: (0,), 1: (1,), 2: (0,)}, n, len(seq), 4, 16, roll=False)
    assert all(torch.equal(masks[l], want[l]) for l in range(3))


def test_duo_ragged_batch_and_no_streaming_is_dense(llama):
    ps = prompts(120, 30, 75, 12)
    for roll in (True, False):
        r = DuoAttention(calibration=SCORES, streaming=0.5, sinks=4, recent=16, evict_during_decode=roll)
        cm = skimfx.compile(llama, r)
        batch = cm.generate(ps, max_new_tokens=14)
        assert batch.tokens == [cm.generate([p], max_new_tokens=14).tokens[0] for p in ps]
    dense = skimfx.compile(llama).generate(ps, max_new_tokens=8)
    assert skimfx.compile(llama, DuoAttention(calibration=SCORES, streaming=0.0)).generate(
        ps, max_new_tokens=8).tokens == dense.tokens


def test_duo_from_a_calibration_file(llama, tmp_path):
    cal = DuoCalibration(torch.tensor(SCORES), 4, 16)
    cal.save(tmp_path / "duo.safetensors")
    got = skimfx.compile(llama, f"duo_attention:calibration={tmp_path / 'duo.safetensors'},streaming=0.5,sinks=4,"
                                "recent=16").generate(prompts(100), max_new_tokens=2)
    assert [len(h) for h in got.stats.kv_kept[0][0]] == [20, 100]
    assert cal.recipe(streaming=0.5).policies(skimfx.compile(llama).info)[1].streaming == (1,)


@pytest.mark.parametrize("kw, match", [
    (dict(), "needs head scores"),
    (dict(calibration=SCORES, streaming=1.5), r"must be in \[0, 1\]"),
    (dict(calibration=SCORES, recent=0), "recent must be a positive integer"),
])
def test_duo_bad_parameters(kw, match):
    with pytest.raises(RecipeError, match=match):
        DuoAttention(**kw)


def test_duo_scores_of_another_model_are_refused(llama):
    with pytest.raises(Exception, match="calibrate on this model"):
        skimfx.compile(llama, DuoAttention(calibration=[[0.1, 0.2]], streaming=0.5))


@pytest.mark.slow
def test_on_smollm2(smollm2):
    """The calibration on the shipped texts (a short run) and AdaKV over Knorm on SmolLM2."""
    model, tok = smollm2
    cal = calibrate_duo(model, tokenizer=tok, tokens=600, length=300, sinks=16, recent=64)
    assert torch.isfinite(cal.scores).all() and cal.scores.shape == (30, 3)
    text = " ".join(f"The code for door {i} is {1000 + 37 * i}." for i in range(25))
    ids = tok(text)["input_ids"]
    g = skimfx.compile(model, [cal.recipe(streaming=0.5)], tokenizer=tok).generate([ids], max_new_tokens=4)
    streaming = sum(len(h) == 80 for l in g.stats.kv_kept for h in g.stats.kv_kept[l][0])
    assert streaming == 45
    budget = round(0.25 * len(ids))
    g = skimfx.compile(model, AdaKV(budget=0.25, scorer="knorm", layers=(2, 20)), tokenizer=tok).generate(
        [ids], max_new_tokens=4)
    for layer in (2, 20):
        assert g.stats.kv_kept[layer][0] == adakv_rule(knorm_scores(model, ids, layer), budget, 0.2), layer
