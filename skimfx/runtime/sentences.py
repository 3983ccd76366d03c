"""Sentence segmentation on token ids, for sentence-granular token selection.

Selecting whole sentences instead of single tokens keeps a fact together: a token-level top-k keeps
the few tokens of a needle sentence that score highest and drops the rest (the digits of a number
score unevenly), a sentence-level rule keeps or drops the sentence as a whole.

A sentence ends after a token whose text ends with sentence-ending punctuation (``. ! ?`` and their
full-width forms, before closing quotes or brackets), after a token that contains a newline, and at
special tokens (chat-template markers, BOS/EOS). A sentence longer than ``max_len`` tokens is cut
into pieces of ``max_len`` so that one run-on sentence cannot swallow the budget. The table of ending
tokens is built once per tokenizer from its vocabulary; segmenting a prompt is a few vectorised ops.
"""
from __future__ import annotations

import weakref

import torch

_ENDINGS = (".", "!", "?", "\u3002", "\uff01", "\uff1f", "\u2026")
_CLOSERS = "\"')]}\u201d\u2019\u00bb*"
# byte-level BPE (GPT-2 / Llama 3 / SmolLM) and SentencePiece spell spaces and newlines this way
_SPACES = {"\u0120": " ", "\u010a": "\n", "\u2581": " ", "<0x0A>": "\n", "<0x0D>": "\n"}
# Keyed weakly by the tokenizer object: an entry goes with its tokenizer (keying by id() would hand a
# later tokenizer that reuses a freed object's id the old tokenizer's table).
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _text(token: str) -> str:
    for k, v in _SPACES.items():
        token = token.replace(k, v)
    return token


def sentence_end_table(tokenizer) -> torch.Tensor:
    """[vocab] bool: does a sentence end after this token id? Cached per tokenizer object (while it lives)."""
    try:
        return _TABLES[tokenizer]
    except (KeyError, TypeError):        # TypeError: an object that takes no weak reference is not cached
        pass
    vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    ends = torch.zeros(vocab, dtype=torch.bool)
    for i, tok in enumerate(tokens):
        if tok is None:
            continue
        text = _text(tok)
        tail = text.rstrip().rstrip(_CLOSERS)
        ends[i] = "\n" in text or tail.endswith(_ENDINGS)
    for i in tokenizer.all_special_ids:
        if 0 <= i < vocab:
            ends[i] = True
    try:
        _TABLES[tokenizer] = ends
    except TypeError:
        pass
    return ends


def segment(ids: torch.Tensor, ends: torch.Tensor, max_len: int = 64) -> torch.Tensor:
    """Sentence index of every token: ids [T] -> [T] long, 0, 0, …, 1, 1, … (a new sentence starts after
    an ending token, and after every ``max_len`` tokens of one sentence)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    T = ids.shape[0]
    if T == 0:
        return torch.zeros(0, dtype=torch.long, device=ids.device)
    is_end = ends.to(ids.device)[ids.clamp(0, ends.shape[0] - 1)]
    start = torch.zeros(T, dtype=torch.bool, device=ids.device)
    start[0] = True
    start[1:] = is_end[:-1]
    # position inside the sentence: distance to the last start at or before t
    t = torch.arange(T, device=ids.device)
    last_start = torch.cummax(torch.where(start, t, torch.zeros_like(t)), 0).values
    pos = t - last_start
    start |= (pos > 0) & (pos % max_len == 0)
    return torch.cumsum(start.long(), 0) - 1


def segment_batch(input_ids: torch.Tensor, n_valid: list[int], ends: torch.Tensor, max_len: int = 64) -> torch.Tensor:
    """[B, T] sentence ids of right-padded prompts (padding positions get the last sentence's id)."""
    out = torch.zeros_like(input_ids, dtype=torch.long)
    for b, n in enumerate(n_valid):
        sid = segment(input_ids[b, :n], ends, max_len)
        out[b, :n] = sid
        if n < input_ids.shape[1]:
            out[b, n:] = sid[-1] if n else 0
    return out


__all__ = ["sentence_end_table", "segment", "segment_batch"]
