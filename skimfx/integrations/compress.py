"""Prompt compression for any serving engine: the token ids GemFilter keeps, to send as ``prompt_token_ids``.

GemFilter (Shi et al., 2024) scores the prompt at an early layer and re-runs the model on the kept tokens
with fresh positions: the kept tokens are a prompt of their own, so any engine (vLLM, SGLang, an
OpenAI-compatible server) can take them in place of the prompt, and its prefill shrinks by the same
factor without a change to its scheduler. This is the one way skimfx's prefill savings reach an
engine; methods that keep the earlier layers' KV of every token (PromptDistill) have no such form.

``PromptCompressor(model, "gemfilter:layer=14,keep=512", tokenizer=tok)`` compiles once;
``compress_prompt(model, prompt, recipe, tokenizer)`` is the one-shot form. ``keep`` may also be given
per call (``keep=`` in tokens, or ``fraction=`` of the prompt), since prompts differ in length.
``granularity=sentence`` in the recipe keeps whole sentences.
"""
from __future__ import annotations

import dataclasses

from ..recipes import GemFilter, Recipe, RecipeError, parse_recipe


def gemfilter_recipe(recipe: Recipe | str) -> GemFilter:
    recipes = parse_recipe(recipe) if isinstance(recipe, str) else [recipe]
    if len(recipes) != 1 or not isinstance(recipes[0], GemFilter):
        got = "+".join(r.name for r in recipes) or "dense"
        raise RecipeError(f"prompt compression takes one gemfilter recipe (e.g. gemfilter:layer=14,keep=512, "
                          f"add granularity=sentence for whole sentences), got {got!r}: the kept tokens must form a "
                          "prompt of their own, which only GemFilter's re-run gives")
    return recipes[0]


class PromptCompressor:
    """GemFilter's kept token ids for prompts, from one compiled model (one compile per ``keep``)."""

    def __init__(self, model, recipe: Recipe | str, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.recipe = gemfilter_recipe(recipe)
        if self.recipe.granularity == "sentence" and tokenizer is None:
            raise RecipeError("granularity=sentence segments the prompt with the tokenizer: pass tokenizer=")
        self._compiled = {}

    def _program(self, keep: int):
        if keep not in self._compiled:
            from .. import compile as compile_model

            recipe = dataclasses.replace(self.recipe, keep=keep, keep_last=min(self.recipe.keep_last, keep))
            self._compiled[keep] = compile_model(self.model, recipe, tokenizer=self.tokenizer)
        return self._compiled[keep]

    def token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs the tokenizer (tokenizer=...), or pass token ids")
            return list(self.tokenizer(prompt).input_ids)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def kept_positions(self, prompt: str | list[int], keep: int | None = None, fraction: float | None = None
                       ) -> list[int]:
        """The positions of the prompt GemFilter keeps (ascending; the whole prompt when it is not longer)."""
        ids = self.token_ids(prompt)
        if keep is not None and fraction is not None:
            raise ValueError("give keep (tokens) or fraction, not both")
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise ValueError(f"fraction must be in (0, 1], got {fraction}")
            keep = max(1, round(fraction * len(ids)))
        keep = self.recipe.keep if keep is None else keep
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive number of tokens, got {keep!r}")
        if len(ids) <= keep:
            return list(range(len(ids)))
        cm = self._program(keep)
        g = cm.generate([ids], max_new_tokens=1)
        return list(g.stats.selected[self.recipe.layer][0])

    def __call__(self, prompt: str | list[int], keep: int | None = None, fraction: float | None = None
                 ) -> list[int]:
        """The kept token ids: send them as ``prompt_token_ids`` to the engine."""
        ids = self.token_ids(prompt)
        return [ids[i] for i in self.kept_positions(ids, keep, fraction)]


def compress_prompt(model, prompt: str | list[int], recipe: Recipe | str, tokenizer=None, *,
                    keep: int | None = None, fraction: float | None = None) -> list[int]:
    """The token ids GemFilter keeps of ``prompt`` (text needs ``tokenizer``), for any engine's
    ``prompt_token_ids``. ``recipe``: a GemFilter recipe or string (``gemfilter:layer=14,keep=512``,
    ``granularity=sentence`` for whole sentences); ``keep`` / ``fraction`` override its ``keep``."""
    return PromptCompressor(model, recipe, tokenizer)(prompt, keep=keep, fraction=fraction)


__all__ = ["PromptCompressor", "compress_prompt", "gemfilter_recipe"]
