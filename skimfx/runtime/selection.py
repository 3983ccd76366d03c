"""Host-side selection of kept tokens from per-token scores (prefill pruning, sentence granularity).

These are small loops over the sequences of a batch, run once per prefill; the scores they read come
from the kernels (``kernels.token_scores``).
"""
from __future__ import annotations

import torch


def _keeps(keep: int | list[int], B: int) -> list[int]:
    keeps = [keep] * B if isinstance(keep, int) else list(keep)
    if len(keeps) != B or min(keeps) < 1:
        raise ValueError(f"keep must be >= 1 (one int, or one per sequence of the {B}), got {keep}")
    return keeps


def topk_tokens(scores: torch.Tensor, keep: int | list[int], lengths: list[int], keep_last: int = 0
                ) -> tuple[torch.Tensor, list[int]]:
    """Pick ``min(keep, len_b)`` tokens per sequence (``keep``: one count, or one per sequence): the last
    ``keep_last`` tokens always, the rest by highest score; indices sorted ascending.

    scores: [B, S] (positions >= len_b are ignored). Returns (index [B, K], kept per sequence) with
    K = max kept; a shorter row repeats its last index (the caller treats those slots as padding).
    """
    B, S = scores.shape
    kept = [min(k, n) for k, n in zip(_keeps(keep, B), lengths)]
    K = max(kept)
    index = torch.empty(B, K, dtype=torch.long, device=scores.device)
    for b, (n, kb) in enumerate(zip(lengths, kept)):
        last = min(keep_last, kb, n)
        s = scores[b, :n].clone()
        s[n - last:] = float("inf")
        top = torch.topk(s, kb).indices if kb < n else torch.arange(n, device=scores.device)
        top = torch.sort(top).values
        index[b, :kb] = top
        index[b, kb:] = top[-1]
    return index, kept


def choose_sentences(scores: torch.Tensor, sentence_ids: torch.Tensor, forced: torch.Tensor, room: int,
                     reduce: str = "max") -> torch.Tensor:
    """One row: whole sentences by the ``reduce`` ("max" or "mean") of their non-forced tokens' scores,
    best first, each only if its non-forced tokens still fit in ``room`` (a sentence that does not fit
    is skipped and smaller ones after it are tried).

    scores [n], sentence_ids [n] long (non-decreasing), forced [n] bool (kept anyway, not counted
    against ``room``). Returns [n] bool: the forced tokens and the chosen sentences.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    dev = scores.device
    sid = sentence_ids - sentence_ids.min()
    n_sent = int(sid.max()) + 1
    free = ~forced
    agg = torch.full((n_sent,), float("-inf"), device=dev)
    agg = agg.scatter_reduce(0, sid[free], scores[free].float(), "amax" if reduce == "max" else "mean",
                             include_self=False)
    extra = torch.zeros(n_sent, dtype=torch.long, device=dev).scatter_add_(0, sid, free.long()).tolist()
    chosen = torch.zeros(n_sent, dtype=torch.bool, device=dev)
    for j in torch.argsort(agg, descending=True).tolist():
        if room <= 0:
            break
        if 0 < extra[j] <= room:
            chosen[j] = True
            room -= extra[j]
    return chosen[sid] | forced


def topk_sentences(scores: torch.Tensor, sentence_ids: torch.Tensor, keep: int | list[int], lengths: list[int],
                   keep_last: int = 0, reduce: str = "max") -> tuple[torch.Tensor, list[int]]:
    """Keep whole sentences: the last ``keep_last`` tokens always, then sentences chosen by
    ``choose_sentences`` up to ``keep`` tokens.

    scores: [B, S]; sentence_ids: [B, S] long (``runtime.sentences.segment``). Returns (index [B, K],
    kept per sequence) like ``topk_tokens``: sorted, a shorter row repeats its last index.
    """
    keeps = _keeps(keep, len(lengths))
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    rows = []
    for b, (n, keep) in enumerate(zip(lengths, keeps)):
        if keep >= n:
            rows.append(torch.arange(n, device=scores.device))
            continue
        last = min(keep_last, keep, n)
        forced = torch.zeros(n, dtype=torch.bool, device=scores.device)
        forced[n - last:] = True
        mask = choose_sentences(scores[b, :n], sentence_ids[b, :n], forced, keep - last, reduce)
        rows.append(torch.nonzero(mask).flatten())
    kept = [len(r) for r in rows]
    index = torch.empty(len(rows), max(kept), dtype=torch.long, device=scores.device)
    for b, r in enumerate(rows):
        index[b, :len(r)] = r
        index[b, len(r):] = r[-1]
    return index, kept


__all__ = ["topk_tokens", "topk_sentences", "choose_sentences"]
