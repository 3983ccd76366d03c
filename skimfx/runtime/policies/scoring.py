"""Helpers the KV policies share: turning per-slot scores into kept slots, GQA grouping, masks."""
from __future__ import annotations

import torch

from ..selection import choose_sentences


def amount(x: int | float, n: int) -> int:
    """A token count (int) or a fraction (float) of ``n`` tokens, at least 1 for a fraction."""
    return max(1, int(round(x * n))) if isinstance(x, float) else int(x)


def group_heads(x: torch.Tensor, hkv: int, how: str) -> torch.Tensor:
    """[B, Hq, S] -> [B, Hkv, S]: the mean or sum over each GQA group."""
    B, Hq, S = x.shape
    x = x.view(B, hkv, Hq // hkv, S)
    return x.mean(2) if how == "mean" else x.sum(2)


def window_queries(q: torch.Tensor, n: list[int], w: int) -> torch.Tensor:
    """The last ``w`` real queries of each sequence: q [B, Hq, T, D] -> [B, Hq, w, D]."""
    dev = q.device
    idx = torch.tensor([m - w for m in n], device=dev)[:, None] + torch.arange(w, device=dev)[None]
    return torch.gather(q, 2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))


def keep_index(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per row the ``counts[b]`` highest-scoring slots, in slot order: ``scores [B, H, S]`` ->
    index [B, H, max(counts)]; rows of shorter sequences are padded with their first kept slot."""
    B, H, S = scores.shape
    K = max(counts)
    top = scores.topk(K, dim=-1).indices                                           # best first
    rank = torch.arange(K, device=scores.device)
    live = rank[None, None] < torch.tensor(counts, device=scores.device)[:, None, None]
    top = torch.where(live, top, S).sort(dim=-1).values                              # padding sorts last
    return torch.where(top == S, top[..., :1], top)


def sentence_keep_index(scores: torch.Tensor, sentence_ids: torch.Tensor, counts: list[int], reduce: str,
                        n: list[int]) -> torch.Tensor:
    """``keep_index`` at sentence granularity: per (sequence, KV head) row, the +inf slots (always kept)
    and whole sentences chosen by ``choose_sentences`` within ``counts[b]``, then the best remaining
    single tokens up to exactly ``counts[b]``. scores [B, H, S] (-inf = padding), sentence_ids [B, S]."""
    B, H, S = scores.shape
    boosted = scores.clone()
    for b in range(B):
        m = n[b]
        for h in range(H):
            row = scores[b, h, :m]
            forced = row == float("inf")
            room = counts[b] - int(forced.sum())
            if room <= 0:
                continue
            mask = choose_sentences(row, sentence_ids[b, :m], forced, room, reduce)
            boosted[b, h, :m] = row.masked_fill(mask, float("inf"))
    return keep_index(boosted, counts)


def mask_to_index(mask: torch.Tensor) -> torch.Tensor:
    """The set slots of each row in slot order: mask [B, H, S] bool -> [B, H, K] long, K = the largest
    row count, shorter rows padded with -1 (padding for ``sparse_attention``)."""
    B, H, S = mask.shape
    K = int(mask.sum(-1).max()) if mask.numel() else 0
    pos = torch.where(mask, mask.long().cumsum(-1) - 1, K)
    out = torch.full((B, H, K + 1), -1, dtype=torch.long, device=mask.device)
    out.scatter_(2, pos, torch.arange(S, device=mask.device).expand(B, H, S))
    return out[..., :K]


def grow(t: torch.Tensor, cap: int) -> torch.Tensor:
    """Pad a per-slot state tensor [..., S] with zeros up to ``cap`` slots."""
    if t.shape[-1] < cap:
        t = torch.cat([t, t.new_zeros(*t.shape[:-1], cap - t.shape[-1])], dim=-1)
    return t
