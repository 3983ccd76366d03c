"""Recipe strings (the CLI's and ``skimfx.compile``'s ``recipe="..."``): ``parse_recipe`` and ``recipe_label``."""
from __future__ import annotations

import dataclasses

from .base import Dense, Recipe, RecipeError
from .kv import KVRecipe
from .pruning import GemFilter, PromptDistill
from .registry import RECIPES

PRUNING = (GemFilter, PromptDistill)
# Fields whose value may be a file path: kept whole (a path contains "/", which elsewhere separates list
# items) unless it is a list of numbers ("skip_layers=4/7" is layers, "skip_layers=./cal/skip.pt" a path).
PATH_FIELDS = {"calibration", "skip_layers", "steering"}
QUOTES = "\"'"


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside quotes (a quoted value may hold ``+ , / =``)."""
    parts, cur, quote = [], [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in QUOTES:
            quote = ch
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote:
        raise RecipeError(f"unclosed {quote} in recipe string {text!r}")
    parts.append("".join(cur))
    return parts


def _unquote(text: str) -> str | None:
    """The inside of a quoted value, or None when ``text`` is not quoted."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in QUOTES:
        return text[1:-1]
    return None


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
        pass
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)       # 25% -> 0.25
    except ValueError:
        return text


def parse_recipe(text: str) -> list[Recipe]:
    """Recipes from a command-line string: ``name[:key=value,...]`` joined by ``+``.

    Lists use ``/``: ``promptdistill:layers=4/12,keep=1024/256,truncate_earlier_kv=true``. A value in
    quotes is taken verbatim (``calibration="/data/cal v2.st"``); a file path given to a path field
    (``calibration``, ``skip_layers``) keeps its slashes without quotes.
    ``dense`` (or an empty string) is no recipe. Raises ``RecipeError`` with what is valid.
    """
    out: list[Recipe] = []
    for part in filter(None, (p.strip() for p in _split(text, "+"))):
        name, _, args = part.partition(":")
        name = name.strip().lower()
        if name not in RECIPES:
            raise RecipeError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
        cls = RECIPES[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for item in filter(None, (a.strip() for a in _split(args, ","))):
            key, eq, val = item.partition("=")
            key, val = key.strip(), val.strip()
            if not eq or not val:
                raise RecipeError(f"{name}: expected key=value, got {item!r}")
            if key not in fields:
                raise RecipeError(f"{name}: unknown parameter {key!r}; valid: {', '.join(sorted(fields))}")
            quoted = _unquote(val)
            if quoted is not None:
                kwargs[key] = quoted
            elif key in PATH_FIELDS:
                v = _value(val)
                kwargs[key] = v if isinstance(v, (int, float, bool)) or (
                    isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v)) else val
            else:
                kwargs[key] = _value(val)
        try:
            recipe = cls(**kwargs)
        except RecipeError as e:
            raise RecipeError(f"{name}: {e}") from None
        except TypeError as e:
            missing = sorted(f.name for f in dataclasses.fields(cls)
                             if f.default is dataclasses.MISSING and f.name not in kwargs)
            if missing:
                raise RecipeError(f"{name}: missing parameter(s) {', '.join(missing)}") from None
            raise RecipeError(f"{name}: invalid parameter value ({e})") from None
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
            text = "/".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) \
                else str(v)
            if any(c in text for c in "+,=" + QUOTES) or (f.name not in PATH_FIELDS and isinstance(v, str)
                                                           and "/" in text):
                text = f"'{text}'" if "'" not in text else f'"{text}"'
            args.append(f"{f.name}={text}")
        parts.append(r.name + (":" + ",".join(args) if args else ""))
    return "+".join(parts)
