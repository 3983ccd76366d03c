"""What the sparse-read policies share: the full cache stays; each decode step writes the new token
and reads a selected subset of the layer's slots (``read_index``), or everything when the policy
selects nothing this step."""
from __future__ import annotations

import torch

from ...kernels import attention, sparse_attention
from .base import KVPolicy


class SparseReadPolicy(KVPolicy):
    def read_index(self, ctx, q, keys, values, kv_len: torch.Tensor, scale: float, softcap) \
            -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(index [B, Hkv, K] or [B, K] of the slots to read, or None for all; an output this step already
        computed, or None). Called after the new token was written."""
        raise NotImplementedError

    def decode(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        cache, layer = ctx.cache, self.layer
        old = list(cache.lengths(layer))
        cache.write(layer, k, v)
        cache.advance(layer, ctx.n_valid)
        self.after_write(ctx, old)
        lengths = cache.lengths(layer)
        kv_len = cache.lengths_tensor(layer)
        keys, values = cache.view(layer, max(lengths))
        index, out = self.read_index(ctx, q, keys, values, kv_len, scale, softcap)
        if out is not None:
            ctx.count(layer, lengths)
            return out
        if index is None:
            ctx.count(layer, lengths)
            return attention(q, keys, values, kv_len - 1, kv_len, scale, None, softcap)
        ctx.count(layer, [min(m, index.shape[-1]) for m in lengths], lengths)
        return sparse_attention(q[:, :, 0], keys, values, index, kv_len, scale, softcap)[:, :, None]
