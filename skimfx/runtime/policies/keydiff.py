"""KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments").

Distinctive keys matter: per (sequence, KV head) the anchor is the mean of the prompt's L2-normalised
cached (post-RoPE) keys, ``a = mean_j k_j / ||k_j||``, and each key scores ``-cos(k_j, a)``; the
``budget`` keys least similar to the anchor are kept. The paper applies the rule block by block while
a long prompt streams into a fixed-size cache; here, as in kvpress's KeyDiffPress, it runs once over
the whole prompt after prefill, and decode appends to the compacted cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register
from .evicting import EvictingPolicy


@register
class KeyDiff(EvictingPolicy):
    name = "keydiff"

    def prefill_scores(self, ctx, q, keys, n, budget, scale):
        k = keys.float()                                                            # [B, Hkv, S, D]
        valid = torch.arange(k.shape[2], device=k.device)[None] < torch.tensor(n, device=k.device)[:, None]
        unit = F.normalize(k, dim=-1) * valid[:, None, :, None]                     # padding left out
        anchor = unit.sum(2, keepdim=True) / torch.tensor(n, device=k.device)[:, None, None, None]
        return -F.cosine_similarity(k, anchor, dim=-1)                              # [B, Hkv, S]
