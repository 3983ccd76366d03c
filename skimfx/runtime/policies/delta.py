"""DELTA (dynamic layer-aware token attention).

The full cache stays. A "select" layer attends to everything and, from the same pass over its keys
(``decode_attention_scores``), picks the ``budget`` slots with the highest attention from the new query
summed over all query heads, plus the ``recent`` newest (``index [B, K]``, its state for this step).
The "reuse" layers above it, up to the next select layer, read only that set. Prefill is dense.
"""
from __future__ import annotations

import torch

from ...kernels import decode_attention_scores, sparse_attention
from .base import register
from .sparse import SparseReadPolicy


def delta_index(recent: int, p: torch.Tensor, kv_len: torch.Tensor, size: int) -> torch.Tensor:
    """DELTA's token set: the ``size`` slots with the highest attention ``p [B, S]`` from the new query
    (summed over all heads), the ``recent`` newest always -> [B, size] in slot order. A sequence with fewer
    than ``size`` cached slots pads with -1 (first in the order; ``sparse_attention`` skips them)."""
    j = torch.arange(p.shape[1], device=p.device)[None]
    p = p.masked_fill(j >= (kv_len - recent)[:, None], float("inf"))
    p = p.masked_fill(j >= kv_len[:, None], float("-inf"))
    top = p.topk(size, dim=-1)
    return torch.where(top.values > float("-inf"), top.indices, -1).sort(dim=-1).values   # the gathers read forward


@register
class Delta(SparseReadPolicy):
    name = "delta"

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        self.index: torch.Tensor | None = None           # select layer: this step's token set [B, K]
        self.source: "Delta | None" = None               # reuse layer: the select layer it reads

    def bind(self, policies):
        src = self.params.reads_selection_of(self.layer, {l: p.params for l, p in policies.items()})
        self.source = policies[src] if src is not None else None

    def state_tensors(self):
        return []                                         # the set is rebuilt every step: nothing to roll back

    def read_index(self, ctx, q, keys, values, kv_len, scale, softcap):
        lengths = ctx.cache.lengths(self.layer)
        budget = self.params.tokens(max(lengths))
        if self.params.role == "select":
            self.index = None
            if max(lengths) <= budget + self.params.recent:
                return None, None
            out, p = decode_attention_scores(q, keys, values, kv_len, scale, softcap)
            self.index = delta_index(self.params.recent, p, kv_len, min(p.shape[1], budget + self.params.recent))
            return None, out
        return (self.source.index if self.source is not None else None), None

    # -- the captured decode step -------------------------------------------------------------------
    supports_static = True

    def prepare_static(self, cache) -> None:
        n = max(cache.lengths(self.layer))
        # the set size is a constant of the compiled step: the budget at the length the step starts from
        self.static_size = min(cache.capacity(self.layer), self.params.tokens(n) + self.params.recent)

    def static_count(self, n: int, b: int) -> tuple[int, int]:
        return (n if self.params.role == "select" else min(n, self.static_size)), n

    def static_decode(self, sctx, q, k, v, scale, softcap):
        """A select layer attends to everything and keeps the ``static_size`` best slots (slots past a
        sequence's length score -inf and become padding, -1); a reuse layer reads its select layer's set."""
        kv_len = sctx.write(self.layer, k, v)
        keys, values = sctx.cache.k[self.layer], sctx.cache.v[self.layer]
        if self.params.role == "select":
            out, p = decode_attention_scores(q, keys, values, kv_len, scale, softcap)   # p [B, C]
            self.index = delta_index(self.params.recent, p, kv_len, self.static_size)
            return out
        return sparse_attention(q[:, :, 0], keys, values, self.source.index, kv_len, scale, softcap)[:, :, None]
