"""Self-speculative decoding over KV cache policies: the output is exactly the policy's own greedy output
(not dense), a verification pass gives each draft token what its own decode step reads (Quest's page
choice, DELTA's set, SentenceKV's sentences per query, the evictions of StreamingLLM / TOVA / H2O), a
rollback leaves the cache and the policy state as if the rejected drafts never came (so a rejected draft
never evicted anything), early exit writes exited tokens through the policies above it, the combinations
that cannot be exact are refused with their reason, and recipe strings compose."""
import pytest
import torch

import skimfx
from skimfx import (H2O, TOVA, Delta, EarlyExit, KeyDiff, Knorm, KVzip, PromptDistill, Quest, SelfSpeculative,
                    SentenceKV, SnapKV, StreamingLLM)
from skimfx.kernels import page_minmax_ref
from skimfx.passes import EarlyExitError, PolicyError
from skimfx.program import SpeculativeConfig
from skimfx.runtime import Executor, KVCache
from skimfx.runtime.decoding import SpeculativeDecoder
from skimfx.runtime.decoding.loop import step_env
from skimfx.runtime.engine import prefill
from tiny import tiny_model


class SentenceTokenizer:
    """Just enough of a tokenizer for the sentence table: every 7th token id ends a sentence."""

    all_special_ids = []

    def __len__(self):
        return 512

    def get_vocab(self):
        return {f"t{i}": i for i in range(512)}

    def convert_ids_to_tokens(self, ids):
        return ["." if i % 7 == 0 else "a" for i in ids]


TOKENIZER = SentenceTokenizer()

# budgets below the shortest prompt (28 tokens), so every policy compresses or reads sparsely
POLICIES = {
    "snapkv": SnapKV(budget=24, window=8),
    "pyramidkv": SnapKV(budget=24, window=8, pyramid=True),
    "knorm": Knorm(budget=20),
    "keydiff": KeyDiff(budget=20),
    "kvzip": KVzip(budget=20, chunk=16, prompt_ids=(1, 2, 3)),
    "tova": TOVA(budget=20, evict_during_decode=False),
    "streamingllm": StreamingLLM(recent=16, evict_during_decode=False),
    "quest": Quest(token_budget=16, page_size=4, dense_layers=1),
    "delta": Delta(budget=8, full_layers=1, selection_layers=1, recent=4),      # select 1, reuse 2
    "sentencekv": SentenceKV(budget=20, sinks=2, recent=4, offload=False),
    # decode-time eviction: drafts are verified as decode steps one after the other, with a snapshot before each
    "streamingllm-evict": StreamingLLM(recent=16),
    "tova-evict": TOVA(budget=20),
    "h2o": H2O(heavy=8, recent=8),
    "sentencekv-offload": SentenceKV(budget=20, sinks=2, recent=4),
}
SPARSE = ["quest", "delta", "sentencekv"]
EVICT_DURING_DECODE = ["streamingllm-evict", "tova-evict", "h2o"]

# every draft source; the exit drafts run layers 0-1 token by token, so DELTA's select layer (1) drafts and
# its reuse layer (2) is verified; the skip drafts leave layer 1 out (Quest's and DELTA's select layer)
SOURCES = {
    "lookahead": SelfSpeculative(adaptive=False, draft_tokens=6, batched=False),     # batched: below
    "exit": SelfSpeculative(draft="exit", exit_layer=1, adaptive=False, draft_tokens=3),
    "skip": SelfSpeculative(draft="skip", skip_layers=1, adaptive=False, draft_tokens=3),
    "adaptive": SelfSpeculative(draft="lookahead/exit", exit_layer=0),
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 512, (40,), generator=g).tolist()
    return [base + base[:20], base[:30], base[5:12] * 4]     # repetition gives the n-gram drafts something


def compile_(model, recipes):
    return skimfx.compile(model, recipes, tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def references(llama):
    """Each policy's own greedy output (and dense), computed once."""
    ps = prompts()
    out = {name: compile_(llama, [p]).generate(ps, max_new_tokens=24, stop_tokens=[]).tokens
           for name, p in POLICIES.items()}
    out["dense"] = skimfx.compile(llama).generate(ps, max_new_tokens=24, stop_tokens=[]).tokens
    return out


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("policy", list(POLICIES))
def test_speculation_over_a_policy_gives_the_policys_own_greedy_tokens(llama, references, policy, source):
    g = compile_(llama, [POLICIES[policy], SOURCES[source]]).generate(prompts(), max_new_tokens=24, stop_tokens=[])
    assert g.tokens == references[policy]
    d = g.stats.decoding
    assert d.tokens == 3 * 23 and sum(d.drafted.values()) > 0
    if source == "lookahead":
        # drafts were accepted, and some rejected (so rollbacks ran)
        assert 0 < sum(d.accepted.values()) < sum(d.drafted.values())


def test_the_policies_change_the_greedy_output(references):
    """Matching a policy's output is not matching dense: most of these policies change the tokens."""
    differ = [name for name in POLICIES if references[name] != references["dense"]]
    assert set(SPARSE) <= set(differ) and len(differ) >= 7, differ


# ------------------------------------------------------------------------------------------- one pass per draft
def _prefilled(program, prompt, capacity=160) -> KVCache:
    cache = KVCache.for_program(program, 1, capacity)
    with torch.inference_mode():
        prefill(program, cache, [prompt])
    return cache


def _forward(program, cache, tokens) -> torch.Tensor:
    """Run ``tokens`` after the cache's tokens in one pass -> logits [T, V]."""
    ex = Executor(program)
    with torch.inference_mode():
        pos = cache.positions[0]
        ctx, env = step_env(ex, cache, tokens, pos)
        ex.run_layers(ctx, env, 0, ex.num_layers)
        cache.positions = [pos + len(tokens)]
        return ex.logits(ctx, env)[0]


def _one_at_a_time(program, cache, tokens) -> torch.Tensor:
    return torch.cat([_forward(program, cache, [t]) for t in tokens])


def _policy_state(cache) -> dict:
    return {(layer, name): value for layer, pol in cache.policies.items() for name, value in vars(pol).items()
            if isinstance(value, torch.Tensor)}


def _assert_same_cache(got: KVCache, want: KVCache):
    assert got.positions == want.positions
    for layer in range(got.num_layers):
        n = got.lengths(layer)
        assert n == want.lengths(layer), layer
        for a, b in zip(got.view(layer, n[0]), want.view(layer, n[0])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    state, want_state = _policy_state(got), _policy_state(want)
    assert state.keys() == want_state.keys()
    for key, value in want_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=str(key))
        else:
            assert torch.equal(state[key], value), key        # DELTA's token set, SentenceKV's sentences


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_verification_pass_reads_what_each_decode_step_reads(llama, policy):
    """Teacher-forced: one speculative pass over 6 tokens gives the logits and the state of 6 decode steps;
    a plain multi-token extend (a dense read, as after a prompt) does not, for the sparse readers."""
    program = compile_(llama, [POLICIES[policy]]).program
    prompt, tokens = prompts()[0], [7, 300, 41, 41, 9, 128]
    stepwise = _prefilled(program, prompt)
    want = _one_at_a_time(program, stepwise, tokens)
    verified = _prefilled(program, prompt)
    verified.begin_speculation()
    got = _forward(program, verified, tokens)
    verified.end_speculation()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    _assert_same_cache(verified, stepwise)
    if policy in SPARSE:
        dense_read = _forward(program, _prefilled(program, prompt), tokens)
        assert (dense_read - want).abs().max() > 1e-2


@pytest.mark.parametrize("policy", list(POLICIES))
def test_rollback_after_rejected_drafts_is_a_cache_that_never_saw_them(llama, policy):
    """The decoder verifies [g1, g2, wrong, wrong] after the first token: it keeps g1, g2 and its own g3,
    and the cache it leaves (k/v, lengths, positions, Quest's page bounds, DELTA's set) is the one of a
    cache that decoded only the kept tokens, one at a time; both then decode on alike."""
    program = compile_(llama, [POLICIES[policy]]).program
    prompt = prompts()[0]
    cache = KVCache.for_program(program, 1, 160)
    with torch.inference_mode():
        tok = int(prefill(program, cache, [prompt])[0].argmax())
    never, greedy = _prefilled(program, prompt), [tok]
    for _ in range(3):
        greedy.append(int(_forward(program, never, [greedy[-1]])[-1].argmax()))
    g1, g2, g3 = greedy[1:]                     # ``never`` was fed tok, g1, g2 one at a time, and predicts g3
    decoder = SpeculativeDecoder(SpeculativeConfig(("lookahead",), draft_tokens=8, adaptive=False))
    with torch.inference_mode():
        new, accepted = decoder._verify_full(Executor(program), cache, tok, [g1, g2, (g3 + 1) % 512, 5])
    assert (new, accepted) == ([g1, g2, g3], 2)
    assert not cache.speculating
    _assert_same_cache(cache, never)
    for layer, pol in cache.policies.items():
        if policy == "quest":          # the page bounds are those of the slots that stayed, exactly
            n = torch.tensor(cache.lengths(layer))
            kmin, kmax = page_minmax_ref(cache.k[layer], n, 4)
            assert torch.equal(pol.kmin, kmin) and torch.equal(pol.kmax, kmax)
        if policy == "sentencekv":     # generated tokens may go, the summarised prompt may not
            with pytest.raises(ValueError, match="would cut into it"):
                cache.truncate(layer, [len(prompt) - 1])
    torch.testing.assert_close(_one_at_a_time(program, cache, [g3, 77, 78]),
                               _one_at_a_time(program, never, [g3, 77, 78]), rtol=1e-4, atol=1e-4)


def test_delta_reuse_layers_read_each_draft_tokens_own_set(llama):
    """In a verification the select layer records one set per draft token (keyed by the layer's length
    after it) and the reuse layer reads each token's own; the sets differ from token to token."""
    program = compile_(llama, [POLICIES["delta"]]).program
    cache = _prefilled(program, prompts()[0])
    base = cache.lengths(1)[0]
    cache.begin_speculation()
    _forward(program, cache, [7, 300, 41, 41])
    sets = cache.policies[1].sets
    assert sorted(sets) == [(base + i,) for i in range(5)]
    assert len({tuple(sets[(base + i,)].flatten().tolist()) for i in range(1, 5)}) > 1
    cache.truncate(1, [base + 2])
    assert torch.equal(cache.policies[1].index, sets[(base + 2,)])
    assert sorted(cache.policies[1].sets) == [(base,), (base + 1,), (base + 2,)]
    with pytest.raises(ValueError, match="was not kept"):
        cache.policies[1].truncate(cache, [base + 2], [base - 1])
    cache.end_speculation()


# ------------------------------------------------------------------------------------------ decode-time eviction
@pytest.mark.parametrize("policy", EVICT_DURING_DECODE)
def test_a_rejected_draft_evicted_nothing(llama, policy):
    """The layers are full (at the budget) before the drafts, so every draft token evicts a slot; after the
    rollback to one kept token each layer holds the slots, ages and scores of a cache that decoded only it,
    and a cache that never saw the drafts decodes on alike."""
    program = compile_(llama, [POLICIES[policy]]).program
    prompt = prompts()[0]
    spec, never = _prefilled(program, prompt), _prefilled(program, prompt)
    budgets = [spec.lengths(l)[0] for l in range(3)]
    _forward(program, spec, [11]), _forward(program, never, [11])
    assert all(spec.lengths(l)[0] <= budgets[l] + 1 for l in range(3))
    spec.begin_speculation()
    _forward(program, spec, [12, 400, 401, 402])
    spec.rollback([1])
    spec.end_speculation()
    spec.positions = [spec.positions[0] - 3]
    _forward(program, never, [12])
    _assert_same_cache(spec, never)
    torch.testing.assert_close(_one_at_a_time(program, spec, [30, 31, 32]),
                               _one_at_a_time(program, never, [30, 31, 32]), rtol=1e-4, atol=1e-4)


def test_truncate_refuses_a_layer_that_evicts_during_decode(llama):
    program = compile_(llama, [POLICIES["h2o"]]).program
    cache = _prefilled(program, prompts()[0])
    _forward(program, cache, [5])
    with pytest.raises(ValueError, match="evicts during decode.*KVCache.rollback"):
        cache.truncate(1, [cache.lengths(1)[0] - 1])
    with pytest.raises(ValueError, match="none was called"):
        cache.rollback([0])


# ------------------------------------------------------------------------------------------------ early exit
@pytest.mark.parametrize("policy", ["snapkv", "quest", "streamingllm-evict", "h2o", "delta"])
def test_early_exit_over_a_policy_above_the_exit(llama, policy):
    """Layers above the exit cache exited tokens through their policy. A threshold no token reaches is the
    policy alone; one every token reaches exits at layer 0 each step, and the evicting layers above stay at
    their budget (the exited tokens took evicted slots) while the appending ones grow by one per token."""
    pol = POLICIES[policy]
    want = compile_(llama, pol).generate(prompts(), max_new_tokens=12, stop_tokens=[])
    never = compile_(llama, [EarlyExit(layers=0, threshold=1.0), pol]).generate(prompts(), max_new_tokens=12,
                                                                                 stop_tokens=[])
    assert never.tokens == want.tokens and never.stats.decoding.exits == {2: 3 * 11}
    cm = compile_(llama, [EarlyExit(layers=0, threshold=1e-6), pol])
    g = cm.generate(prompts()[:1], max_new_tokens=12, stop_tokens=[])
    assert g.stats.decoding.exits == {0: 11}
    cache = KVCache.for_program(cm.program, 1, 160)
    with torch.inference_mode():
        prefill(cm.program, cache, [prompts()[0]])
    after_prefill = [cache.lengths(l)[0] for l in range(3)]
    from skimfx.runtime.decoding import EarlyExitDecoder
    decoder = EarlyExitDecoder(cm.program.decoding)
    ex = Executor(cm.program)
    state = decoder.start(ex, cache, list(prompts()[0]))
    with torch.inference_mode():
        for t in range(6):
            decoder.step(ex, cache, state, 100 + t, g.stats.decoding)
    grown = [cache.lengths(l)[0] - after_prefill[l] for l in range(3)]
    if policy in EVICT_DURING_DECODE:
        assert grown[1:] == [0, 0] and after_prefill[1] == cache.policies[1].params.tokens(len(prompts()[0]))
    else:
        assert grown[1:] == [6, 6]
    if policy == "quest":               # the page bounds cover the exited tokens' keys
        n = torch.tensor(cache.lengths(2))
        kmin, kmax = page_minmax_ref(cache.k[2], n, 4)
        assert torch.equal(cache.policies[2].kmin, kmin) and torch.equal(cache.policies[2].kmax, kmax)


@pytest.mark.parametrize("policy,match", [
    (TOVA(budget=20), "TOVA evicts the token that the current query attends to least"),
    (skimfx.DuoAttention(calibration=[[0.9, 0.1]] * 3, streaming=0.5, sinks=2, recent=8),
     "streaming heads roll their window"),
], ids=["tova", "duo"])
def test_early_exit_refuses_policies_that_need_a_query_to_place_a_token(llama, policy, match):
    with pytest.raises(EarlyExitError, match=r"layer \d lies above the lowest exit \(0\).*" + match):
        compile_(llama, [policy, EarlyExit(layers=0, threshold=0.5)])
    with pytest.raises(PolicyError, match=match):
        compile_(llama, [EarlyExit(layers=0, threshold=0.5), policy])
    cm = compile_(llama, [EarlyExit(layers=0, threshold=0.5)])
    cm.program.policies.update(compile_(llama, policy).program.policies)      # past the passes' check
    with pytest.raises(ValueError, match=match):
        cm.generate(prompts()[:1], max_new_tokens=4, stop_tokens=[])


# ------------------------------------------------------------------------------------------------ batched
@pytest.mark.parametrize("policy", ["dense"] + list(POLICIES))
def test_batched_speculation_gives_each_sequences_own_greedy_tokens(llama, references, policy):
    """The three prompts (60, 30 and 28 tokens) are verified together: ragged drafts, one pass per step for
    the batch, each row rolled back on its own. Same tokens as the policy alone, in fewer passes than
    speculating prompt by prompt."""
    recipes = [] if policy == "dense" else [POLICIES[policy]]
    spec = SelfSpeculative(adaptive=False, draft_tokens=6)
    g = compile_(llama, recipes + [spec]).generate(prompts(), max_new_tokens=24, stop_tokens=[])
    assert g.tokens == references[policy]
    d = g.stats.decoding
    assert 0 < d.accepted["lookahead"] <= d.drafted["lookahead"] and d.tokens == 3 * 23
    one = compile_(llama, recipes + [SelfSpeculative(adaptive=False, draft_tokens=6, batched=False)]).generate(
        prompts(), max_new_tokens=24, stop_tokens=[])
    assert one.tokens == g.tokens
    passes = lambda s: s.plain_steps + sum(s.verify_steps.values())                     # noqa: E731
    assert passes(d) < passes(one.stats.decoding)


def test_batched_speculation_with_stops_and_the_adaptive_width(llama, references):
    """A sequence that stops early sits out the remaining passes; the adaptive width matches too."""
    ps = prompts()
    stop = references["delta"][1][5]
    want = compile_(llama, POLICIES["delta"]).generate(ps, max_new_tokens=24, stop_tokens=[stop])
    assert want.finish_reasons[1] == "stop"
    for spec in (SelfSpeculative(adaptive=False, draft_tokens=3), SelfSpeculative()):
        g = compile_(llama, [POLICIES["delta"], spec]).generate(ps, max_new_tokens=24, stop_tokens=[stop])
        assert g.tokens == want.tokens and g.finish_reasons == want.finish_reasons
    assert skimfx.parse_recipe("selfspeculative:batched=false") == [SelfSpeculative(batched=False)]
    with pytest.raises(skimfx.RecipeError, match="batched must be true or false"):
        SelfSpeculative(batched="yes")


# ------------------------------------------------------------------------------------------------ recipe strings
def test_recipe_strings_compose_pruning_a_policy_and_speculation(llama):
    text = "snapkv:budget=0.25+selfspeculative:draft=lookahead"
    rs = skimfx.parse_recipe(text)
    assert rs == [SnapKV(budget=0.25), SelfSpeculative(draft="lookahead")]
    assert skimfx.parse_recipe(skimfx.recipe_label(rs)) == rs
    cm = skimfx.compile(llama, text)
    assert sorted(cm.program.policies) == [0, 1, 2] and cm.program.decoding.mode == "speculative"
    text = "promptdistill:layers=8,keep=256+quest:token_budget=64+selfspeculative:draft=lookahead"
    assert skimfx.parse_recipe(text) == [PromptDistill(layers=8, keep=256), Quest(token_budget=64),
                                         SelfSpeculative(draft="lookahead")]
    # the same on the 3-layer model: pruning after layer 0, Quest on layers 1-2, lookahead drafts
    small = "promptdistill:layers=0,keep=24+quest:token_budget=16,page_size=4,dense_layers=1"
    want = skimfx.compile(llama, small).generate(prompts(), max_new_tokens=24, stop_tokens=[])
    g = skimfx.compile(llama, small + "+selfspeculative:draft=lookahead,adaptive=false").generate(
        prompts(), max_new_tokens=24, stop_tokens=[])
    assert g.tokens == want.tokens and sorted(g.stats.selected) == [0]
    assert sum(g.stats.decoding.accepted.values()) > 0


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_speculation_over_policies_on_smollm2(smollm2):
    """A ~300-token prompt that repeats itself: lookahead drafts over SnapKV and over PromptDistill + Quest
    give exactly the policy's own greedy tokens, with drafts accepted; so do batches verified together."""
    model, tok = smollm2
    text = ("The lighthouse keeper climbed the stairs every evening, counted the ships in the harbour, wrote "
            "their names in a blue notebook and lit the lamp before the sun went down. ") * 9
    ids = tok(text).input_ids
    assert 250 <= len(ids) <= 350

    def generate(recipe):
        return skimfx.compile(model, recipe).generate([ids], max_new_tokens=40, stop_tokens=[])

    for policy in ("snapkv:budget=0.25", "promptdistill:layers=8,keep=256+quest:token_budget=64"):
        want = generate(policy).tokens
        # drafting every step (the adaptive schedule may pass over drafts on a slow machine)
        g = generate(policy + "+selfspeculative:draft=lookahead,adaptive=false")
        assert g.tokens == want, policy
        assert sum(g.stats.decoding.accepted.values()) > 0, policy
        if policy.startswith("snapkv"):
            assert generate(policy + "+selfspeculative:draft=lookahead").tokens == want
    # a ragged batch of three, verified together (H2O evicts at every draft token)
    batch = [ids, ids[:200], ids[40:]]
    for policy in ("promptdistill:layers=8,keep=128+quest:token_budget=64", "h2o:heavy=48,recent=16"):
        want = skimfx.compile(model, policy).generate(batch, max_new_tokens=30, stop_tokens=[]).tokens
        g = skimfx.compile(model, policy + "+selfspeculative:draft=lookahead").generate(batch, max_new_tokens=30,
                                                                                       stop_tokens=[])
        assert g.tokens == want, policy
