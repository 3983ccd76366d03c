"""What the evicting policies share: the cache physically shrinks to the budget after prefill and,
with decode-time eviction, stays there by overwriting the least valuable slot with each new token.

Slot bookkeeping. After compaction a cache slot no longer equals a token position, and after a
decode-time eviction the newest token may sit in any slot. RoPE was applied before caching, so
attention does not care where a token sits; what decode eviction needs is each slot's *age* (the order
in which the layer received its token: ``age [B, Hkv, cap]``), to keep sinks (age < sinks) and the
recent window (age >= seen - recent). ``seen [B]`` counts the tokens the layer has ever received.

A subclass gives the prompt scores (``prefill_scores``: +inf = always kept) and, when it evicts during
decode, the eviction priority of each slot (``priority``: the lowest unprotected one goes).
Sentence granularity (``granularity="sentence"``): each KV head keeps whole sentences by the max (or
mean) of their tokens' scores, best first while they fit, then the best single tokens up to the
budget (the cache compacts to one length per sequence, so every head keeps the same count).
Chunk granularity (``granularity="chunk"``, after ChunkKV, Liu et al., 2025): the same with fixed-size
runs of ``chunk`` prompt tokens as the units. ChunkKV itself sums the scores over the heads, so that
every head keeps the same chunks, and reduces a chunk by its mean (``sentence_reduce="mean"``); here each
KV head chooses its own chunks, as sentence granularity does.
"""
from __future__ import annotations

import torch

from ...kernels import attention
from .base import KVPolicy
from .scoring import amount, grow, keep_index, sentence_keep_index


class EvictingPolicy(KVPolicy):
    spare_slots = 0          # slots past the budget that decode eviction needs

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        # decode-eviction state; None until the first prefill (or the first step of a one-token prompt)
        self.seen: torch.Tensor | None = None            # [B] tokens the layer has received
        self.budget_tokens: torch.Tensor | None = None   # [B] slots kept per sequence
        self.recent: torch.Tensor | None = None          # [B] newest tokens never evicted
        self.age: torch.Tensor | None = None             # [B, Hkv, cap] arrival order of each slot's token

    @property
    def decode_evict(self) -> bool:
        return bool(getattr(self.params, "decode_evict", False))

    # -- what a method defines --------------------------------------------------------------------
    def prefill_scores(self, ctx, q, keys, n: list[int], budget: list[int], scale: float) -> torch.Tensor:
        """[B, Hkv, S] scores of the cached prompt slots; +inf = always kept."""
        raise NotImplementedError

    def prepare(self, ctx, q, keys, n: list[int], scale: float) -> None:
        """State the method computes from the prompt even when nothing is evicted now (H2O's scores)."""

    def priority(self, cap: int) -> torch.Tensor:
        """[B, Hkv, cap] decode-eviction priority of each slot (the lowest unprotected one is evicted)."""
        raise NotImplementedError(f"{self.name} does not evict during decode")

    def after_compact(self, index: torch.Tensor, cap: int) -> None:
        """Per-slot state follows the kept slots ``index [B, Hkv, K]`` into a layer of ``cap`` slots."""

    def on_slot_written(self, slot: torch.Tensor, cap: int) -> None:
        """A new token went into ``slot [B, Hkv]`` at decode."""

    def observe(self, q, keys, kv_len: torch.Tensor, scale: float) -> None:
        """The step's query after its attention (H2O accumulates the attention each key receives)."""

    # -- after prefill ----------------------------------------------------------------------------
    def after_prefill(self, ctx, q, scale: float) -> None:
        cache, layer = ctx.cache, self.layer
        n = list(cache.lengths(layer))
        dev = q.device
        budget = [self.params.tokens(m) for m in n]
        if self.decode_evict:
            self.seen = torch.tensor(n, device=dev)
            self.budget_tokens = torch.tensor(budget, device=dev)
            self.recent = torch.tensor([min(amount(getattr(self.params, "recent", 0), m), b)
                                        for m, b in zip(n, budget)], device=dev)
        keys, _ = cache.view(layer, max(n))
        H, S = keys.shape[1], keys.shape[2]
        if self.decode_evict:
            self.age = torch.arange(S, device=dev).expand(len(n), H, S).contiguous()
        self.prepare(ctx, q, keys, n, scale)
        kept = [min(b, m) for b, m in zip(budget, n)]
        if kept == n:
            return
        self.keep_best(ctx, self.prefill_scores(ctx, q, keys, n, budget, scale), n, budget)

    def keep_best(self, ctx, scores: torch.Tensor, n: list[int], budget: list[int]) -> None:
        """Shrink the layer to the ``min(budget[b], n[b])`` best slots of each (sequence, KV head) row by
        ``scores [B, Hkv, S]`` (+inf = always kept), whole units first at sentence or chunk granularity."""
        cache, layer = ctx.cache, self.layer
        dev = scores.device
        B, H, S = scores.shape
        kept = [min(b, m) for b, m in zip(budget, n)]
        j = torch.arange(S, device=dev)
        scores = scores.masked_fill(j[None, None] >= torch.tensor(n, device=dev)[:, None, None], float("-inf"))
        granularity = getattr(self.params, "granularity", "token")
        if granularity == "sentence":
            if ctx.sentence_ids is None:
                raise ValueError(f"{self.name} with granularity='sentence' needs the prompt's sentence ids")
            index = sentence_keep_index(scores, ctx.sentence_ids[:, :S], kept, self.params.sentence_reduce, n)
        elif granularity == "chunk":
            # ChunkKV's units: runs of ``chunk`` slots, i.e. of prompt positions (of the kept tokens, in
            # order, when token pruning below this layer kept a subset)
            units = (j // self.params.chunk).expand(B, S)
            index = sentence_keep_index(scores, units, kept, self.params.sentence_reduce, n)
        else:
            index = keep_index(scores, kept)                                        # [B, Hkv, K]
        headroom = max(budget) - index.shape[-1] + self.spare_slots if self.decode_evict else None
        cache.compact(layer, index, kept, headroom=headroom)
        cap = cache.capacity(layer)
        if self.decode_evict:
            age = torch.zeros(B, H, cap, dtype=torch.long, device=dev)
            age[:, :, :index.shape[-1]] = index
            self.age = age
        self.after_compact(index, cap)
        ctx.kv_kept[layer] = [[row[:m] for row in heads] for heads, m in zip(index.tolist(), cache.lengths(layer))]

    # -- self-speculation -----------------------------------------------------------------------------
    # Without decode eviction the prompt was compressed once and decode appends: the defaults verify
    # causally and truncate. With it, drafts are decode steps one after the other with a snapshot before
    # each (``KVPolicy.verify_stepwise`` / ``rollback``), so only ``KVCache.rollback`` can forget them.
    def truncate(self, cache, old: list[int], new: list[int]) -> None:
        if self.decode_evict:
            raise ValueError(f"layer {self.layer}: {self.name} evicts during decode, so the newest slots are not the "
                             "newest tokens; tokens written since KVCache.begin_speculation are forgotten with "
                             "KVCache.rollback (which restores the snapshot before them)")
        super().truncate(cache, old, new)

    # -- decode -----------------------------------------------------------------------------------
    def check_extend(self, ctx, T: int) -> None:
        if self.decode_evict and any(ctx.cache.lengths(self.layer)):
            raise ValueError(f"{self.name}: a cache that evicts during decode takes one new token per step; "
                             f"extending it by {T} tokens at once is not supported (prefill the whole prompt)")

    def start_empty(self, lengths: torch.Tensor, H: int, cap: int) -> None:
        """A one-token prompt: nothing was written by a prefill; the layer holds ``lengths [B]`` tokens."""
        B, dev = lengths.shape[0], lengths.device
        self.seen = lengths.clone()
        self.budget_tokens = torch.full((B,), self.params.tokens(1), device=dev)
        self.age = torch.zeros(B, H, cap, dtype=torch.long, device=dev)
        self.recent = torch.full((B,), min(amount(getattr(self.params, "recent", 0), 1), self.params.tokens(1)),
                                 device=dev)

    def decode(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        if not self.decode_evict:
            return super().decode(ctx, q, k, v, scale, softcap)
        cache, layer = ctx.cache, self.layer
        self.evict_and_write(ctx, k, v)
        kv_len = cache.lengths_tensor(layer)
        keys, values = cache.view(layer, int(kv_len.max()))
        out = attention(q, keys, values, kv_len - 1, kv_len, scale, None, softcap)
        self.observe(q, keys, kv_len, scale)
        ctx.count(layer, cache.lengths(layer))
        return out

    def fill(self, ctx, k, v) -> None:
        """A token that exited below: it takes a slot as a decode step's token would (and receives no
        attention here)."""
        if not self.decode_evict:
            return super().fill(ctx, k, v)
        if k.shape[2] != 1:
            raise ValueError(f"{self.name} evicts during decode and caches one exited token per step, not "
                             f"{k.shape[2]}")
        self.evict_and_write(ctx, k, v)

    def evict_and_write(self, ctx, k, v) -> None:
        """Write one new token per sequence (k/v [B, Hkv, 1, D]): appended while the layer holds fewer than its
        budget, otherwise into the slot of the lowest-priority unprotected token."""
        cache, layer = ctx.cache, self.layer
        dev = k.device
        B, H = k.shape[0], k.shape[1]
        L = cache.lengths_tensor(layer)
        cap = cache.capacity(layer)
        if self.seen is None:
            self.start_empty(L, H, cap)
        self.age = age = grow(self.age, cap)
        full = L >= self.budget_tokens                                              # [B]
        slot = L[:, None].expand(B, H)
        if bool(full.any()):
            j = torch.arange(cap, device=dev)[None, None]
            valid = j < L[:, None, None]
            protected = (age >= (self.seen - self.recent)[:, None, None]) | ~valid
            victim = self.priority(cap).masked_fill(protected, float("inf")).argmin(-1)   # [B, Hkv]
            slot = torch.where(full[:, None], victim, slot)
        cache.write_slots(layer, slot, k, v)
        age.scatter_(2, slot[:, :, None], self.seen[:, None, None].expand(B, H, 1))
        self.on_slot_written(slot, cap)
        self.seen = self.seen + torch.tensor(ctx.n_valid, device=dev)
        cache.advance(layer, [0 if f else c for f, c in zip(full.tolist(), ctx.n_valid)])

    # -- the captured decode step ---------------------------------------------------------------------
    supports_static = True

    def prepare_static(self, cache) -> None:
        """Decode-eviction state at the layer's capacity (fixed shapes), started for a one-token prompt."""
        if not self.decode_evict:
            return
        cap = cache.capacity(self.layer)
        if self.seen is None:
            self.start_empty(cache.lengths_tensor(self.layer), cache.num_kv_heads, cap)
        self.age = grow(self.age, cap)
        self.grow_state(cap)

    def grow_state(self, cap: int) -> None:
        """Per-slot state of the method at ``cap`` slots (H2O's scores)."""

    def static_count(self, n: int, b: int) -> tuple[int, int]:
        m = min(n, int(self.budget_tokens[b])) if self.decode_evict else n
        return m, m

    def static_decode(self, sctx, q, k, v, scale, softcap):
        """The eager decode eviction as a tensor function: every sequence picks a victim slot; the full ones
        write the new token there, the others append it."""
        if not self.decode_evict:
            return sctx.attend_dense(self.layer, q, k, v, scale, None, softcap)
        cache, layer = sctx.cache, self.layer
        B, H = k.shape[0], k.shape[1]
        cap = cache.capacity(layer)
        L = sctx.lengths[layer] + 0                                                  # [B], a copy
        full = L >= self.budget_tokens
        j = torch.arange(cap, device=q.device)[None, None]
        protected = (self.age >= (self.seen - self.recent)[:, None, None]) | (j >= L[:, None, None])
        victim = self.priority(cap).masked_fill(protected, float("inf")).argmin(-1)    # [B, Hkv]
        slot = torch.where(full[:, None], victim, L[:, None].expand(B, H))
        idx = slot[:, :, None, None].expand(B, H, 1, cache.head_dim)
        cache.k[layer].scatter_(2, idx, k.to(cache.dtype))
        cache.v[layer].scatter_(2, idx, v.to(cache.dtype))
        self.age.scatter_(2, slot[:, :, None], self.seen[:, None, None].expand(B, H, 1))
        self.on_slot_written(slot, cap)
        self.seen += 1
        kv_len = torch.where(full, L, L + 1)
        sctx.lengths[layer] = kv_len
        keys, values = cache.k[layer], cache.v[layer]
        out = sctx.attention(q, keys, values, kv_len, scale, None, softcap)
        self.observe(q, keys, kv_len, scale)
        return out
