"""DELTA (dynamic layer-aware token attention).

The full cache stays. A "select" layer attends to everything and, from the same pass over its keys
(``decode_attention_scores``), picks the ``budget`` slots with the highest attention from the new query
summed over all query heads, plus the ``recent`` newest (``index [B, K]``, its state for this step).
The "reuse" layers above it, up to the next select layer, read only that set. Prefill is dense.

Under self-speculation a select layer also keeps the set of every token written since
``begin_speculation``, keyed by the layer's lengths after that token: a verification's reuse layers read
the set of each draft token's own query (made in the same pass, or in the draft steps when an exit draft
ran the select layer token by token), and a rollback makes the set of the last kept token current again.
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
        # select layer: the set of each token by the layer's lengths after it (only the newest outside a
        # speculation; every token since begin_speculation during one)
        self.sets: dict[tuple[int, ...], torch.Tensor | None] = {}
        self.speculating = False

    def bind(self, policies):
        src = self.params.reads_selection_of(self.layer, {l: p.params for l, p in policies.items()})
        self.source = policies[src] if src is not None else None

    def state_tensors(self):
        return []                 # the set is made for each step (and restored by ``truncate``), not cache memory

    def read_index(self, ctx, q, keys, values, kv_len, scale, softcap, lengths=None):
        lengths = ctx.cache.lengths(self.layer) if lengths is None else lengths
        budget = self.params.tokens(max(lengths))
        if self.params.role == "select":
            index = out = None
            if max(lengths) > budget + self.params.recent:
                out, p = decode_attention_scores(q, keys, values, kv_len, scale, softcap)
                index = delta_index(self.params.recent, p, kv_len, min(p.shape[1], budget + self.params.recent))
            self.record(lengths, index)
            return None, out
        if self.source is None:
            return None, None
        return self.source.set_for(lengths, newest=lengths == ctx.cache.lengths(self.layer)), None

    def record(self, lengths: list[int], index: torch.Tensor | None) -> None:
        """The select layer chose ``index`` for the token after which it holds ``lengths[b]`` slots."""
        self.index = index
        if not self.speculating:
            self.sets.clear()
        self.sets[tuple(lengths)] = index

    def set_for(self, lengths: list[int], newest: bool) -> torch.Tensor | None:
        """The set chosen for the token after which the layers hold ``lengths[b]`` slots. The newest token
        of a step reads the latest set (also when a layer-skipping draft left the select layer out)."""
        key = tuple(lengths)
        if key in self.sets:
            return self.sets[key]
        if newest:
            return self.index
        raise ValueError(f"delta (select layer {self.layer}): no token set for the token at lengths {list(lengths)}; "
                         "several tokens at once are verified only under KVCache.begin_speculation")

    # -- self-speculation ---------------------------------------------------------------------------
    def begin_speculation(self, cache) -> None:
        if self.params.role == "select":
            self.speculating = True
            self.sets = {tuple(cache.lengths(self.layer)): self.index}

    def end_speculation(self, cache) -> None:
        if self.params.role == "select":
            self.speculating = False
            self.sets = {tuple(cache.lengths(self.layer)): self.index}

    def truncate(self, cache, old: list[int], new: list[int]) -> None:
        """The set of the last token that stays becomes current again (a reuse layer keeps nothing)."""
        if self.params.role != "select" or old == new:
            return
        # each row's set from its own last kept token (in a batch whose rows keep different numbers of drafts,
        # the set recorded at the lengths ``new`` holds padding queries' choices for the shorter rows)
        self.index = self._rows_of([self._kept_key(b, n, new) for b, n in enumerate(new)])
        self.sets = {k: s for k, s in self.sets.items() if all(a <= b for a, b in zip(k, new))}

    def _kept_key(self, b: int, n: int, new: list[int]) -> tuple[int, ...]:
        # the first set recorded at row b's length n: its own last token's (in a ragged batch the queries
        # after it are padding, recorded at the same length with whatever the padding slot held)
        found = [k for k in self.sets if k[b] == n]
        if not found:
            raise ValueError(f"delta (select layer {self.layer}): the token set at lengths {new} was not kept; only "
                             "tokens written after KVCache.begin_speculation can be rolled back")
        return found[0]

    def _rows_of(self, keys: list[tuple[int, ...]]) -> torch.Tensor | None:
        """Row b of the set recorded under ``keys[b]``, stacked ([B, K], -1 padded in front, as ``delta_index``
        sorts its padding). A row whose token read everything (no set) makes the result None: that set is only
        read by a step whose select layer runs first and replaces it."""
        sets = [self.sets[k] for k in keys]
        if any(s is None for s in sets):
            return None
        K = max(s.shape[-1] for s in sets)
        rows = [torch.nn.functional.pad(s[b], (K - s.shape[-1], 0), value=-1) for b, s in enumerate(sets)]
        return torch.stack(rows)

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
