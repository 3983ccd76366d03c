"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): token omission via attention.

Score of a cached token = the softmax attention it receives from the current query, averaged over all
query heads of the layer (one score per token, so every KV head keeps the same tokens).
- After prefill: the last prompt query scores the prompt; the ``budget`` best are kept (the last prompt
  token always, as kvpress's TOVAPress does). ``granularity="sentence"``: whole sentences by the max
  (or mean) of their tokens' scores, topped up with single tokens to the budget.
- During decode (``decode_evict``, TOVA's rule): the new token is appended and attended to with the
  others, then, while the layer holds more than its budget, the token with the lowest score from that
  same query is dropped (its slot is refilled with the newest token), so the cache stays at the budget.
  The step's attention is exact over budget + 1 tokens; nothing is evicted before it is scored.
"""
from __future__ import annotations

import torch

from ...kernels import decode_attention_scores, token_scores
from .base import register
from .evicting import EvictingPolicy
from .scoring import window_queries


@register
class TOVA(EvictingPolicy):
    name = "tova"
    spare_slots = 1          # the newest token is attended to before anything is dropped

    def prefill_scores(self, ctx, q, keys, n, budget, scale):
        dev = q.device
        kv_len = torch.tensor(n, device=dev)
        # the last query's softmax attention, summed over the query heads (the same order as the mean)
        s = token_scores(window_queries(q, n, 1), keys, kv_len - 1, kv_len, scale, softmax=True, heads="sum")
        s = s.masked_fill(s == float("-inf"), 0.0)                                  # [B, S]
        j = torch.arange(keys.shape[2], device=dev)[None]
        s = s.masked_fill(j == (kv_len - 1)[:, None], float("inf"))                 # the last token stays
        return s[:, None].expand(-1, keys.shape[1], -1).clone()

    def decode(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        if not self.decode_evict:
            return super(EvictingPolicy, self).decode(ctx, q, k, v, scale, softcap)
        cache, layer = ctx.cache, self.layer
        dev = q.device
        if self.budget_tokens is None:                                               # a one-token prompt
            self.budget_tokens = torch.full((cache.batch,), self.params.tokens(1), device=dev)
        cache.write(layer, k, v)
        cache.advance(layer, ctx.n_valid)
        kv_len = cache.lengths_tensor(layer)
        keys, values = cache.view(layer, int(max(cache.lengths(layer))))
        out, p = decode_attention_scores(q, keys, values, kv_len, scale, softcap)   # p [B, S]: summed over heads
        over = kv_len > self.budget_tokens                                           # [B]
        ctx.count(layer, cache.lengths(layer))
        if not bool(over.any()):
            return out
        # drop the lowest-scoring token: the newest token moves into its slot (unless it is the lowest)
        j = torch.arange(p.shape[1], device=dev)[None]
        victim = p.masked_fill(j >= kv_len[:, None], float("inf")).argmin(-1)        # [B]
        newest = kv_len - 1
        H = keys.shape[1]
        rows = torch.arange(cache.batch, device=dev)
        k_new = cache.k[layer][rows, :, newest][:, :, None]                           # [B, Hkv, 1, D]
        v_new = cache.v[layer][rows, :, newest][:, :, None]
        slot = torch.where(over, victim, newest)[:, None].expand(-1, H)
        cache.write_slots(layer, slot, k_new, v_new)
        cache.advance(layer, [-1 if o else 0 for o in over.tolist()])
        return out

    # -- the captured decode step ---------------------------------------------------------------------
    def prepare_static(self, cache) -> None:
        if self.decode_evict and self.budget_tokens is None:
            self.budget_tokens = torch.full((cache.batch,), self.params.tokens(1), device=cache.device)

    def static_count(self, n: int, b: int) -> tuple[int, int]:
        m = min(n, int(self.budget_tokens[b]) + 1) if self.decode_evict else n
        return m, m

    def static_decode(self, sctx, q, k, v, scale, softcap):
        """Append, attend over budget + 1 keys, then the lowest-scoring slot takes the newest token."""
        if not self.decode_evict:
            return sctx.attend_dense(self.layer, q, k, v, scale, None, softcap)
        cache, layer = sctx.cache, self.layer
        kv_len = sctx.write(layer, k, v)
        keys, values = cache.k[layer], cache.v[layer]
        out, p = decode_attention_scores(q, keys, values, kv_len, scale, softcap)       # p [B, C]
        over = kv_len > self.budget_tokens
        j = torch.arange(p.shape[1], device=q.device)[None]
        victim = p.masked_fill(j >= kv_len[:, None], float("inf")).argmin(-1)          # [B]
        newest = kv_len - 1
        slot = torch.where(over, victim, newest)
        B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
        src = newest[:, None, None, None].expand(B, H, 1, D)
        dst = slot[:, None, None, None].expand(B, H, 1, D)
        cache.k[layer].scatter_(2, dst, torch.gather(keys, 2, src))
        cache.v[layer].scatter_(2, dst, torch.gather(values, 2, src))
        sctx.lengths[layer] = torch.where(over, newest, kv_len)
        return out
