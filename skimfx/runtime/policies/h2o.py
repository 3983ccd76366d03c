"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

Every key's attention received from every query so far is accumulated (softmax attention, summed over
the GQA group): ``score [B, Hkv, cap]``. After prefill each KV head keeps the heavy hitters plus the
``recent`` newest tokens; at every decode step the lowest-scoring non-recent token makes room for the
new one, and the step's attention is added to the scores.
"""
from __future__ import annotations

import torch

from ...kernels import token_scores
from .base import register
from .evicting import EvictingPolicy
from .scoring import grow, group_heads


def attention_received(q, keys, n: list[int], scale: float, chunk: int = 256) -> torch.Tensor:
    """H2O's accumulated attention: for every key, the softmax attention it receives from every
    (causal) prompt query, summed over queries and over each GQA group -> [B, Hkv, S]. Computed in
    query chunks (and per sequence when the batch is ragged) so no T x T matrix is held."""
    B, Hq, T, D = q.shape
    S = keys.shape[2]
    out = torch.zeros(B, keys.shape[1], S, dtype=torch.float32, device=q.device)
    rows = [slice(None)] if len(set(n)) == 1 else [slice(b, b + 1) for b in range(B)]
    for r in rows:
        m = n[0] if r == slice(None) else n[r.start]
        kv_len = torch.full((q[r].shape[0],), m, device=q.device)
        for c in range(0, m, chunk):
            qc = q[r][:, :, c:min(m, c + chunk)]
            s = token_scores(qc, keys[r], torch.full_like(kv_len, c), kv_len, scale, softmax=True, heads="none")
            out[r] += group_heads(s.masked_fill(s == float("-inf"), 0.0), keys.shape[1], "sum")
    return out


@register
class H2O(EvictingPolicy):
    name = "h2o"

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        self.score: torch.Tensor | None = None           # [B, Hkv, cap] attention each slot's token received

    def prepare(self, ctx, q, keys, n, scale):
        # decode-time eviction needs the scores even when nothing is evicted now
        self.score = attention_received(q, keys, n, scale)

    def prefill_scores(self, ctx, q, keys, n, budget, scale):
        j = torch.arange(keys.shape[2], device=q.device)[None, None]
        kv_len = torch.tensor(n, device=q.device)[:, None, None]
        return self.score.masked_fill(j >= kv_len - self.recent[:, None, None], float("inf"))

    def after_compact(self, index, cap):
        score = torch.zeros(*index.shape[:2], cap, dtype=torch.float32, device=index.device)
        score[:, :, :index.shape[-1]] = torch.gather(self.score, 2, index)
        self.score = score

    def start_empty(self, lengths, H, cap):
        super().start_empty(lengths, H, cap)
        self.score = torch.zeros(lengths.shape[0], H, cap, device=lengths.device)

    def grow_state(self, cap):
        self.score = grow(self.score, cap)

    def priority(self, cap):
        self.score = grow(self.score, cap)
        return self.score.clone()

    def on_slot_written(self, slot, cap):
        self.score = grow(self.score, cap)
        self.score.scatter_(2, slot[:, :, None], 0.0)

    def observe(self, q, keys, kv_len, scale):
        p = token_scores(q, keys, kv_len - 1, kv_len, scale, softmax=True, heads="none")
        p = group_heads(p.masked_fill(p == float("-inf"), 0.0), keys.shape[1], "sum")
        self.score[:, :, :p.shape[-1]] += p
