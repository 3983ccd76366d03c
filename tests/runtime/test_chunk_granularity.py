"""ChunkKV-style chunk granularity (``granularity="chunk"``) of SnapKV, H2O and TOVA: each KV head keeps
whole runs of ``chunk`` prompt tokens, best first by the max (or mean) of their tokens' scores while
they fit, topped up with the best single tokens. The kept sets against that rule applied in the test to
each method's scores computed from HF's own modules; generation; validation; SmolLM2."""
import pytest
import torch
import torch.nn.functional as F

import skimfx
from skimfx import H2O, TOVA, RecipeError, SnapKV
from tiny import tiny_model

from tests.passes.test_prune_tokens import reference_qk  # noqa: E402
from tests.runtime.test_kv_policies import prompts  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _softmax_causal(q, k, rows):
    """Softmax attention of the query positions ``rows`` over the keys they see: [Hq, len(rows), T]."""
    T, D = k.shape[2], q.shape[-1]
    s = q[0, :, rows] @ k[0].transpose(-1, -2) / D ** 0.5
    sees = torch.arange(T)[None] <= torch.tensor(rows)[:, None]
    return torch.softmax(s.masked_fill(~sees, float("-inf")), -1)


def method_scores(model, ids, layer, method, window=8, recent=6):
    """Each method's per-token scores from HF's q/k ([Hkv, T]; +inf = always kept): SnapKV (window
    attention summed, mean over the GQA group, avg-pool 5; the window kept), H2O (attention received from
    every query, summed over the group; the recent tokens kept), TOVA (the last query's attention, mean
    over all heads, the same for every KV head; the last token kept)."""
    q, k = reference_qk(model, torch.tensor([ids]), layer)
    T, Hq, Hkv = len(ids), q.shape[1], model.config.num_key_value_heads
    if method == "snapkv":
        p = _softmax_causal(q, k, list(range(T - window, T))).sum(1)[:, :T - window]
        p = F.avg_pool1d(p.view(Hkv, Hq // Hkv, -1).mean(1)[:, None], 5, 1, 2)[:, 0]
        return torch.cat([p, torch.full((Hkv, window), float("inf"))], 1)
    if method == "h2o":
        p = _softmax_causal(q, k, list(range(T))).sum(1).view(Hkv, Hq // Hkv, T).sum(1)
        p[:, T - recent:] = float("inf")
        return p
    p = _softmax_causal(q, k, [T - 1])[:, 0].mean(0)
    p[T - 1] = float("inf")
    return p.expand(Hkv, T).clone()


def chunk_rule(scores, budget, chunk, reduce):
    """ChunkKV's selection for one KV head: chunks of ``chunk`` positions by the max or mean of their
    non-forced tokens' scores, best first, each taken if its non-forced tokens fit in what is left of the
    budget; then the best remaining tokens up to the budget."""
    T = scores.shape[0]
    forced = scores == float("inf")
    room = budget - int(forced.sum())
    keep = forced.clone()
    units = []
    for c in range(0, T, chunk):
        free = [j for j in range(c, min(T, c + chunk)) if not forced[j]]
        if free:
            vals = scores[free]
            units.append((float(vals.max() if reduce == "max" else vals.mean()), free))
    for _, free in sorted(units, key=lambda u: -u[0]):
        if len(free) <= room:
            keep[free] = True
            room -= len(free)
    if room > 0:
        keep[scores.masked_fill(keep, float("-inf")).topk(room).indices] = True
    return torch.nonzero(keep).flatten().tolist()


RECIPES = {"snapkv": lambda b, **kw: SnapKV(budget=b, window=8, **kw),
           "h2o": lambda b, **kw: H2O(heavy=b - 6, recent=6, **kw),
           "tova": lambda b, **kw: TOVA(budget=b, **kw)}


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_whole_chunks_follow_the_rule(llama, method, reduce):
    ids = prompts(133)[0]
    budget, chunk = 40, 7
    recipe = RECIPES[method](budget, granularity="chunk", chunk=chunk, sentence_reduce=reduce)
    g = skimfx.compile(llama, recipe).generate([ids], max_new_tokens=1)
    for layer in range(3):
        s = method_scores(llama, ids, layer, method)
        want = [chunk_rule(s[h], budget, chunk, reduce) for h in range(s.shape[0])]
        assert g.stats.kv_kept[layer][0] == want, (method, reduce, layer)


def test_chunks_are_kept_whole(llama):
    """160 tokens, budget 40, the 8-token window kept: per KV head three whole chunks of 10 (30 tokens),
    and the last 2 tokens of the budget are the window chunk's 2 other tokens or the best single ones."""
    ids = prompts(160)[0]
    g = skimfx.compile(llama, SnapKV(budget=0.25, window=8, granularity="chunk", chunk=10)).generate(
        [ids], max_new_tokens=1)
    for layer in range(3):
        for kept in g.stats.kv_kept[layer][0]:
            assert len(kept) == 40 and kept[-8:] == list(range(152, 160))
            counts = torch.bincount(torch.tensor(kept[:-8]) // 10, minlength=16).tolist()
            assert sum(c for c in counts[:15] if c == 10) == 30
            assert sum(c for c in counts[:15] if c < 10) + counts[15] == 2


def test_chunk_granularity_generates_and_ragged_batches_match(llama):
    ps = prompts(120, 70)
    for recipe in (SnapKV(budget=32, window=8, granularity="chunk", chunk=8),
                   H2O(heavy=20, recent=8, granularity="chunk", chunk=4),
                   TOVA(budget=30, granularity="chunk", chunk=5, sentence_reduce="mean")):
        cm = skimfx.compile(llama, recipe)
        batch = cm.generate(ps, max_new_tokens=10)
        assert batch.tokens == [cm.generate([p], max_new_tokens=10).tokens[0] for p in ps], recipe.name


@pytest.mark.parametrize("make, match", [
    (lambda: SnapKV(budget=64, granularity="chunks"), "granularity must be 'token' or 'sentence' or 'chunk'"),
    (lambda: TOVA(budget=64, granularity="chunk", chunk=0), "chunk must be a positive integer"),
    (lambda: H2O(heavy=8, recent=8, granularity="chunk", chunk=2.5), "chunk must be a positive integer"),
    (lambda: SnapKV(budget=64, granularity="chunk", sentence_reduce="sum"), "sentence_reduce must be"),
    (lambda: skimfx.PromptDistill(layers=1, keep=32, granularity="chunk"), "granularity must be 'token' or 'sentence',"),
])
def test_bad_parameters(make, match):
    with pytest.raises(RecipeError, match=match):
        make()


def test_recipe_strings_and_printout(llama):
    rs = skimfx.parse_recipe("snapkv:budget=0.25,granularity=chunk,chunk=16,sentence_reduce=mean")
    assert rs == [SnapKV(budget=0.25, granularity="chunk", chunk=16, sentence_reduce="mean")]
    assert skimfx.parse_recipe(skimfx.recipe_label(rs)) == rs
    cm = skimfx.compile(llama, "h2o:heavy=16,recent=8,granularity=chunk")           # no tokenizer needed
    assert "whole chunks of 10 (max)" in str(cm.program)


@pytest.mark.slow
def test_snapkv_chunks_on_smollm2(smollm2):
    model, tok = smollm2
    text = " ".join(f"Station {i} reports a temperature of {20 + i % 9} degrees." for i in range(22))
    ids = tok(text)["input_ids"]                                               # about 300 tokens
    g = skimfx.compile(model, SnapKV(budget=0.25, window=16, granularity="chunk", chunk=10, layers=(3, 17)),
                       tokenizer=tok).generate([ids], max_new_tokens=4)
    budget = round(0.25 * len(ids))
    for layer in (3, 17):
        s = method_scores(model, ids, layer, "snapkv", window=16)
        assert g.stats.kv_kept[layer][0] == [chunk_rule(s[h], budget, 10, "max") for h in range(s.shape[0])]
    assert len(g.tokens[0]) == 4
