"""What the policies whose KV heads keep different numbers of tokens share (AdaKV's adaptive head
budgets, DuoAttention's retrieval and streaming heads): the compaction into head groups and the attention
over them.

How a layer holds heads of different lengths. Options weighed:
- one tensor per layer at the longest head's length, a per-(sequence, KV head) length and a per-head
  length mask in the attention kernels: the least code, but the memory saved stops at the longest head,
  and under DuoAttention the retrieval heads keep the whole prompt, so nothing would be saved at all
  (kvpress masks the same way and frees no memory);
- a flattened ragged layout (all heads' tokens in one buffer with per-head offsets, a varlen kernel):
  the tightest memory, but every kernel, write and view of the cache would change;
- head groups (chosen): the layer is stored as groups of KV heads, each group its own
  ``[B, heads, capacity, D]`` tensors sized to what its heads hold (``KVCache.split_heads``); heads that
  keep the same count for every sequence share a group. This is DuoAttention's own layout (full heads and
  streaming heads as two tensors) and, for AdaKV, one tensor per head. The attention kernels are unchanged:
  each group is one call of ``kernels.attention`` with its GQA query heads, so the bytes held are exactly
  the kept tokens (plus the decode headroom), and the uniform layout of every other layer and policy is
  untouched. The price is one attention call per group instead of one per layer (a handful per layer:
  a model has 2-8 KV heads), and a group is padded to its longest sequence within a batch.

A subclass chooses per-head counts and scores; ``keep_per_head`` compacts into groups and the
decode / verify / extend / probe paths below attend per group. The captured decode step
(``runtime/static.py``) is not offered for split layers (its state is one fixed-shape tensor per layer).
"""
from __future__ import annotations

import torch

from ...kernels import attention
from .evicting import EvictingPolicy


def top_index(scores: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """Per (sequence, KV head) row the ``counts[b][h]`` best slots of ``scores [B, H, S]``, in slot order:
    [B, H, max count]; a row's entries past its count are padding (its first kept slot, or 0)."""
    B, H, S = scores.shape
    K = max(max(row) for row in counts)
    if K == 0:
        return torch.zeros(B, H, 0, dtype=torch.long, device=scores.device)
    top = scores.topk(K, dim=-1).indices
    c = torch.tensor(counts, device=scores.device)[:, :, None]
    top = torch.where(torch.arange(K, device=scores.device)[None, None] < c, top, S).sort(dim=-1).values
    return torch.where(top == S, torch.where(c > 0, top[..., :1], 0), top)


class HeadwisePolicy(EvictingPolicy):
    """An evicting policy whose KV heads keep different numbers of prompt tokens (decode appends)."""

    supports_static = False

    def keep_per_head(self, ctx, scores: torch.Tensor, n: list[int], counts: list[list[int]],
                      groups: list[tuple[int, ...]] | None = None, headroom: int | list[int] | None = None) -> None:
        """Keep ``counts[b][h]`` (<= n[b]) best slots of each (sequence, KV head) row of ``scores [B, Hkv, S]``
        (+inf = always kept) and store the layer as head groups (``KVCache.split_heads``: ``groups`` and each
        group's room for new tokens, default the heads with equal counts and the layer's headroom)."""
        cache, layer = ctx.cache, self.layer
        S = scores.shape[-1]
        j = torch.arange(S, device=scores.device)
        scores = scores.masked_fill(j[None, None] >= torch.tensor(n, device=scores.device)[:, None, None],
                                    float("-inf"))
        index = top_index(scores, counts)
        cache.split_heads(layer, index, counts, headroom, groups)
        ctx.kv_kept[layer] = [[row[:c] for row, c in zip(heads, cs)] for heads, cs in zip(index.tolist(), counts)]

    # -- attention over the head groups -----------------------------------------------------------
    def attend_groups(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        """Write the T new tokens' k/v into every group and attend causally, each group's query heads over
        its own keys (q [B, Hq, T, D] -> [B, Hq, T, D])."""
        cache, layer = ctx.cache, self.layer
        T, G = q.shape[2], q.shape[1] // cache.num_kv_heads
        starts = [list(g.lengths) for g in cache.groups[layer]]
        cache.write(layer, k, v)
        out = torch.empty_like(q)
        for g, start in zip(cache.groups[layer], starts):
            qh = torch.tensor([h * G + i for h in g.heads for i in range(G)], device=q.device)
            s = torch.tensor(start, device=q.device)
            top = max(start) + T
            out[:, qh] = attention(q.index_select(1, qh), g.k[:, :, :top], g.v[:, :, :top], s, s + T, scale, None,
                                   softcap)
        cache.advance(layer, ctx.n_valid)
        return out

    def _count_reads(self, ctx) -> None:
        # keys read per sequence: the mean over its KV heads (each query head reads its own head's keys)
        per_head = ctx.cache.head_lengths(self.layer)
        ctx.count(self.layer, [sum(row) / len(row) for row in per_head])

    def attend(self, ctx, layer, q, k, v, scale, window, softcap):
        T = q.shape[2]
        if not ctx.cache.is_split(self.layer) or T == 1 or ctx.cache.speculating:
            return super().attend(ctx, layer, q, k, v, scale, window, softcap)    # prefill, decode, verify
        self.check_extend(ctx, T)
        return self.attend_groups(ctx, q, k, v, scale, softcap)      # an extend after the compressed prompt

    def decode(self, ctx, q, k, v, scale, softcap):
        if not ctx.cache.is_split(self.layer):
            return super().decode(ctx, q, k, v, scale, softcap)
        out = self.attend_groups(ctx, q, k, v, scale, softcap)
        self._count_reads(ctx)
        return out

    def verify(self, ctx, q, k, v, scale, softcap):
        # decode appends and reads every kept token, so draft t reads its head's keys up to itself: causal
        # (a policy that evicts during decode never gets here: its drafts are verified step by step)
        if not ctx.cache.is_split(self.layer):
            return super().verify(ctx, q, k, v, scale, softcap)
        return self.attend_groups(ctx, q, k, v, scale, softcap)

    def probe_attend(self, ctx, q, k, v, scale, window, softcap):
        if not ctx.cache.is_split(self.layer):
            return super().probe_attend(ctx, q, k, v, scale, window, softcap)
        return self.attend_groups(ctx, q, k, v, scale, softcap)
