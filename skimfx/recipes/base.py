"""What every recipe shares: the ``Recipe`` interface, its error, and the parameter checks."""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..program import ModelInfo


class RecipeError(ValueError):
    """Invalid recipe parameters."""


class Recipe(ABC):
    """A named, validated configuration that selects and parameterises passes. Parameters are checked
    in ``__post_init__`` (alone) and in ``passes(info)`` (against the model: layer ranges)."""

    name = "recipe"

    @abstractmethod
    def passes(self, info: ModelInfo) -> list:
        """The passes (after lower_attention and split_layers) that implement this recipe."""

    def with_tokenizer(self, tokenizer) -> "Recipe":
        """This recipe completed from the tokenizer ``skimfx.compile`` was given (e.g. text it must
        tokenize); default: unchanged."""
        return self


@dataclass(frozen=True)
class Dense(Recipe):
    """Nothing skipped."""

    name = "dense"

    def passes(self, info: ModelInfo) -> list:
        return []


def bind_pass(fn, name: str, **kw):
    """``fn`` with its parameters bound, named for the PassManager's messages and ``program.history``."""
    bound = functools.partial(fn, **kw)
    bound.__name__ = name
    return bound


def positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RecipeError(f"{name} must be a positive integer, got {value!r}")


def amount_ok(name: str, value, allow_zero: bool = False) -> None:
    """A token count (int) or a fraction of the prompt (float in (0, 1))."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{name} must be a token count (int) or a fraction of the prompt (float in (0, 1)), "
                          f"got {value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise RecipeError(f"{name} as a fraction must be in (0, 1), got {value}")
    if isinstance(value, int) and (value < 0 or (value == 0 and not allow_zero)):
        raise RecipeError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def layers_ok(layers) -> tuple[int, ...] | None:
    if layers is None:
        return None
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    if not layers or any(not isinstance(l, int) or l < 0 for l in layers):
        raise RecipeError(f"layers must be layer indices >= 0, got {list(layers)}")
    return layers


def sentence_ok(r, granularities: tuple[str, ...] = ("token", "sentence")) -> None:
    """``granularity``: "token" (the papers' rule) or "sentence": score each sentence by the max (or
    mean, ``sentence_reduce``) of its tokens' scores and keep whole sentences, best first, up to the
    budget; sentences are cut at ``max_sentence`` tokens. Needs the tokenizer at compile time. The KV
    policies also take "chunk" (fixed runs of tokens, ``recipes.kv``)."""
    if r.granularity not in granularities:
        raise RecipeError(f"granularity must be {' or '.join(map(repr, granularities))}, got {r.granularity!r}")
    if r.sentence_reduce not in ("max", "mean"):
        raise RecipeError(f"sentence_reduce must be 'max' or 'mean', got {r.sentence_reduce!r}")
    if not isinstance(r.max_sentence, int) or r.max_sentence < 1:
        raise RecipeError(f"max_sentence must be a token count >= 1, got {r.max_sentence!r}")


def sentence_fields(r) -> dict:
    return dict(granularity=r.granularity, sentence_reduce=r.sentence_reduce, max_sentence=r.max_sentence)
