"""Knorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression").

A key's L2 norm predicts the attention it receives: keys with a low norm are attended to most. After
prefill each KV head keeps the ``budget`` prompt tokens whose cached (post-RoPE) keys have the lowest
L2 norm, ``score = -||k_j||_2`` per (sequence, KV head, slot); no attention is computed. Decode
appends to the compacted cache (as kvpress's KnormPress).
"""
from __future__ import annotations

from .base import register
from .evicting import EvictingPolicy


@register
class Knorm(EvictingPolicy):
    name = "knorm"

    def prefill_scores(self, ctx, q, keys, n, budget, scale):
        return -keys.float().norm(dim=-1)                                           # [B, Hkv, S]
