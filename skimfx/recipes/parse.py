"""Recipe strings (the CLI's and ``skimfx.compile``'s ``recipe="..."``): ``parse_recipe`` and ``recipe_label``."""
from __future__ import annotations

import dataclasses

from .base import Dense, Recipe, RecipeError
from .kv import KVRecipe
from .pruning import GemFilter, PromptDistill
from .registry import RECIPES

PRUNING = (GemFilter, PromptDistill)
PATH_FIELDS = {"calibration"}        # values kept whole: a path may contain "/"


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "/" in text:
        parts = tuple(_value(t) for t in text.split("/"))
        if all(isinstance(p, str) and p for p in parts) or all(isinstance(p, (int, float)) for p in parts):
            return parts
        return text                          # a path such as ./skip.pt or /tmp/cal.pt
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
            kwargs[key] = val.strip() if key in PATH_FIELDS else _value(val)
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
    pruning = [r for r in out if isinstance(r, PRUNING)]
    if len(pruning) > 1:
        raise RecipeError("one prefill pruning recipe at a time (gemfilter or promptdistill); "
                          "PromptDistill takes several selection layers itself")
    policy = [r for r in out if isinstance(r, KVRecipe)]
    if len(policy) > 1:
        raise RecipeError("one KV cache policy recipe at a time (" + ", ".join(r.name for r in policy) + " given); "
                          "restrict one to some layers with layers=... and compose in Python if needed")
    return out


def recipe_label(recipes: list[Recipe]) -> str:
    """The string ``parse_recipe`` reads back."""
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
