"""Recipes: named, validated configurations that select and parameterise passes.

Each recipe is a dataclass validated in ``__post_init__`` (parameters alone) and in ``passes(info)``
(against the model: layer ranges). ``RECIPES`` maps a name to its class, so adding a method is one
small class.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .passes.prune_tokens import prune_tokens
from .program import ModelInfo, Selection


class RecipeError(ValueError):
    """Invalid recipe parameters."""


def _named(fn, name: str, **kw):
    bound = functools.partial(fn, **kw)
    bound.__name__ = name
    return bound


class Recipe(ABC):
    name = "recipe"

    @abstractmethod
    def passes(self, info: ModelInfo) -> list:
        """The passes (after lower_attention and split_layers) that implement this recipe."""


@dataclass(frozen=True)
class Dense(Recipe):
    """Nothing skipped."""

    name = "dense"

    def passes(self, info: ModelInfo) -> list:
        return []


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise RecipeError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class GemFilter(Recipe):
    """GemFilter (Shi et al., 2024, "Discovering the Gems in Early Layers"): run layers 0..``layer``,
    score every prompt token by the last query's attention logits q·Kᵀ (no softmax, no scaling)
    summed over heads, avg-pool kernel 5, keep the top ``keep`` (sorted, plus the last ``keep_last``
    tokens), then run the whole model on the kept token ids with fresh contiguous positions."""

    layer: int
    keep: int
    pool_kernel: int = 5
    keep_last: int = 8
    name = "gemfilter"

    def __post_init__(self):
        _positive("keep", self.keep)
        if not isinstance(self.layer, int) or self.layer < 0:
            raise RecipeError(f"layer must be a layer index >= 0, got {self.layer!r}")
        if self.keep_last < 0 or self.keep_last > self.keep:
            raise RecipeError(f"keep_last must be in 0..keep ({self.keep}), got {self.keep_last}")

    def selections(self) -> list[Selection]:
        return [Selection(layer=self.layer, keep=self.keep, mode="rerun", window=1, softmax=False, heads="sum",
                          pool="avg" if self.pool_kernel > 1 else None, pool_kernel=self.pool_kernel, scale=1.0,
                          keep_last=self.keep_last, method="GemFilter")]

    def passes(self, info: ModelInfo) -> list:
        return [_named(prune_tokens, "prune_tokens", selections=self.selections())]


@dataclass(frozen=True)
class PromptDistill(Recipe):
    """PromptDistill (Jin et al., 2025): at each selection layer r_i, score prompt tokens by the last
    token's q·Kᵀ/√d averaged over heads (optional avg-pool kernel 5), keep the top ``keep_i`` (sorted,
    plus the last ``keep_last``); layers after r_i run on the kept tokens with their original
    positions. ``truncate_earlier_kv`` also cuts the KV of layers <= r_i to the kept tokens."""

    layers: tuple[int, ...] | int
    keep: tuple[int, ...] | int
    truncate_earlier_kv: bool = False
    pool_kernel: int = 5
    keep_last: int = 8
    name = "promptdistill"

    def __post_init__(self):
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        keep = (self.keep,) if isinstance(self.keep, int) else tuple(self.keep)
        if not layers:
            raise RecipeError("layers must name at least one selection layer")
        if len(keep) == 1 and len(layers) > 1:
            keep = keep * len(layers)
        if len(keep) != len(layers):
            raise RecipeError(f"give one keep per selection layer: layers={list(layers)}, keep={list(keep)}")
        for k in keep:
            _positive("keep", k)
        if any(not isinstance(r, int) or r < 0 for r in layers):
            raise RecipeError(f"layers must be layer indices >= 0, got {list(layers)}")
        if self.keep_last < 0 or self.keep_last > min(keep):
            raise RecipeError(f"keep_last must be in 0..min(keep) ({min(keep)}), got {self.keep_last}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", keep)

    def selections(self) -> list[Selection]:
        return [Selection(layer=r, keep=k, mode="continue", window=1, softmax=False, heads="mean",
                          pool="avg" if self.pool_kernel > 1 else None, pool_kernel=self.pool_kernel, scale=None,
                          keep_last=self.keep_last, truncate_earlier_kv=self.truncate_earlier_kv,
                          method="PromptDistill")
                for r, k in zip(self.layers, self.keep)]

    def passes(self, info: ModelInfo) -> list:
        return [_named(prune_tokens, "prune_tokens", selections=self.selections())]


RECIPES: dict[str, type] = {cls.name: cls for cls in (Dense, GemFilter, PromptDistill)}



def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "/" in text:
        return tuple(_value(t) for t in text.split("/"))
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_recipe(text: str) -> list[Recipe]:
    """Recipes from a command-line string: ``name[:key=value,...]`` joined by ``+``.

    Lists use ``/``: ``promptdistill:layers=4/12,keep=1024/256,truncate_earlier_kv=true``.
    ``dense`` (or an empty string) is no recipe. Raises ``RecipeError`` with what is valid.
    """
    import dataclasses

    out: list[Recipe] = []
    for part in filter(None, (p.strip() for p in text.split("+"))):
        name, _, args = part.partition(":")
        name = name.strip().lower()
        if name not in RECIPES:
            raise RecipeError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
        cls = RECIPES[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, val = item.partition("=")
            if not eq or not val:
                raise RecipeError(f"{name}: expected key=value, got {item!r}")
            if key not in fields:
                raise RecipeError(f"{name}: unknown parameter {key!r}; valid: {', '.join(sorted(fields))}")
            kwargs[key] = _value(val)
        try:
            recipe = cls(**kwargs)
        except RecipeError as e:
            raise RecipeError(f"{name}: {e}") from None
        except TypeError as e:
            missing = sorted(f.name for f in dataclasses.fields(cls)
                             if f.default is dataclasses.MISSING and f.name not in kwargs)
            raise RecipeError(f"{name}: missing parameter(s) {', '.join(missing)} ({e})") from None
        if not isinstance(recipe, Dense):
            out.append(recipe)
    pruning = [r for r in out if isinstance(r, (GemFilter, PromptDistill))]
    if len(pruning) > 1:
        raise RecipeError("one prefill pruning recipe at a time (gemfilter or promptdistill); "
                          "PromptDistill takes several selection layers itself")
    return out


def recipe_label(recipes: list[Recipe]) -> str:
    """The string ``parse_recipe`` reads back."""
    import dataclasses

    if not recipes:
        return "dense"
    parts = []
    for r in recipes:
        args = []
        for f in dataclasses.fields(r):
            v = getattr(r, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            args.append(f"{f.name}=" + ("/".join(map(str, v)) if isinstance(v, tuple) else str(v).lower()
                                        if isinstance(v, bool) else str(v)))
        parts.append(r.name + (":" + ",".join(args) if args else ""))
    return "+".join(parts)


__all__ = ["Recipe", "RecipeError", "Dense", "GemFilter", "PromptDistill", "RECIPES", "parse_recipe", "recipe_label"]
