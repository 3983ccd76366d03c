"""The captured decode step (runtime/static.py): one graph with zero breaks under
``torch.compile(fullgraph=True)``, the eager path's tokens and read sets, HF's tokens when dense."""
import pytest
import torch

import skimfx
from skimfx.runtime import KVCache
from skimfx.runtime.engine import decode_step, plan_capacity, prefill
from skimfx.runtime.static import StaticDecoder, step_function
from tiny import tiny_model

pytestmark = pytest.mark.slow          # compiles decode steps with torch.compile (inductor): the full lane only

# every policy with a captured step; int budgets (a fraction is fixed at the length the step starts from)
RECIPES = {
    "dense": None,
    "delta": "delta:budget=40,full_layers=1,selection_layers=1,recent=8",
    "quest": "quest:token_budget=48,dense_layers=1",
    "snapkv": "snapkv:budget=60,window=8",
    "streamingllm-prompt": "streamingllm:recent=50,evict_during_decode=false",
    "streamingllm": "streamingllm:recent=50",
    "h2o": "h2o:heavy=30,recent=20",
    "tova-prompt": "tova:budget=60,evict_during_decode=false",
    "tova": "tova:budget=60",
    "sentencekv": "sentencekv:budget=60,offload=false",
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _prompts(*lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lens]


class _Tokenizer:
    """A tokenizer stand-in for the random-weight model's 512 ids: every id ending in 7 is a period."""

    all_special_ids = []

    def __len__(self):
        return 512

    def get_vocab(self):
        return {f"t{i}": i for i in range(512)}

    def convert_ids_to_tokens(self, ids):
        return ["." if i % 10 == 7 else f"t{i}" for i in ids]


def _compile(model, recipe):
    return skimfx.compile(model, recipe, tokenizer=_Tokenizer())


def _teacher_forced(program, prompts, tokens, backend, mode):
    """Logits of each step fed the same ``tokens [steps, B]``, eager or captured."""
    cache = KVCache.for_program(program, len(prompts), plan_capacity(program, max(map(len, prompts)), 40))
    out, sets = [], []
    with torch.inference_mode():
        prefill(program, cache, prompts)
        dec = StaticDecoder(program, cache, backend) if mode == "static" else None
        for t in tokens:
            out.append(dec.step(t) if dec else decode_step(program, cache, t))
            sets.append({l: p.index.clone() for l, p in cache.policies.items() if getattr(p, "index", None) is not None})
        if dec:
            dec.finish()
    return torch.stack(out), sets, cache


@pytest.mark.parametrize("name", list(RECIPES))
def test_captured_step_matches_the_eager_step(llama, name):
    """Teacher-forced over 24 steps of a ragged batch: the same logits (fp32 rounding) and, for DELTA, the
    same token set per step; the cache ends with the same lengths and positions."""
    cm = _compile(llama, RECIPES[name])
    prompts = _prompts(150, 97)
    tokens = torch.randint(0, 512, (24, 2), generator=torch.Generator().manual_seed(1))
    ref, ref_sets, ref_cache = _teacher_forced(cm.program, prompts, tokens, None, "eager")
    got, got_sets, got_cache = _teacher_forced(cm.program, prompts, tokens, "eager", "static")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for r, g in zip(ref_sets, got_sets):
        for layer in r:
            assert torch.equal(g[layer].clamp(min=-1), r[layer]), layer
    assert [ref_cache.lengths(l) for l in range(3)] == [got_cache.lengths(l) for l in range(3)]
    assert ref_cache.positions == got_cache.positions
    for l in range(3):
        n = max(ref_cache.lengths(l))
        torch.testing.assert_close(got_cache.k[l][:, :, :n], ref_cache.k[l][:, :, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "delta", "quest", "sentencekv", "streamingllm", "h2o", "tova"])
def test_captured_step_has_no_graph_break(llama, name):
    cm = _compile(llama, RECIPES[name])
    program = cm.program
    prompts = _prompts(90, 61)
    cache = KVCache.for_program(program, 2, plan_capacity(program, 90, 8))
    with torch.inference_mode():
        prefill(program, cache, prompts)
        dec = StaticDecoder(program, cache, backend=None)
        explained = torch._dynamo.explain(step_function(program, None))(cache, dec.lengths, dec.positions,
                                                                         torch.tensor([3, 4]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_generate_compiled_equals_eager_and_hf(llama):
    """Greedy generation through the captured step (inductor) is token-identical to the eager runtime and
    to HF's generate on a dense model."""
    ids = _prompts(40)[0]
    cm = skimfx.compile(llama)
    eager = cm.generate([ids], max_new_tokens=12)
    compiled = cm.generate([ids], max_new_tokens=12, decode="compiled")
    assert compiled.tokens == eager.tokens
    with torch.no_grad():
        hf = llama.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert compiled.tokens[0] == hf
    assert compiled.stats.attended_fraction == 1.0


def test_compiled_decoding_reports_what_it_read(llama):
    cm = skimfx.compile(llama, "quest:token_budget=32,dense_layers=1")
    g = cm.generate(_prompts(200), max_new_tokens=10, decode="compiled", backend="eager")
    e = cm.generate(_prompts(200), max_new_tokens=10)
    assert g.tokens == e.tokens
    assert g.stats.reads == e.stats.reads


def test_one_compiled_step_serves_every_cache_of_the_same_shapes(llama):
    cm = skimfx.compile(llama, RECIPES["delta"])
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    for seed in (0, 1):
        cm.generate(_prompts(120, 80, seed=seed), max_new_tokens=6, decode="compiled", backend="eager")
    assert counts["stats"]["unique_graphs"] == 1


def test_policies_without_a_captured_step_are_refused(llama):
    cm = _compile(llama, "sentencekv:budget=60")                      # offloaded: host copies each step
    with pytest.raises(NotImplementedError, match=r"does not run the KV policies \['SentenceKV'\].*decode='eager'"):
        cm.generate(_prompts(100), max_new_tokens=4, decode="compiled")
    with pytest.raises(ValueError, match="decode must be .auto. or one of"):
        cm.generate(_prompts(100), max_new_tokens=4, decode="cuda")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        skimfx.compile(llama).generate(_prompts(10), max_new_tokens=4, decode="graph")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_verification_of_several_tokens_is_captured_too(arch):
    """The k + 1 tokens of a self-speculative verification in one captured step (no graph break): the same
    logits as the eager runtime's multi-token extend, on a model with sliding-window layers too."""
    from skimfx.runtime.engine import extend

    model = tiny_model(arch)
    program = skimfx.compile(model).program
    prompts = _prompts(60, 45)
    draft = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    caches = [KVCache.for_program(program, 2, plan_capacity(program, 60, 10)) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            prefill(program, c, prompts)
        ref = extend(program, caches[0], draft, all_logits=True)
        dec = StaticDecoder(program, caches[1], backend="eager")
        got = dec.step(draft)
        explained = torch._dynamo.explain(step_function(program, None))(caches[1], dec.lengths.clone(),
                                                                        dec.positions.clone(), draft)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert explained.graph_break_count == 0
    dec.finish()
    assert caches[1].lengths(0) == caches[0].lengths(0) and caches[1].positions == caches[0].positions
