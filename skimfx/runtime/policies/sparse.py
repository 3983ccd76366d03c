"""What the sparse-read policies share: the full cache stays; each decode step writes the new token
and reads a selected subset of the layer's slots (``read_index``), or everything when the policy
selects nothing this step.

A verification of several draft tokens (``verify``) writes them all, then reads for each query what a
decode step would have read with the layer holding the tokens up to that query: the selection is
defined per query, so one shared selection (or a dense read) would change the output."""
from __future__ import annotations

import torch

from ...kernels import attention, sparse_attention
from .base import KVPolicy


class SparseReadPolicy(KVPolicy):
    def read_index(self, ctx, q, keys, values, kv_len: torch.Tensor, scale: float, softcap,
                   lengths: list[int] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(index [B, Hkv, K] or [B, K] of the slots to read, or None for all; an output this step already
        computed, or None) for the query ``q [B, Hq, 1, D]`` of the token that made the layer hold
        ``lengths[b]`` slots (default: the cache's lengths). Called after the new tokens were written."""
        raise NotImplementedError

    def decode(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        self.write(ctx, k, v)
        return self.read(ctx, q, list(ctx.cache.lengths(self.layer)), scale, softcap)

    def verify(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        old = list(ctx.cache.lengths(self.layer))
        self.write(ctx, k, v)
        # query t of sequence b reads the layer as it stood after token t (padding past n_valid[b] reads as
        # the last real token does)
        lengths = [[o + min(t + 1, n) for o, n in zip(old, ctx.n_valid)] for t in range(q.shape[2])]
        return self.read_queries(ctx, q, lengths, scale, softcap)

    def read_queries(self, ctx, q, lengths: list[list[int]], scale: float, softcap) -> torch.Tensor:
        """The reads of T queries per sequence (``q [B, Hq, T, D]``), query t over the first ``lengths[t][b]``
        slots with its own selection: one ``read`` per query (a policy may read them all in one call)."""
        return torch.cat([self.read(ctx, q[:, :, t:t + 1], n, scale, softcap) for t, n in enumerate(lengths)], dim=2)

    def write(self, ctx, k, v) -> None:
        """Write the new tokens' k/v after each sequence's cached ones and update the state."""
        cache, layer = ctx.cache, self.layer
        old = list(cache.lengths(layer))
        cache.write(layer, k, v)
        cache.advance(layer, ctx.n_valid)
        self.after_write(ctx, old)

    def read(self, ctx, q, lengths: list[int], scale: float, softcap) -> torch.Tensor:
        """The attention of one query per sequence (``q [B, Hq, 1, D]``) over the first ``lengths[b]`` slots,
        reading what the policy selects for it."""
        cache, layer = ctx.cache, self.layer
        current = lengths == cache.lengths(layer)
        kv_len = cache.lengths_tensor(layer) if current else torch.tensor(lengths, device=q.device)
        keys, values = cache.view(layer, max(lengths))
        index, out = self.read_index(ctx, q, keys, values, kv_len, scale, softcap, lengths)
        if out is not None:
            ctx.count(layer, lengths)
            return out
        if index is None:
            ctx.count(layer, lengths)
            return attention(q, keys, values, kv_len - 1, kv_len, scale, None, softcap)
        ctx.count(layer, [min(m, index.shape[-1]) for m in lengths], lengths)
        return sparse_attention(q[:, :, 0], keys, values, index, kv_len, scale, softcap)[:, :, None]
