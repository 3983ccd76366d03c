"""Quest over a paged KV cache (what the vLLM plugin runs), checked without vLLM: block bounds under paged
writes, the shared block selection against a direct computation and against skimfx's own Quest, and the
compacted block table against attention over the selected keys."""
import pytest
import torch

import skimfx
from skimfx.integrations.block_selection import (SparseDecodeSettings, block_scores, compact_rows,
                                                 select_blocks, update_block_bounds)
from skimfx.recipes import RecipeError
from skimfx.kernels import page_scores_ref
from skimfx.runtime.policies.quest import Quest as QuestRuntime
from tests.tiny import tiny_configs


class PagedCache:
    """A vLLM-like paged cache in plain torch: physical blocks of ``bs`` slots, one block table row per
    sequence, blocks handed out from a shuffled free list and returned when a sequence ends."""

    def __init__(self, num_blocks=24, H=2, D=8, bs=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(num_blocks, H, bs, D, generator=g) * 50    # stale garbage in unused slots
        self.v = torch.randn(num_blocks, H, bs, D, generator=g)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.bs, self.tables, self.lens = bs, {}, {}
        self.kmin = torch.zeros(num_blocks, H, D)
        self.kmax = torch.zeros(num_blocks, H, D)

    def write(self, chunks: dict, pad: int = 0):
        """chunks: seq -> (k [T, H, D], v): append, allocate blocks, fold the write into the bounds."""
        slots, ks = [], []
        for s, (k, v) in chunks.items():
            table, n = self.tables.setdefault(s, []), self.lens.get(s, 0)
            for t in range(k.shape[0]):
                pos = n + t
                if pos // self.bs >= len(table):
                    table.append(self.free.pop())
                slot = table[pos // self.bs] * self.bs + pos % self.bs
                self.k[slot // self.bs, :, slot % self.bs] = k[t]
                self.v[slot // self.bs, :, slot % self.bs] = v[t]
                slots.append(slot)
            ks.append(k)
            self.lens[s] = n + k.shape[0]
        keys = torch.cat(ks + [torch.randn(pad, *ks[0].shape[1:])])             # padding rows, slot -1
        update_block_bounds(self.kmin, self.kmax, keys, torch.tensor(slots + [-1] * pad), self.bs)

    def end(self, s):
        self.free += self.tables.pop(s)
        self.lens.pop(s)

    def keys_of(self, s) -> torch.Tensor:
        """[H, n, D] the sequence's keys in order."""
        n, t = self.lens[s], self.tables[s]
        return torch.cat([self.k[b] for b in t], dim=1)[:, :n]


def assert_bounds_exact(cache: PagedCache):
    for s, table in cache.tables.items():
        keys = cache.keys_of(s)
        for i, b in enumerate(table):
            blk = keys[:, i * cache.bs:(i + 1) * cache.bs]
            assert torch.equal(cache.kmin[b], blk.amin(1)) and torch.equal(cache.kmax[b], blk.amax(1))


def test_block_bounds_follow_prefill_chunks_decode_and_block_reuse():
    torch.manual_seed(0)
    c = PagedCache()
    H, D = 2, 8
    c.write({"a": (torch.randn(13, H, D), torch.randn(13, H, D)), "b": (torch.randn(5, H, D), torch.randn(5, H, D))},
            pad=3)
    assert_bounds_exact(c)
    c.write({"a": (torch.randn(7, H, D), torch.randn(7, H, D))})                 # a chunk that crosses a block
    assert_bounds_exact(c)
    for _ in range(11):                                                          # decode steps
        c.write({s: (torch.randn(1, H, D), torch.randn(1, H, D)) for s in ("a", "b")}, pad=1)
        assert_bounds_exact(c)
    c.end("a")                                                                   # its blocks go back, dirty
    c.write({"c": (torch.randn(19, H, D), torch.randn(19, H, D))})               # reused blocks start afresh
    assert_bounds_exact(c)
    c.write({"c": (torch.randn(1, H, D), torch.randn(1, H, D)), "b": (torch.randn(1, H, D), torch.randn(1, H, D))})
    assert_bounds_exact(c)


def reference_selection(q, keys, n_read, bs, sinks):
    """Direct: per logical block, Quest's bound Σ_d max(q_d·min_d, q_d·max_d) of every query head against
    its KV head's keys, max over all heads; sinks and newest forced; the best n_read blocks."""
    Hq, H = q.shape[0], keys.shape[0]
    n = keys.shape[1]
    P = -(-n // bs)
    score = torch.full((P,), float("-inf"))
    for p in range(P):
        blk = keys[:, p * bs:min(n, (p + 1) * bs)]
        lo, hi = blk.amin(1), blk.amax(1)                                        # [H, D]
        for h in range(Hq):
            kv = h // (Hq // H)
            score[p] = max(score[p], torch.maximum(q[h] * lo[kv], q[h] * hi[kv]).sum())
    score[:sinks] = float("inf")
    score[P - 1] = float("inf")
    return sorted(score.topk(min(n_read, P)).indices.tolist())


@pytest.mark.parametrize("sinks", [0, 1, 2])
def test_selection_is_the_quest_bound_maxed_over_all_heads(sinks):
    torch.manual_seed(1)
    c = PagedCache(num_blocks=40)
    lens = {"a": 77, "b": 41, "c": 9}
    c.write({s: (torch.randn(n, 2, 8), torch.randn(n, 2, 8)) for s, n in lens.items()})
    rows = list(lens)
    P = max(len(c.tables[s]) for s in rows)
    table = torch.tensor([c.tables[s] + [0] * (P - len(c.tables[s])) for s in rows], dtype=torch.int32)
    seq = torch.tensor([lens[s] for s in rows], dtype=torch.int32)
    q = torch.randn(3, 6, 8)
    n_read = [4, 3, 2]
    got = select_blocks(block_scores(q, c.kmin, c.kmax, table, seq, c.bs), seq, n_read, c.bs, sinks)
    for r, s in enumerate(rows):
        assert got[r].tolist() == reference_selection(q[r], c.keys_of(s), n_read[r], c.bs, sinks)


def paged_decode_attention(q, cache: PagedCache, table, seq_lens, scale):
    """What the engine's kernel computes for one-token queries: attention over slots 0..seq_len-1 of the
    row's block table (GQA), in plain torch."""
    out = []
    for r in range(q.shape[0]):
        n = int(seq_lens[r])
        blocks = table[r, :-(-n // cache.bs)].long()
        k = cache.k[blocks].permute(1, 0, 2, 3).flatten(1, 2)[:, :n]             # [H, n, D]
        v = cache.v[blocks].permute(1, 0, 2, 3).flatten(1, 2)[:, :n]
        g = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[r], k) * scale, -1)
        out.append(torch.einsum("hn,hnd->hd", p, v))
    return torch.stack(out)


def test_compacted_rows_attend_over_exactly_the_selected_blocks():
    torch.manual_seed(2)
    c = PagedCache(num_blocks=40)
    lens = {"a": 77, "b": 41, "prefill": 30}
    c.write({s: (torch.randn(n, 2, 8), torch.randn(n, 2, 8)) for s, n in lens.items()})
    rows = list(lens)
    P = max(len(c.tables[s]) for s in rows)
    table = torch.tensor([c.tables[s] + [0] * (P - len(c.tables[s])) for s in rows], dtype=torch.int32)
    seq = torch.tensor([lens[s] for s in rows], dtype=torch.int32)
    q = torch.randn(3, 6, 8)
    chosen = [torch.tensor([0, 3, 5, 9]), torch.tensor([1, 5])]
    new_table, new_lens = compact_rows(table, seq, [0, 1], chosen, c.bs)
    assert new_lens.tolist() == [3 * 8 + 5, 8 + 1, 30] and torch.equal(new_table[2], table[2])
    got = paged_decode_attention(q, c, new_table, new_lens, 0.3)
    for r, s in enumerate(rows[:2]):
        keys = c.keys_of(s)
        keep = torch.cat([torch.arange(b * 8, min(lens[s], (b + 1) * 8)) for b in chosen[r].tolist()])
        sub = PagedCache.__new__(PagedCache)
        sub.bs, sub.k, sub.v = 10_000, keys[:, keep][None], torch.cat(
            [c.v[b] for b in c.tables[s]], 1)[:, :lens[s]][:, keep][None]
        want = paged_decode_attention(q[r:r + 1], sub, torch.zeros(1, 1, dtype=torch.int32), [len(keep)], 0.3)
        torch.testing.assert_close(got[r], want[0])
    # every block selected: the table and lengths are unchanged
    t2, l2 = compact_rows(table, seq, [0], [torch.arange(10)], c.bs)
    assert torch.equal(t2, table) and torch.equal(l2, seq)
    with pytest.raises(ValueError, match="newest block"):
        compact_rows(table, seq, [0], [torch.tensor([0, 1])], c.bs)


def captured_quest_steps(model, prompt, budget, ps, steps):
    """skimfx's own Quest on ``model``: per decode step and layer the query, the layer's keys, the policy's
    bounds and the slots it read (``Quest.read_index`` wrapped)."""
    seen = []
    orig = QuestRuntime.read_index

    def spy(self, ctx, q, keys, values, kv_len, scale, softcap, lengths=None):
        idx, out = orig(self, ctx, q, keys, values, kv_len, scale, softcap, lengths)
        if idx is not None:
            seen.append(dict(layer=self.layer, q=q[:, :, 0].clone(), kv_len=kv_len.clone(), keys=keys[0].clone(),
                             kmin=self.kmin.clone(), kmax=self.kmax.clone(), index=idx.clone()))
        return idx, out

    cm = skimfx.compile(model, skimfx.Quest(token_budget=budget, page_size=ps, dense_layers=0))
    QuestRuntime.read_index = spy
    try:
        cm.generate([prompt], max_new_tokens=steps)
    finally:
        QuestRuntime.read_index = orig
    return seen


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_paged_bounds_and_shared_selection_match_skimfx_quest(kv_heads):
    """On a tiny Llama: bounds folded from the keys of skimfx's own cache, written through a shuffled block
    table, equal skimfx Quest's page bounds; the shared selection equals Quest's top pages by its own bound
    maxed over the KV heads (with one KV head: exactly the pages skimfx's Quest reads)."""
    import transformers as tf

    cfg = tiny_configs()["llama"]
    cfg.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    prompt = torch.randint(0, 512, (90,)).tolist()
    ps, budget = 8, 32
    seen = captured_quest_steps(model, prompt, budget, ps, steps=6)
    assert seen
    settings = SparseDecodeSettings(skimfx.Quest(token_budget=budget, page_size=ps, dense_layers=0), sink_blocks=0)
    for rec in seen:
        n = int(rec["kv_len"][0])
        H, P = rec["kmin"].shape[1], -(-n // ps)
        # the engine's view: the same keys written through a shuffled block table, one write per token
        perm = torch.randperm(P + 3)[:P]
        kmin, kmax = torch.zeros(P + 3, H, 16), torch.zeros(P + 3, H, 16)
        ref_keys = rec["keys"]                                                   # [H, >= n, D]
        slots = torch.tensor([int(perm[i // ps]) * ps + i % ps for i in range(n)])
        update_block_bounds(kmin, kmax, ref_keys[:, :n - 1].permute(1, 0, 2), slots[:n - 1], ps)   # prefill
        update_block_bounds(kmin, kmax, ref_keys[:, n - 1:n].permute(1, 0, 2), slots[n - 1:], ps)  # decode
        torch.testing.assert_close(kmin[perm].permute(1, 0, 2), rec["kmin"][0, :, :P], rtol=0, atol=0)
        torch.testing.assert_close(kmax[perm].permute(1, 0, 2), rec["kmax"][0, :, :P], rtol=0, atol=0)
        seq = rec["kv_len"].int()
        got = select_blocks(block_scores(rec["q"], kmin, kmax, perm[None].int(), seq, ps), seq,
                            [settings.blocks_to_read(n, ps)], ps, 0)[0]
        s = page_scores_ref(rec["q"], rec["kmin"][:, :, :P], rec["kmax"][:, :, :P], seq, ps).amax(1)[0]
        s[P - 1] = float("inf")
        assert got.tolist() == sorted(s.topk(min(P, budget // ps)).indices.tolist())
        if kv_heads == 1:
            pages = sorted({int(i) // ps for i in rec["index"][0, 0] if i >= 0})
            assert got.tolist() == pages


# ---------------------------------------------------------------------------------------------- settings
def test_settings_come_from_a_quest_recipe_string():
    assert SparseDecodeSettings.from_string(None) is None and SparseDecodeSettings.from_string("  ") is None
    s = SparseDecodeSettings.from_env({"SKIMFX_VLLM_RECIPE": "quest:token_budget=0.25,dense_layers=1",
                                       "SKIMFX_VLLM_SINK_BLOCKS": "2", "SKIMFX_VLLM_MIN_CONTEXT": "512"})
    assert (s.recipe.token_budget, s.recipe.dense_layers, s.sink_blocks, s.min_context) == (0.25, 1, 2, 512)
    assert not s.sparse_layer(0) and s.sparse_layer(1)
    assert s.blocks_to_read(2048, 32) == 16 and s.blocks_to_read(100, 32) == 3   # at least sinks + newest
    assert SparseDecodeSettings.from_string("quest:token_budget=2048").blocks_to_read(1000, 32) == 32


@pytest.mark.parametrize("text,match", [
    ("snapkv:budget=0.25", "one quest recipe"),
    ("quest:token_budget=64+gemfilter:layer=2,keep=8", "one quest recipe"),
    ("quest:budget=3", "unknown parameter"),
])
def test_settings_refuse_what_the_plugin_cannot_run(text, match):
    with pytest.raises(RecipeError, match=match):
        SparseDecodeSettings.from_string(text)


def test_settings_check_the_engine_block_size_and_env_values():
    SparseDecodeSettings.from_string("quest:token_budget=256").check_block_size(32)       # default page size
    SparseDecodeSettings.from_string("quest:token_budget=256,page_size=32").check_block_size(32)
    with pytest.raises(RecipeError, match="block size to 64"):
        SparseDecodeSettings.from_string("quest:token_budget=256,page_size=64").check_block_size(32)
    with pytest.raises(RecipeError, match="less than one KV block"):
        SparseDecodeSettings.from_string("quest:token_budget=16").check_block_size(32)
    with pytest.raises(RecipeError, match="SKIMFX_VLLM_SINK_BLOCKS must be an integer"):
        SparseDecodeSettings.from_env({"SKIMFX_VLLM_RECIPE": "quest:token_budget=64", "SKIMFX_VLLM_SINK_BLOCKS": "x"})
