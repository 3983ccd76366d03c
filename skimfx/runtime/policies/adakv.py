"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference"): adaptive per-head budgets over any scorer.

The layer's total budget is fixed (``budget`` tokens per KV head on average, so ``budget * Hkv`` pairs per
sequence); the heads share it by their scores instead of each keeping ``budget``. Rule (per sequence, with
the scorer's per-head scores ``s [Hkv, n]``, as kvpress's AdaKVPress): the safeguard first keeps each
head's ``floor(alpha * budget)`` best pairs (their scores raised to the largest finite value), then the
``budget * Hkv`` highest scores over all heads of the layer are kept. So heads keep different counts (at
least the safeguard each), and the layer physically holds exactly ``budget * Hkv`` pairs per sequence:
it is stored as head groups (``headwise.py``), not masked.

The scorer is another evicting policy (SnapKV, TOVA, Knorm, KeyDiff, ExpectedAttention, StreamingLLM,
KVzip, ...) made from ``params.scorer``: it computes its scores as it would alone (KVzip with its probe
forwards) and hands them to ``keep_best``, which here chooses the head budgets instead of a uniform top-k.
"""
from __future__ import annotations

import torch

from .base import POLICIES, register
from .evicting import EvictingPolicy
from .headwise import HeadwisePolicy


def adaptive_head_masks(scores: torch.Tensor, n: list[int], budget: list[int], alpha: float) -> torch.Tensor:
    """AdaKV's kept pairs: ``scores [B, Hkv, S]`` (+inf = always kept, slots past ``n[b]`` ignored) ->
    bool [B, Hkv, S]. Per sequence b: each head's ``int(alpha * k)`` best are safeguarded, then the
    ``k * Hkv`` best of the layer are kept, k = min(budget[b], n[b])."""
    B, H, S = scores.shape
    out = torch.zeros(B, H, S, dtype=torch.bool, device=scores.device)
    big = torch.finfo(torch.float32).max
    for b, (m, want) in enumerate(zip(n, budget)):
        k = min(want, m)
        s = scores[b, :, :m].float().clone()
        safe = int(k * alpha)
        if safe:
            top = s.topk(safe, dim=-1).indices
            s.scatter_(-1, top, torch.maximum(s.gather(-1, top), torch.full_like(top, big, dtype=s.dtype)))
        keep = s.reshape(-1).topk(k * H).indices
        out[b, keep // m, keep % m] = True
    return out


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

    def keep_adaptive(self, ctx, scores: torch.Tensor, n: list[int], budget: list[int]) -> None:
        mask = adaptive_head_masks(scores, n, budget, self.params.alpha)
        counts = mask.sum(-1).tolist()
        self.keep_per_head(ctx, mask.float(), n, counts)

    # -- the scorer computes the scores ------------------------------------------------------------
    def after_prefill(self, ctx, q, scale: float) -> None:
        self.scorer.after_prefill(ctx, q, scale)

    def probe_inputs(self, ctx, ids, n):
        return self.scorer.probe_inputs(ctx, ids, n)

    def probe_attend(self, ctx, q, k, v, scale, window, softcap):
        if ctx.cache.is_split(self.layer):
            return super().probe_attend(ctx, q, k, v, scale, window, softcap)
        return self.scorer.probe_attend(ctx, q, k, v, scale, window, softcap)

    def after_probes(self, ctx) -> None:
        self.scorer.after_probes(ctx)
