"""Generation-time recipes: short-m@k voting (``ShortMK``), sorted sub-models (``Truncate``),
activation-steered compression (``Steer``) and Hogwild! shared-cache workers (``Hogwild``).

- ``ShortMK`` records a ``ShortMajorityConfig`` (``decode_with``): the runtime samples k chains over one
  prefill and votes among the first m to finish. Its answer extractor reads text, so the recipe is
  completed with the tokenizer ``skimfx.compile`` is given.
- ``Truncate`` runs the ``truncate_layers`` pass: the first ``layers`` layers and the head, reading the
  last kept layer through the exit adapter of an exit calibration (``skimfx.calibrate_exits``).
- ``Steer`` runs the ``steer`` pass with the vector, layer and alpha of a steering calibration
  (``skimfx.calibrate_steering``).
- ``Hogwild`` records a ``HogwildConfig`` (``decode_with``): the runtime runs the workers over one shared cache
  of blocks. Each worker's header is tokenized with the tokenizer ``skimfx.compile`` is given.

Calibrations are passed in as objects (or paths that ``skimfx.compile`` loads) and read by their
attributes: recipes never import the calibrate package.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..passes.decode_with import decode_with
from ..passes.steer import steer
from ..passes.truncate_layers import truncate_layers
from ..program import HogwildConfig, ModelInfo, ShortMajorityConfig
from .base import Recipe, RecipeError, bind_pass, positive

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalised ("1,200" -> "1200", "42.0" -> "42"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    try:
        x = float(s)
    except ValueError:
        return None
    return str(int(x)) if x.is_integer() else s


def last_line(text: str) -> str | None:
    """The last non-empty line of ``text``, stripped, or None."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else None


ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {"last_number": last_number, "last_line": last_line}


@dataclass(frozen=True)
class ShortMK(Recipe):
    """short-m@k (Hassid et al. 2025): ``k`` sampled answers sharing one prefill; when ``m`` have finished
    the others are abandoned and the majority answer among the ``m`` is returned (ties: the shortest chain).
    ``m == k`` is majority voting over all k. ``answer``: "last_number" (default), "last_line", or a
    function text -> answer (None when the text has none). Needs sampling (``temperature > 0``) and the
    tokenizer at compile time."""

    k: int = 8
    m: int = 3
    answer: object = "last_number"
    name = "shortmk"

    def __post_init__(self):
        positive("k", self.k)
        positive("m", self.m)
        if self.m > self.k:
            raise RecipeError(f"m must be at most k (the first m of k chains vote), got m={self.m}, k={self.k}")
        if isinstance(self.answer, str):
            if self.answer not in ANSWER_EXTRACTORS:
                raise RecipeError(f"answer must be one of {sorted(ANSWER_EXTRACTORS)} or a function text -> answer, "
                                  f"got {self.answer!r}")
        elif not callable(self.answer):
            raise RecipeError(f"answer must be one of {sorted(ANSWER_EXTRACTORS)} or a function text -> answer, got "
                              f"{type(self.answer).__name__}")

    def with_tokenizer(self, tokenizer) -> "ShortMK":
        if tokenizer is None:
            return self
        done = dataclasses.replace(self)
        object.__setattr__(done, "_decode", lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        return done

    def passes(self, info: ModelInfo) -> list:
        decode = getattr(self, "_decode", None)
        if decode is None:
            raise RecipeError("shortmk reads each answer's text: compile with the tokenizer "
                              "(skimfx.compile(model, recipe, tokenizer=tok))")
        text_rule = ANSWER_EXTRACTORS[self.answer] if isinstance(self.answer, str) else self.answer
        name = self.answer if isinstance(self.answer, str) else getattr(self.answer, "__name__", "custom")
        config = ShortMajorityConfig(self.k, self.m, answer=lambda ids: text_rule(decode(ids)), answer_name=name)
        return [bind_pass(decode_with, "decode_with", config=config)]


@dataclass(frozen=True)
class Truncate(Recipe):
    """Sorted sub-model (SoFT, Kavehzadeh et al. 2023; System-1.5's depth shortcut): the first ``layers``
    layers and the model's head, as a standalone smaller model. ``calibration``: an ExitCalibration (or
    its saved path) with an adapter after layer ``layers - 1`` (``skimfx.calibrate_exits(model, texts,
    layers=(layers - 1,))``); without one the head reads the layer's state directly."""

    layers: int
    calibration: object = None
    name = "truncate"

    def __post_init__(self):
        positive("layers", self.layers)
        cal = self.calibration
        if cal is not None and not isinstance(cal, (str, Path)) and not hasattr(cal, "adapters"):
            raise RecipeError(f"calibration must be an ExitCalibration (skimfx.calibrate_exits) or the path of one "
                              f"saved with .save(), got {type(cal).__name__}")

    def passes(self, info: ModelInfo) -> list:
        if not self.layers < info.num_layers:
            raise RecipeError(f"layers={self.layers} keeps the whole {info.num_layers}-layer model (or more): give "
                              f"1..{info.num_layers - 1}")
        cal = self.calibration
        if isinstance(cal, (str, Path)):
            raise RecipeError(f"calibration={str(cal)!r} is a path: skimfx.compile loads it; to build the passes "
                              "yourself, load it first (skimfx.ExitCalibration.load(path))")
        adapter = None
        if cal is not None:
            exit_layer = self.layers - 1
            if exit_layer not in cal.adapters:
                raise RecipeError(f"the calibration has no exit after layer {exit_layer} (it has {list(cal.layers)}); "
                                  f"calibrate it with skimfx.calibrate_exits(model, texts, layers=({exit_layer},))")
            adapter = cal.adapters[exit_layer]
        return [bind_pass(truncate_layers, "truncate_layers", keep=self.layers, adapter=adapter)]


@dataclass(frozen=True)
class Steer(Recipe):
    """Activation-Steered Compression (Azizi et al. 2025): ``alpha * v`` added to the residual stream after
    one layer at every token. ``steering``: a SteeringCalibration (``skimfx.calibrate_steering``) or its
    saved path, which gives the layer, ``v`` and the alpha chosen under its KL bound; ``alpha`` overrides
    that alpha (0 = no steering; negative steers towards the verbose style)."""

    steering: object
    alpha: float | None = None
    name = "steer"

    def __post_init__(self):
        s = self.steering
        if not isinstance(s, (str, Path)) and not all(hasattr(s, a) for a in ("layer", "vector", "alpha")):
            raise RecipeError(f"steering must be a SteeringCalibration (skimfx.calibrate_steering) or the path of "
                              f"one saved with .save(), got {type(s).__name__}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not math.isfinite(self.alpha)):
            raise RecipeError(f"alpha must be a finite number, got {self.alpha!r}")

    def passes(self, info: ModelInfo) -> list:
        s = self.steering
        if isinstance(s, (str, Path)):
            raise RecipeError(f"steering={str(s)!r} is a path: skimfx.compile loads it; to build the passes "
                              "yourself, load it first (skimfx.SteeringCalibration.load(path))")
        alpha = s.alpha if self.alpha is None else float(self.alpha)
        return [bind_pass(steer, "steer", layer=s.layer, vector=s.vector, alpha=alpha)]


HOGWILD_PROMPT = ("{task}\n\nYou are {n} workers answering this together, all writing at the same time. Each worker "
                  "sees everything the other workers have written so far, as it is written. Split the work: take a "
                  "part that no other worker is doing, do not repeat what another worker has written, and stop when "
                  "your part is done.")


def hogwild_prompt(task: str, workers: int) -> str:
    """The task wrapped in the instructions that tell the workers about each other (then chat-format it)."""
    return HOGWILD_PROMPT.format(task=task, n=workers)


@dataclass(frozen=True)
class Hogwild(Recipe):
    """Hogwild! inference (Rodionov et al. 2025): ``workers`` generate in parallel over one shared KV cache, each
    seeing the prompt, the others' blocks and its own block last (keys re-rotated by RoPE, never recomputed).
    Each worker's block opens with ``header`` (``{i}``: the worker's number from 1). Wrap the task with
    ``hogwild_prompt(task, workers)`` so the workers know about each other. Needs the tokenizer at compile time."""

    workers: int = 2
    header: str = "\n\n### Worker {i}\n"
    name = "hogwild"

    def __post_init__(self):
        positive("workers", self.workers)
        if not isinstance(self.header, str) or "{i}" not in self.header:
            raise RecipeError(f"header must be text with {{i}} where the worker's number goes, got {self.header!r}")

    def with_tokenizer(self, tokenizer) -> "Hogwild":
        if tokenizer is None:
            return self
        done = dataclasses.replace(self)
        ids = tuple(tuple(tokenizer(self.header.format(i=w + 1), add_special_tokens=False).input_ids)
                    for w in range(self.workers))
        object.__setattr__(done, "_headers", ids)
        return done

    def passes(self, info: ModelInfo) -> list:
        headers = getattr(self, "_headers", None)
        if headers is None:
            raise RecipeError("hogwild opens each worker's block with its header text: compile with the tokenizer "
                              "(skimfx.compile(model, recipe, tokenizer=tok))")
        if any(len(h) == 0 for h in headers):
            raise RecipeError(f"header {self.header!r} tokenizes to no tokens")
        return [bind_pass(decode_with, "decode_with", config=HogwildConfig(self.workers, headers))]


__all__ = ["ShortMK", "Truncate", "Steer", "Hogwild", "hogwild_prompt", "HOGWILD_PROMPT", "ANSWER_EXTRACTORS",
           "last_number", "last_line"]
