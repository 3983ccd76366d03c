"""Early exit and self-speculation: exit branches and k/v-fill subgraphs (early_exit pass), lossless
self-speculative decoding token-identical to dense greedy (tiny configs and the real models), CALM
early exit against a directly computed reference, exit calibration, and the errors."""
import copy
import dataclasses
import functools

import pytest
import torch

import skimfx
from skimfx import EarlyExit, SelfSpeculative
from skimfx.eval import chat_ids
from skimfx.kernels.linear import linear_packable as linear  # compile lowers to the packable kernel by default
from skimfx.passes import EarlyExitError, early_exit
from skimfx.program import DecodeConfig, EarlyExitConfig, SpeculativeConfig
from skimfx.runtime import Ctx, Executor, KVCache
from skimfx.runtime.decoding import (DECODERS, Acceptance, EarlyExitDecoder, NGramDrafts, SpeculativeDecoder,
                                     StepCosts)
from tiny import tiny_model

LOSSLESS = ["selfspeculative", "selfspeculative:draft=exit,exit_layer=1",
            "selfspeculative:draft=lookahead/exit,exit_layer=0,draft_tokens=3",
            "selfspeculative:adaptive=false,draft_tokens=6",
            "selfspeculative:draft=skip,skip_layers=1,adaptive=false,draft_tokens=3",
            "selfspeculative:draft=lookahead/skip,skip_layers=0/2"]


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 512, (40,), generator=g).tolist()
    return [base + base[:20], base[:30], base[5:12] * 4]     # repetition gives the n-gram drafts something


@pytest.mark.parametrize("arch", ["llama"])      # Gemma 3 is covered by the real-model test below
def test_lossless_modes_are_token_identical_to_dense_on_tiny_models(arch):
    model = tiny_model(arch)
    ps = prompts()
    dense = skimfx.compile(model).generate(ps, max_new_tokens=24, stop_tokens=[])
    for r in LOSSLESS:
        g = skimfx.compile(model, r).generate(ps, max_new_tokens=24, stop_tokens=[])
        assert g.tokens == dense.tokens, r
        d = g.stats.decoding
        assert sum(d.drafted.values()) > 0 and d.tokens == 3 * 23
        assert 0 <= sum(d.accepted.values()) <= sum(d.drafted.values())


def test_exit_branch_and_kv_fill_stages():
    model = tiny_model("llama")
    cm = skimfx.compile(model, EarlyExit(layers=(0, 1), threshold=0.5))
    p = cm.program
    assert sorted(p.exits) == [0, 1] and sorted(p.kv_fill) == [1, 2]
    assert ("early_exit", 4) in p.history
    # the kv-fill graph has no attention call and no MLP (only the q/k/v projection's linear)
    for st in p.kv_fill.values():
        targets = [n.target for n in st.module.graph.nodes if n.op == "call_function"]
        assert sum(t is linear for t in targets) == 1
    # the exit branch = the model's own final norm + head on layer 1's output
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states[2]          # output of layer 1
        ref = model.lm_head(model.model.norm(hs))[0].softmax(-1)
    T = ids.shape[1]
    cache = KVCache.for_program(p, 1, T)
    ex = Executor(p)
    with torch.inference_mode():
        ctx = Ctx(cache, [T], p)
        env = ex.embed(ctx, ids, torch.arange(T)[None])
        ex.run_layers(ctx, env, 0, 2)
        top, prob, margin = ex.exit(ctx, env, 1)
        assert top.tolist() == ref.argmax(-1).tolist()
        torch.testing.assert_close(prob, ref.max(-1).values, atol=1e-5, rtol=1e-4)
        # kv fill of layer 2 = what layer 2 itself writes to the cache for the same input
        k, v = p.kv_fill[2].module(None, *[env[n] for n in p.kv_fill[2].inputs])
        ex.run_layers(ctx, env, 2, 3)
        assert ex.layer_tokens == 3 * T
        kc, vc = cache.view(2, ids.shape[1])
        torch.testing.assert_close(k, kc)
        torch.testing.assert_close(v, vc)


def test_early_exit_at_the_first_layer_is_the_one_layer_model():
    """Every step exits after layer 0 (threshold tiny): the tokens after the first one are the greedy
    continuation of the same model cut to its first layer (layers above only get filled k/v)."""
    model = tiny_model("llama")
    ids = prompts()[0]
    g = skimfx.compile(model, EarlyExit(layers=0, threshold=1e-9)).generate([ids], max_new_tokens=12,
                                                                              stop_tokens=[])
    assert g.stats.decoding.exits == {0: 11}
    one = copy.deepcopy(model)
    one.model.layers = one.model.layers[:1]
    one.config.num_hidden_layers = 1
    seq = ids + g.tokens[0][:1]
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        for _ in range(11):
            seq.append(one(torch.tensor([seq])).logits[0, -1].argmax().item())
    assert g.tokens[0] == [first] + seq[len(ids) + 1:]
    # a threshold no token reaches is the dense model
    dense = skimfx.compile(model).generate([ids], max_new_tokens=12, stop_tokens=[])
    never = skimfx.compile(model, EarlyExit(layers=(0, 1), threshold=1.0)).generate([ids], max_new_tokens=12,
                                                                                  stop_tokens=[])
    assert never.tokens == dense.tokens and never.stats.decoding.exits == {2: 11}


def test_plain_configs_pick_their_decoder_by_mode():
    """``program.decoding`` is plain data: the decoding package looks the decoder up by the config's mode.
    A config set directly (no recipe) decodes like the recipe's; an unknown mode is refused."""
    from skimfx.runtime.decoding.hogwild import HogwildDecoder
    from skimfx.runtime.decoding.majority import ShortMajorityDecoder

    assert DECODERS == {"early_exit": EarlyExitDecoder, "speculative": SpeculativeDecoder,
                        "short_mk": ShortMajorityDecoder, "hogwild": HogwildDecoder}
    model = tiny_model("llama")
    ps = prompts()
    dense = skimfx.compile(model).generate(ps, max_new_tokens=12, stop_tokens=[])
    passes = skimfx.default_passes() + [functools.partial(early_exit, layers=(1,))] + skimfx.passes.final_passes()
    cm = skimfx.compile(model, passes=passes)
    assert cm.program.decoding is None
    cm.program.decoding = SpeculativeConfig(sources=("lookahead", "exit"), exit_layer=1, adaptive=False,
                                            draft_tokens=3, min_gain=0.0)
    g = cm.generate(ps, max_new_tokens=12, stop_tokens=[])
    assert g.tokens == dense.tokens and g.stats.decoding.tokens == 3 * 11 and g.stats.decoding.plain_steps == 0
    cm.program.decoding = EarlyExitConfig(((1, 1.0),))        # never confident enough: the dense model
    g = cm.generate(ps, max_new_tokens=12, stop_tokens=[])
    assert g.tokens == dense.tokens and g.stats.decoding.exits == {2: 3 * 11}

    class Medusa(DecodeConfig):
        mode = "medusa"

    cm.program.decoding = Medusa()
    with pytest.raises(ValueError, match="no decoder for decoding mode 'medusa'"):
        cm.generate(ps, max_new_tokens=4)


def test_ngram_drafts_follow_the_latest_earlier_occurrence():
    d = NGramDrafts(min_n=2, max_n=3)
    toks = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2]
    assert d.propose(toks, 3) == [3, 7, 8] and d.order == 2   # "1 2" last seen before the end at positions 6-7
    assert d.propose(toks + [3], 2) == [7, 8] and d.order == 3   # "1 2 3" -> 7 8
    assert NGramDrafts().propose([5, 6, 7], 4) == []


def test_draft_length_follows_measured_costs_and_acceptance():
    cost, plain = StepCosts(), 1.0
    assert cost(3, plain) == plain                         # nothing measured: a plain step's cost
    cost.add(4, 3.0)
    assert cost(2, plain) == 2.0                           # between a plain step (k = 0) and k = 4
    assert cost(6, plain) == 4.0                           # above the longest: along the line through k = 0 and 4
    cost.add(8, 2.2)
    assert cost(6, plain) == pytest.approx(2.6)
    assert cost(10, plain) == 2.2                          # the last two measured fall: flat, not falling
    cost.add(8, 3.2)
    assert cost(8, plain) == pytest.approx(0.7 * 2.2 + 0.3 * 3.2)
    good, bad = Acceptance(0.9), Acceptance(0.9)
    for _ in range(30):
        good.observe(8, 8)          # every draft accepted
        bad.observe(8, 0)           # every first draft rejected
    flat = StepCosts()
    for k in range(1, 9):           # a verification's cost grows slowly with its width
        flat.add(k, 2.0 + 0.01 * k)
    k, rate = good.best(8, flat, plain, first=8)
    p = min(good.hits / (good.hits + good.misses), 0.999)
    assert k == 8 and rate == pytest.approx((1 - p ** 9) / (1 - p) / flat(8, plain))
    k, rate = bad.best(8, flat, plain, first=8)  # at p ~ 0 every k emits ~1 token: the cheapest k, slower than plain
    assert k == 1 and rate < 1 / plain
    # drafts grow by doubling: 2 first, then up to twice the longest measured
    assert good.best(8, StepCosts(), plain, first=2)[0] == 2
    two = StepCosts()
    two.add(2, 1.5)
    assert good.best(8, two, plain, first=2)[0] == 4


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_lossless_modes_are_token_identical_to_dense_on_real_models(which, request):
    model, tok = request.getfixturevalue(which)
    dense_cm = request.getfixturevalue(f"{which}_compiled")
    texts = ["Copy this sentence exactly: The old lighthouse keeper walked slowly down to the harbour.",
             "Write a short story about a lighthouse keeper."]
    ids = [chat_ids(tok, t) for t in texts]
    dense = dense_cm.generate(ids, max_new_tokens=16, stop_tokens=[])
    L = model.config.num_hidden_layers
    # lookahead drafts where the n-grams match, exit drafts elsewhere (adaptive off: every step drafts)
    r = SelfSpeculative(draft="lookahead/exit", exit_layer=L - 4, adaptive=False, draft_tokens=2)
    g = skimfx.compile(model, r, tokenizer=tok).generate(ids, max_new_tokens=16, stop_tokens=[])
    assert g.tokens == dense.tokens, which
    d = g.stats.decoding
    assert d.drafted.get("lookahead", 0) > 0 and d.drafted.get("exit", 0) > 0 and d.plain_steps == 0


def test_calibrated_exits_on_the_real_model(smollm2, smollm2_compiled, tmp_path):
    model, tok = smollm2
    texts = skimfx.reference_texts()
    cal = skimfx.calibrate_exits(smollm2_compiled, texts, layers=(20, 26), method="ridge", max_tokens=1200)
    for l in (20, 26):
        assert cal.agreement[l] > cal.raw_agreement[l]            # the adapter helps
    assert cal.raw_agreement[26] > cal.raw_agreement[20]
    t = cal.threshold(26, 0.9)
    conf, cum = cal.curves[26]
    assert 0 < t <= 1 and cum[conf >= t][-1] >= 0.9
    cal.save(tmp_path / "exits.pt")
    back = skimfx.ExitCalibration.load(tmp_path / "exits.pt")
    assert back.threshold(26, 0.9) == t
    torch.testing.assert_close(back.adapters[26].weight, cal.adapters[26].weight)
    cm = skimfx.compile(model, EarlyExit(layers=(20, 26), calibration=str(tmp_path / "exits.pt"),
                                         target_agreement=0.9), tokenizer=tok)
    assert "adapter" in str(cm.program)
    ids = chat_ids(tok, "What is a license?")
    g = cm.generate([ids], max_new_tokens=24, stop_tokens=[])
    assert len(g.tokens[0]) == 24 and sum(g.stats.decoding.exits.values()) == 23
    # the lossless exit draft with the calibrated adapter is still exactly dense
    spec = skimfx.compile(model, SelfSpeculative(draft="exit", exit_layer=26, calibration=cal), tokenizer=tok)
    dense = smollm2_compiled.generate([ids], max_new_tokens=24, stop_tokens=[])
    assert spec.generate([ids], max_new_tokens=24, stop_tokens=[]).tokens == dense.tokens


def test_skip_calibration_and_draft_on_the_real_model(smollm2, smollm2_compiled, tmp_path):
    model, tok = smollm2
    cal = skimfx.calibrate_skip(smollm2_compiled, skimfx.reference_texts(), max_tokens=128, max_skip=4,
                                draft_tokens=4)
    L = model.config.num_hidden_layers
    assert sorted(cal.order) == list(range(L)) and cal.agreement[0] == 1.0 and cal.tokens == 128
    # the ranking is by single-layer ablation, best first; skipping the whole first prefix is measured
    assert [cal.ablation[l] for l in cal.order] == sorted(cal.ablation.values(), reverse=True)
    assert 2 <= len(cal.agreement) <= 5 and all(0 <= a <= 1 for a in cal.agreement)
    assert cal.ablation[cal.order[0]] == cal.agreement[1]
    # the modelled speed-up is the best over the measured prefixes, and the chosen set is that prefix
    best = max(range(len(cal.expected)), key=lambda s: cal.expected[s])
    assert cal.skip == tuple(sorted(cal.order[:best]))
    # skipping layer 0 (the embedding's first transform) hurts more than skipping the most redundant layer
    assert cal.ablation[0] < cal.ablation[cal.order[0]]
    # this thin model has no redundant layer: skipping the most redundant one costs ~20% agreement, so no
    # set pays for itself at a full verification per step (the calibration says so, and the recipe refuses it)
    assert cal.agreement[1] < 0.9 and cal.skip == ()
    with pytest.raises(skimfx.RecipeError, match="chose no layers"):
        SelfSpeculative(draft="skip", skip_layers=cal)
    forced = dataclasses.replace(cal, skip=tuple(sorted(cal.order[:2])))
    forced.save(tmp_path / "skip.pt")
    assert skimfx.SkipCalibration.load(tmp_path / "skip.pt").skip == forced.skip
    # lossless with the calibrated set, every step drafting (adaptive off)
    skip = cal.order[:3]
    r = SelfSpeculative(draft="skip", skip_layers=skip, adaptive=False, draft_tokens=3)
    ids = chat_ids(tok, "Copy this sentence exactly: The old lighthouse keeper walked slowly down to the harbour.")
    dense = smollm2_compiled.generate([ids], max_new_tokens=12, stop_tokens=[])
    g = skimfx.compile(model, r, tokenizer=tok).generate([ids], max_new_tokens=12, stop_tokens=[])
    assert g.tokens == dense.tokens
    d = g.stats.decoding
    assert d.drafted["skip"] > 0 and d.plain_steps == 0
    # a draft token costs L - 3 layers, a verification L per verified token
    steps = d.verify_steps["skip"]
    assert d.layer_tokens == d.drafted["skip"] * (L - 3) + (d.drafted["skip"] + steps) * L
    assert skimfx.resolve(SelfSpeculative(draft="skip", skip_layers=str(tmp_path / "skip.pt"))).skip_layers == forced.skip


def test_decoding_errors():
    model = tiny_model("llama")
    with pytest.raises(skimfx.RecipeError, match="draft must be"):
        SelfSpeculative(draft="medusa")
    with pytest.raises(skimfx.RecipeError, match="exit_layer is needed"):
        SelfSpeculative(draft="exit")
    with pytest.raises(skimfx.RecipeError, match="skip_layers is needed"):
        SelfSpeculative(draft="skip")
    with pytest.raises(skimfx.RecipeError, match="skip_layers is needed"):
        SelfSpeculative(skip_layers=(1,))
    with pytest.raises(skimfx.RecipeError, match="distinct layer indices"):
        SelfSpeculative(draft="skip", skip_layers=(1, 1))
    with pytest.raises(skimfx.RecipeError, match="no SkipCalibration file"):
        skimfx.resolve(SelfSpeculative(draft="skip", skip_layers="/nonexistent/skip.pt"))
    with pytest.raises(skimfx.RecipeError, match="is a path: skimfx.compile loads it"):
        SelfSpeculative(draft="skip", skip_layers="/nonexistent/skip.pt").passes(skimfx.capture(model).info)
    with pytest.raises(skimfx.RecipeError, match="do not fit"):
        skimfx.compile(model, SelfSpeculative(draft="skip", skip_layers=(0, 1, 2)))
    with pytest.raises(skimfx.RecipeError, match="do not fit"):
        skimfx.compile(model, SelfSpeculative(draft="skip", skip_layers=(7,)))
    with pytest.raises(ValueError, match="max_skip"):
        skimfx.calibrate_skip(skimfx.compile(model), ["some text here"], tokenizer=object(), max_skip=0)
    with pytest.raises(skimfx.RecipeError, match="either threshold"):
        EarlyExit(layers=1)
    with pytest.raises(skimfx.RecipeError, match="needs a calibration"):
        EarlyExit(layers=1, target_agreement=0.9)
    with pytest.raises(skimfx.RecipeError, match="threshold must be"):
        EarlyExit(layers=(0, 1), threshold=(0.5, 0.6, 0.7))
    with pytest.raises(skimfx.RecipeError, match="out of range"):
        skimfx.compile(model, EarlyExit(layers=2, threshold=0.5))
    # self-speculation composes with every policy (tests/runtime/test_speculation_over_policies.py); early
    # exit refuses one that needs a query to place an exited token, in either order
    with pytest.raises(EarlyExitError, match="TOVA evicts the token"):
        skimfx.compile(model, [skimfx.TOVA(budget=8), EarlyExit(layers=0, threshold=0.5)])
    with pytest.raises(skimfx.passes.PolicyError, match="TOVA evicts the token"):
        skimfx.compile(model, [EarlyExit(layers=0, threshold=0.5), skimfx.TOVA(budget=8)])
    with pytest.raises(EarlyExitError, match="out of range"):
        early_exit(skimfx.compile(model).program, [5])
    cm = skimfx.compile(model, SelfSpeculative())
    with pytest.raises(ValueError, match="greedily"):
        cm.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.8)
    with pytest.raises(ValueError, match="max_cache_len"):
        skimfx.compile(model, SelfSpeculative(), max_cache_len=16).generate([[1] * 12], max_new_tokens=8)
    cache = KVCache(1, 1, 2, 16, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(0, [3])
