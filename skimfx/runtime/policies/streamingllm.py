"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").

Keep the first ``sinks`` tokens and the most recent ones; during decode (``decode_evict``) the oldest
non-sink token makes room for each new one, so the cache stays at its budget.
"""
from __future__ import annotations

import torch

from .base import register
from .evicting import EvictingPolicy


@register
class StreamingLLM(EvictingPolicy):
    name = "streamingllm"

    def prefill_scores(self, ctx, q, keys, n, budget, scale):
        dev = q.device
        B, H, S = keys.shape[0], keys.shape[1], keys.shape[2]
        j = torch.arange(S, device=dev)[None, None]
        kv_len = torch.tensor(n, device=dev)[:, None, None]
        sinks = self.params.sinks
        recent = kv_len - torch.tensor([max(0, b - sinks) for b in budget], device=dev)[:, None, None]
        return torch.where((j < sinks) | (j >= recent), 1.0, 0.0).expand(B, H, S).clone()

    def priority(self, cap: int) -> torch.Tensor:
        return self.age.float().masked_fill(self.age < self.params.sinks, float("inf"))
