"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference"): adaptive per-head budgets over any scorer.

The layer's total budget is fixed (``budget`` tokens per KV head on average, so ``budget * Hkv`` pairs per
sequence); the heads share it by their scores instead of each keeping ``budget``. Rule (per sequence, with
the scorer's per-head scores ``s [Hkv, n]``, as kvpress's AdaKVPress): the safeguard first keeps each
head's ``floor(alpha * budget)`` best pairs (their scores raised to the largest finite value), then the
``budget * Hkv`` highest scores over all heads of the layer are kept. So heads keep different counts (at
least the safeguard each), and the layer physically holds exactly ``budget * Hkv`` pairs per sequence:
it is stored as head groups (``headwise.py``), not masked. ``share="model"`` pools the budgets of every layer
that AdaKV covers: one threshold over all their heads (KVzip's own allocation, kvpress's ``KVzipPress``
default), decided once the last of those layers has its scores; the layers below keep the full prompt
until then (prefill attention is causal over the full prompt anyway, so nothing they compute changes).

The scorer is another evicting policy (SnapKV, TOVA, Knorm, KeyDiff, ExpectedAttention, StreamingLLM,
KVzip, ...) made from ``params.scorer``: it computes its scores as it would alone (KVzip with its probe
forwards) and hands them to ``keep_best``, which here chooses the head budgets instead of a uniform top-k.
"""
from __future__ import annotations

import torch

from .base import POLICIES, register
from .evicting import EvictingPolicy
from .headwise import HeadwisePolicy


def adaptive_masks(scores: list[torch.Tensor], n: list[list[int]], budget: list[list[int]],
                   alpha: float) -> list[torch.Tensor]:
    """AdaKV's kept pairs over the heads of one or more layers that share one budget: ``scores[l] [B, Hkv, S_l]``
    (+inf = always kept, slots past ``n[l][b]`` ignored) -> bool masks of the same shapes. Per sequence b: each
    head's ``int(alpha * k_l)`` best are safeguarded, then the ``sum_l k_l * Hkv`` best over all the heads of
    all the layers are kept, k_l = min(budget[l][b], n[l][b])."""
    out = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    big = torch.finfo(torch.float32).max
    for b in range(scores[0].shape[0]):
        flat, total = [], 0
        for s_l, n_l, want_l in zip(scores, n, budget):
            m, H = n_l[b], s_l.shape[1]
            k = min(want_l[b], m)
            s = s_l[b, :, :m].float().clone()
            safe = int(k * alpha)
            if safe:
                top = s.topk(safe, dim=-1).indices
                s.scatter_(-1, top, torch.maximum(s.gather(-1, top), torch.full_like(top, big, dtype=s.dtype)))
            flat.append(s.reshape(-1))
            total += k * H
        keep = torch.zeros(sum(f.numel() for f in flat), dtype=torch.bool, device=scores[0].device)
        keep[torch.cat(flat).topk(total).indices] = True
        for mask, part, n_l in zip(out, keep.split([f.numel() for f in flat]), n):
            m = n_l[b]
            mask[b, :, :m] = part.view(-1, m)
    return out


_NOTHING = object()      # a pooled layer's report: it evicts nothing this time


@register
class AdaKV(HeadwisePolicy):
    name = "adakv"

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        cls = POLICIES.get(params.scorer.method)
        if cls is None or not issubclass(cls, EvictingPolicy) or issubclass(cls, HeadwisePolicy):
            raise ValueError(f"adakv needs an evicting scorer (snapkv, tova, knorm, keydiff, expected_attention, "
                             f"kvzip, ...), got {params.scorer.method!r}")
        self.scorer = cls(params.scorer, layer)
        if self.scorer.decode_evict:
            raise ValueError(f"adakv over {self.scorer.name}: the scorer must not evict during decode (the head "
                             "budgets are chosen once, after the prompt)")
        # the scorer's scores -> kept slots goes through the head budgets instead of a uniform top-k
        self.scorer.keep_best = self.keep_adaptive

    def bind(self, policies) -> None:
        self.scorer.bind(policies)
        # share="model": the layers that pool their budgets (each reports its scores; the last one decides)
        self.peers = [p for _, p in sorted(policies.items())
                      if isinstance(p, AdaKV) and p.params.share == "model"] if self.params.share == "model" else [self]
        self.reported = None

    def keep_adaptive(self, ctx, scores: torch.Tensor, n: list[int], budget: list[int]) -> None:
        self.reported = (scores, list(n), list(budget))
        self._decide(ctx)

    def _decide(self, ctx) -> None:
        """Once every pooled layer has reported (its scores, or that it keeps its prompt), choose the head
        budgets over all of them and compact each; until then a layer keeps its full prompt."""
        if any(p.reported is None for p in self.peers):
            return
        peers = [p for p in self.peers if p.reported is not _NOTHING]
        reports = [p.reported for p in peers]
        for p in self.peers:
            p.reported = None
        if not peers:
            return
        masks = adaptive_masks(*(list(x) for x in zip(*reports)), self.params.alpha)
        for peer, mask, (_, n_l, _) in zip(peers, masks, reports):
            peer.keep_per_head(ctx, mask.float(), n_l, mask.sum(-1).tolist())

    # -- the scorer computes the scores ------------------------------------------------------------
    def after_prefill(self, ctx, q, scale: float) -> None:
        self.reported = None
        self.scorer.after_prefill(ctx, q, scale)
        if self.reported is None and getattr(self.scorer, "pending", None) is None:
            self.reported = _NOTHING        # nothing to evict here (nor probes to wait for): out of the pool
            self._decide(ctx)

    def probe_inputs(self, ctx, ids, n):
        return self.scorer.probe_inputs(ctx, ids, n)

    def probe_attend(self, ctx, q, k, v, scale, window, softcap):
        if ctx.cache.is_split(self.layer):
            return super().probe_attend(ctx, q, k, v, scale, window, softcap)
        return self.scorer.probe_attend(ctx, q, k, v, scale, window, softcap)

    def after_probes(self, ctx) -> None:
        self.scorer.after_probes(ctx)
