"""A ragged batch packed into one row (``runtime/packing.py``): the layout round-trips, and a verification pass
over packed rows gives the logits and leaves the cache and the KV policies' state that the same pass over
right-padded rows does (the layers see no padding, attention sees the padded call it always saw)."""
import pytest
import torch

import skimfx
from skimfx import H2O, Delta, Quest, SelfSpeculative, SnapKV, StreamingLLM
from skimfx.runtime import Executor, KVCache
from skimfx.runtime.context import Ctx
from skimfx.runtime.packing import PackedRows
from skimfx.runtime.steps import pad_right, prefill
from tiny import tiny_model


def test_pack_and_pad_round_trip():
    counts = [3, 0, 1, 2]
    p = PackedRows(counts, "cpu")
    assert p.tokens == 6 and (p.batch, p.width) == (4, 3)
    x = torch.arange(2 * 6 * 5, dtype=torch.float32).view(1, 2, 6, 5)               # [1, H, N, D]
    padded = p.pad(x)
    assert padded.shape == (4, 2, 3, 5)
    for b, (s, n) in enumerate(zip(p.starts, counts)):
        assert torch.equal(padded[b, :, :n], x[0, :, s:s + n])
    assert torch.equal(p.pack(padded), x)
    assert p.pack_ids([[1, 2, 3], [], [4], [5, 6]]).tolist() == [[1, 2, 3, 4, 5, 6]]
    assert p.positions([10, 20, 30, 40]).tolist() == [[10, 11, 12, 30, 40, 41]]
    assert [t.tolist() for t in p.split(torch.arange(6)[None])] == [[0, 1, 2], [], [3], [4, 5]]


def test_packed_rows_refuse_bad_layouts():
    with pytest.raises(ValueError, match="at least one token"):
        PackedRows([0, 0], "cpu")
    with pytest.raises(ValueError, match="negative"):
        PackedRows([2, -1], "cpu")
    with pytest.raises(ValueError, match="differ from the packed counts"):
        PackedRows([2, 1], "cpu").pack_ids([[1], [2, 3]])


PROMPTS = [list(range(3, 63)), list(range(100, 130)), [7, 8, 9, 10] * 7]
FED = [[5, 6, 7, 8, 9], [], [11, 12]]           # the last token plus drafts; row 1 finished (feeds nothing)
POLICIES = {"dense": None, "quest": Quest(token_budget=16, page_size=4, dense_layers=1),
            "delta": Delta(budget=8, full_layers=1, selection_layers=1, recent=4),
            "snapkv": SnapKV(budget=24, window=8), "h2o": H2O(heavy=8, recent=8),
            "streamingllm": StreamingLLM(recent=16)}


def _verified(program, packed: bool):
    """Prefill the three prompts, then one verification pass over FED, packed or right-padded."""
    cache = KVCache.for_program(program, len(PROMPTS), 128)
    ex = Executor(program)
    n_valid = [len(f) for f in FED]
    with torch.inference_mode():
        prefill(program, cache, PROMPTS)
        cache.positions = [len(p) for p in PROMPTS]
        cache.begin_speculation()
        if packed:
            rows = PackedRows(n_valid, "cpu")
            ctx = Ctx(cache, n_valid, program, packed=rows)
            env = ex.embed(ctx, rows.pack_ids(FED), rows.positions(cache.positions))
        else:
            T = max(n_valid)
            ctx = Ctx(cache, n_valid, program)
            pos = torch.tensor(cache.positions)[:, None] + torch.arange(T)[None]
            env = ex.embed(ctx, pad_right([f or [0] for f in FED], "cpu")[:, :T], pos)
        ex.run_layers(ctx, env, 0, ex.num_layers)
        logits = ex.logits(ctx, env)
        cache.rollback([min(2, n) for n in n_valid])          # keep two of each row's tokens
        cache.end_speculation()
    if packed:
        return rows.split(logits), cache
    return [logits[b, :n] for b, n in enumerate(n_valid)], cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_packed_verification_pass_equals_the_padded_one(arch, policy):
    model = tiny_model(arch)
    recipes = ([POLICIES[policy]] if POLICIES[policy] else []) + [SelfSpeculative(adaptive=False)]
    program = skimfx.compile(model, recipes).program
    got, packed_cache = _verified(program, packed=True)
    want, padded_cache = _verified(program, packed=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for layer in range(program.info.num_layers):
        n = packed_cache.lengths(layer)
        assert n == padded_cache.lengths(layer)
        for b, m in enumerate(n):
            for a, w in zip(packed_cache.view(layer, max(n)), padded_cache.view(layer, max(n))):
                torch.testing.assert_close(a[b, :, :m], w[b, :, :m], rtol=1e-5, atol=1e-5)
    for layer, pol in packed_cache.policies.items():
        other = padded_cache.policies[layer]
        for name, value in vars(pol).items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, getattr(other, name), rtol=1e-5, atol=1e-5, msg=f"{layer} {name}")
