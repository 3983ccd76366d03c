"""``Ctx``: what the lowered graph sees during one call (the ``ctx`` input of every stage).

It holds the per-call inputs (the cache, how many of the T new tokens of each sequence are real,
whether this is the first prefill of a prompt) and a stats sink. It keeps no policy state: a layer's
KV policy object (``runtime/policies``) lives with the cache and owns its own state. The lowered
attention op calls ``ctx.attend``, which hands the layer to its policy, or runs the dense path.
"""
from __future__ import annotations

import torch

from ..kernels import attention, token_scores
from ..program import Program, gather_tokens
from .cache import KVCache
from .packing import PackedRows
from .selection import topk_sentences, topk_tokens


class Ctx:
    """Per-call state of the lowered graph: the cache, how many of the T new tokens of each
    sequence are real (the rest is right padding), whether selection stages run (``prune``: a
    prefill of a fresh prompt) and whether evicting policies compress the prompt after it is written
    (``compress``), plus what the call measured (``reads``, ``kv_kept``, ``selected``, ``moved``).

    ``packed``: the graph runs on the batch's real tokens packed into one row ``[1, N]`` (``PackedRows``);
    attention pads them to ``[B, H, T, D]`` for the cache and the policy and packs its output back."""

    def __init__(self, cache: KVCache, n_valid: list[int], program: Program | None = None, prune: bool = False,
                 compress: bool = False, packed: PackedRows | None = None):
        if packed is not None and (prune or compress or packed.counts != list(n_valid)):
            raise ValueError("a packed call neither prunes nor compresses, and its counts are n_valid")
        self.cache = cache
        self.n_valid = n_valid
        self.packed = packed
        self.program = program
        self.prune = prune
        self.compress = compress
        self.kept: list[int] | None = None               # kept count per sequence after the last selection
        self.prompt_lens = list(n_valid)                 # each prompt's length before any selection
        self.sentence_ids: torch.Tensor | None = None    # [B, T] sentence of each token (sentence granularity)
        self.probe: int | None = None                    # which probe forward this is (``runtime/probe.py``)
        self._bounds: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # the stats sink
        self.selected: dict[int, list[list[int]]] = {}   # selection layer -> kept token indices per sequence
        self.reads: dict[int, list[int]] = {}             # layer -> [keys read, keys cached], single-token steps
        self.kv_kept: dict[int, list[list[list[int]]]] = {}  # evicting layer -> [b][kv head] kept prompt slots
        self.moved = 0                                   # bytes copied host -> device (offloaded KV)

    # -- the two calls of the lowered graph (host bookkeeping: never traced by torch.compile) ------
    @torch.compiler.disable
    def select(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Score this prefill's tokens with the last queries of ``layer`` and pick the kept ones.

        q: [B, Hq, T, D]. The prompt started at slot 0 of every cache, so cache slot j of layer
        ``layer`` is token j of the current token axis. Returns index [B, K]; ``self.kept`` holds
        the kept count per sequence.
        """
        sel = self.program.selections[layer]
        lengths = self.cache.lengths(layer)
        dev = q.device
        w = max(1, min(sel.window, min(self.n_valid)))
        starts = torch.tensor([n - w for n in self.n_valid], device=dev)
        q_win = gather_tokens(q, 2, starts[:, None] + torch.arange(w, device=dev)[None])
        keys, _ = self.cache.view(layer, max(lengths))
        kv_len = torch.tensor(lengths, device=dev)
        scale = sel.scale if sel.scale is not None else self.program.attention[layer].scale
        scores = token_scores(q_win, keys, kv_len - w, kv_len, scale, softmax=sel.softmax, heads=sel.heads,
                              pool=sel.pool, pool_kernel=sel.pool_kernel)
        keep = [sel.tokens(n) for n in self.prompt_lens]
        if sel.granularity == "sentence":
            index, self.kept = topk_sentences(scores, self.sentence_ids, keep, self.n_valid, sel.keep_last,
                                              sel.sentence_reduce)
        else:
            index, self.kept = topk_tokens(scores, keep, self.n_valid, sel.keep_last)
        return index

    @torch.compiler.disable
    def attend(self, layer: int, q, k, v, *, scale: float, window: int | None, softcap: float | None):
        """The lowered attention op: the layer's KV policy runs it, or the dense path when it has none."""
        if self.packed is not None:
            p = self.packed
            return p.pack(self._attend(layer, p.pad(q), p.pad(k), p.pad(v), scale, window, softcap))
        return self._attend(layer, q, k, v, scale, window, softcap)

    def _attend(self, layer: int, q, k, v, scale: float, window: int | None, softcap: float | None):
        policy = self.cache.policies.get(layer)
        if policy is None:
            return self.attend_dense(layer, q, k, v, scale, window, softcap)
        if self.probe is not None:      # tokens the cache forgets after this forward: no policy state moves
            return policy.probe_attend(self, q, k, v, scale, window, softcap)
        return policy.attend(self, layer, q, k, v, scale, window, softcap)

    @torch.compiler.disable
    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Cache the k/v [B, Hkv, T, D] of tokens that exited below ``layer`` (no query reads them here):
        through the layer's KV policy (``KVPolicy.fill``), or appended when it has none."""
        if self.packed is not None:
            k, v = self.packed.pad(k), self.packed.pad(v)
        policy = self.cache.policies.get(layer)
        if policy is not None:
            policy.fill(self, k, v)
            return
        self.cache.write(layer, k, v)
        self.cache.advance(layer, self.n_valid)

    # -- what policies build on -------------------------------------------------------------------
    def attend_dense(self, layer: int, q, k, v, scale: float, window: int | None, softcap: float | None):
        """Write the T new tokens' k/v at each sequence's length and attend causally over the cache."""
        cache = self.cache
        T = q.shape[2]
        starts = tuple(cache.lengths(layer))
        bounds = self._bounds.get(starts)
        if bounds is None:  # layers with the same lengths (all of them, when dense) share these
            q_start = torch.tensor(starts, dtype=torch.long, device=q.device)
            bounds = self._bounds[starts] = (q_start, q_start + T)
        cache.write(layer, k, v)
        keys, values = cache.view(layer, max(starts) + T)
        if self.packed is not None and T > 1 and len(set(self.n_valid)) > 1:
            # ragged rows (a batch verifying drafts of different lengths): each row attends with its own
            # queries over its own keys, so a short or empty row costs what it feeds, not the longest row's
            # width (attention over a long cache is a large part of such a pass); padding slots stay zero
            out = q.new_zeros(q.shape)
            for b, n in enumerate(self.n_valid):
                if n:
                    start, end = bounds[0][b:b + 1], bounds[0][b:b + 1] + n
                    out[b:b + 1, :, :n] = attention(q[b:b + 1, :, :n], keys[b:b + 1, :, :starts[b] + n],
                                                    values[b:b + 1, :, :starts[b] + n], start, end, scale, window,
                                                    softcap)
        else:
            out = attention(q, keys, values, bounds[0], bounds[1], scale, window, softcap)
        cache.advance(layer, self.n_valid)
        if T == 1:
            self.count(layer, cache.lengths(layer))
        return out

    def count(self, layer: int, read: list[int], cached: list[int] | None = None) -> None:
        """Record a single-token step's keys read and keys cached, summed over the sequences."""
        r = self.reads.setdefault(layer, [0, 0])
        r[0] += sum(read)
        r[1] += sum(cached if cached is not None else read)


__all__ = ["Ctx", "gather_tokens"]
