"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

After prefill each KV head keeps the prompt tokens that the last ``window`` queries attend to most:
softmax attention summed over the window, mean over the GQA group, avg-pooled (kernel
``pool_kernel``) over the prefix, top (budget - window) of the prefix plus the window itself.
Decode appends to the compacted cache (no eviction during decode). PyramidKV is SnapKV with
per-layer budgets (chosen by the recipe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels import token_scores
from .base import register
from .evicting import EvictingPolicy
from .scoring import group_heads, window_queries


def snapkv_scores(window: int, pool_kernel: int, q, keys, n: list[int], scale: float) -> torch.Tensor:
    """[B, Hkv, S]: prefix scores; the observation window +inf (always kept), padding -inf."""
    dev = q.device
    w = max(1, min(window, min(n) - 1))
    kv_len = torch.tensor(n, device=dev)
    s = token_scores(window_queries(q, n, w), keys, kv_len - w, kv_len, scale, softmax=True, heads="none")
    s = group_heads(s.masked_fill(s == float("-inf"), 0.0), keys.shape[1], "mean")   # [B, Hkv, S]
    j = torch.arange(keys.shape[2], device=dev)[None, None]
    prefix = j < (kv_len - w)[:, None, None]
    s = s.masked_fill(~prefix, 0.0)
    if pool_kernel > 1:
        B, H, S = s.shape
        s = F.avg_pool1d(s.reshape(B * H, 1, S), pool_kernel, 1, pool_kernel // 2).view(B, H, S)
    s = s.masked_fill(~prefix, float("inf"))
    return s.masked_fill(j >= kv_len[:, None, None], float("-inf"))


@register
class SnapKV(EvictingPolicy):
    name = "snapkv"

    def prefill_scores(self, ctx, q, keys, n, budget, scale):
        return snapkv_scores(self.params.window, self.params.pool_kernel, q, keys, n, scale)
