"""Lookahead-style n-gram drafts: the tokens that followed an earlier occurrence of the current suffix, in
the text so far or in a side corpus (the prompt with its hard-wrapped lines joined, ``join_wrapped_lines``)."""
from __future__ import annotations

import re

# A line break inside a paragraph: a single newline between two non-blank characters, the next line not
# indented (an indented or blank next line is structure: code, lists, paragraphs).
_WRAP = re.compile(r"(?<=\S)[ \t]*\n(?=\S)")
# Runs of spaces between words (two spaces after a full stop, aligned columns).
_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")


def join_wrapped_lines(text: str) -> str:
    """``text`` as a model tends to write it when it quotes: hard-wrapped lines joined with a space and runs of
    spaces between words made one. A document wrapped at a fixed width (e-mail, essays, RFCs, text taken
    from a PDF) breaks lines where a copied answer has a space: the tokens differ at every break (``"\\n"``
    then ``"word"`` vs ``" word"``), so n-gram drafts taken from the prompt as it is stop at each one."""
    return _SPACES.sub(" ", _WRAP.sub(" ", text))


class NGramDrafts:
    """Lookahead drafts: the tokens after the latest earlier occurrence of the last n tokens (n from
    ``max_n`` down to ``min_n``) in the prompt and the text so far, or in a side ``corpus`` (another tokenization
    of the prompt's text: ``join_wrapped_lines``). ``order`` is the n of the last proposal (longer matches are
    better drafts; the schedule keeps their acceptance apart).

    When the suffix occurs in both, the longer match wins (compared up to ``reach`` tokens back); on a tie the
    source whose last draft was accepted, or, after a draft rejected at its first token, the other one. So
    once a copied answer has crossed one line break in the joined form, its drafts follow the joined text, and
    an answer that keeps the prompt's line breaks (code) keeps drafting from the prompt."""

    reach = 32

    def __init__(self, min_n: int = 2, max_n: int = 4, corpus: list[int] | None = None):
        self.min_n, self.max_n = min_n, max_n
        self.index: dict[tuple[int, ...], int] = {}          # n-gram -> end position of its latest occurrence
        self.upto = 0                                        # n-grams ending before this position are indexed
        self.order = 0
        self.corpus = list(corpus or [])
        self.corpus_index: dict[tuple[int, ...], int] = {}
        self._index(self.corpus, self.corpus_index, 0, len(self.corpus))
        self.source = 0                                      # where the last proposal came from: 0 text, 1 corpus
        self.tied: int | None = None                         # the other source when the last proposal was a tie
        self.preferred = 0                                   # the source that wins a tie

    def _index(self, tokens: list[int], index: dict, start: int, end: int) -> None:
        for j in range(start, end):
            for n in range(self.min_n, self.max_n + 1):
                if j - n + 1 >= 0:
                    index[tuple(tokens[j - n + 1:j + 1])] = j

    def _match_length(self, tokens: list[int], src: list[int], j: int) -> int:
        """How many tokens before the end of ``tokens`` equal those up to ``src[j]`` (at most ``reach``)."""
        n = 0
        while n < self.reach and n <= j and n < len(tokens) and tokens[-1 - n] == src[j - n]:
            n += 1
        return n

    def propose(self, tokens: list[int], k: int) -> list[int]:
        end = len(tokens) - 1                                # index every n-gram that ends before the last token
        self._index(tokens, self.index, self.upto, end)
        self.upto = max(self.upto, end)
        self.tied = None
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) < n:
                continue
            key = tuple(tokens[-n:])
            found = [(s, src, idx[key]) for s, (src, idx) in enumerate(((tokens, self.index),
                                                                          (self.corpus, self.corpus_index)))
                     if key in idx and idx[key] + 1 < len(src)]
            if not found:
                continue
            self.order = n
            if len(found) == 2:
                (_, text, jt), (_, corp, jc) = found
                lt, lc = self._match_length(tokens, text, jt), self._match_length(tokens, corp, jc)
                if lt == lc:
                    self.tied = 1 - self.preferred
                    found = [found[self.preferred]]
                else:
                    found = [found[lc > lt]]
            self.source, src, j = found[0]
            return src[j + 1:j + 1 + k]
        self.order = 0
        return []

    def observe(self, accepted: int) -> None:
        """The last proposal's verification kept ``accepted`` drafts: an accepted draft makes its source win the
        next tie; a tie whose draft was rejected at once hands the next tie to the other source."""
        if accepted > 0:
            self.preferred = self.source
        elif self.tied is not None:
            self.preferred = self.tied


def side_corpus(config, prompt: list[int]) -> list[int] | None:
    """The side corpus of n-gram drafts for ``prompt`` under a ``SpeculativeConfig``: the prompt's text with its
    wrapped lines joined, re-tokenized by ``config.reflow_with``; None without that tokenizer or when the prompt
    has no wrapped line."""
    tok = config.reflow_with
    if tok is None:
        return None
    text = tok.decode(prompt)
    joined = join_wrapped_lines(text)
    return None if joined == text else tok(joined, add_special_tokens=False).input_ids


def accepted_count(preds: list[int], drafts: list[int]) -> int:
    """How many drafts greedy verification keeps: the drafts up to the first one the model's prediction
    (``preds[i]``: its token after the i-th verified token) disagrees with."""
    n = 0
    while n < len(drafts) and preds[n] == drafts[n]:
        n += 1
    return n


__all__ = ["NGramDrafts", "accepted_count", "join_wrapped_lines", "side_corpus"]
