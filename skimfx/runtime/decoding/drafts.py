"""Lookahead-style n-gram drafts: the tokens that followed an earlier occurrence of the current suffix."""
from __future__ import annotations


class NGramDrafts:
    """Lookahead drafts: the tokens after the latest earlier occurrence of the last n tokens (n from
    ``max_n`` down to ``min_n``) in the prompt and the text so far. ``order`` is the n of the last
    proposal (longer matches are better drafts; the schedule keeps their acceptance apart)."""

    def __init__(self, min_n: int = 2, max_n: int = 4):
        self.min_n, self.max_n = min_n, max_n
        self.index: dict[tuple[int, ...], int] = {}          # n-gram -> end position of its latest occurrence
        self.upto = 0                                        # n-grams ending before this position are indexed
        self.order = 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        end = len(tokens) - 1                                # index every n-gram that ends before the last token
        for j in range(self.upto, end):
            for n in range(self.min_n, self.max_n + 1):
                if j - n + 1 >= 0:
                    self.index[tuple(tokens[j - n + 1:j + 1])] = j
        self.upto = max(self.upto, end)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) < n:
                continue
            j = self.index.get(tuple(tokens[-n:]))
            if j is not None:
                self.order = n
                return tokens[j + 1:j + 1 + k]
        self.order = 0
        return []


def accepted_count(preds: list[int], drafts: list[int]) -> int:
    """How many drafts greedy verification keeps: the drafts up to the first one the model's prediction
    (``preds[i]``: its token after the i-th verified token) disagrees with."""
    n = 0
    while n < len(drafts) and preds[n] == drafts[n]:
        n += 1
    return n


__all__ = ["NGramDrafts", "accepted_count"]
