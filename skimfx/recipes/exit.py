"""Early-exit and self-speculation recipes: the ``early_exit`` pass (exit branches, k/v fill) and a
``decode_with`` pass that records a plain ``DecodeConfig`` for the runtime's decoding loop.

Calibrations (``skimfx.calibrate``) are passed in as objects and read by their attributes (an exit
calibration has ``layers``, ``adapters`` and ``threshold(layer, agreement)``; a skip calibration has
``skip``): recipes never import the calibrate package. A saved calibration's path is loaded by
``skimfx.compile`` (``calibrate.resolve``) before the recipe's passes are built.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..passes.decode_with import decode_with
from ..passes.early_exit import early_exit
from ..program import EarlyExitConfig, ModelInfo, SpeculativeConfig
from .base import Recipe, RecipeError, bind_pass, layers_ok, positive


def _calibration(cal):
    """An exit calibration object (duck-typed), or None."""
    if cal is None:
        return None
    if isinstance(cal, (str, Path)):
        raise RecipeError(f"calibration={str(cal)!r} is a path: skimfx.compile loads it; to build the passes "
                          "yourself, load it first (skimfx.ExitCalibration.load(path))")
    if not all(hasattr(cal, a) for a in ("adapters", "layers", "threshold")):
        raise RecipeError(f"calibration must be an ExitCalibration (skimfx.calibrate_exits) or the path of one saved "
                          f"with .save(), got {type(cal).__name__}")
    return cal


def _skip_set(value):
    """Draft&Verify's skipped layers: indices, a SkipCalibration (anything with ``.skip``), or the path of a
    saved one (kept as a path until ``skimfx.compile`` loads it)."""
    if isinstance(value, (str, Path)):
        return value
    if hasattr(value, "skip") and hasattr(value, "agreement"):
        if not value.skip:
            raise RecipeError("the SkipCalibration chose no layers: on its text no skipped set drafts well enough to "
                              f"pay (agreement after skipping 1, 2, .. layers: "
                              f"{', '.join(f'{a:.0%}' for a in value.agreement[1:])}); pass layer indices to force one")
        value = value.skip
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value or \
            any(not isinstance(l, int) or isinstance(l, bool) or l < 0 for l in value) or len(set(value)) != len(value):
        raise RecipeError(f"skip_layers must be distinct layer indices >= 0 (at least one), a SkipCalibration or "
                          f"its saved path, got {value!r}")
    return tuple(sorted(value))


def _exit_layers(info: ModelInfo, layers) -> None:
    bad = [l for l in layers if not 0 <= l < info.num_layers - 1]
    if bad:
        raise RecipeError(f"exit layers {bad} are out of range for this {info.num_layers}-layer model "
                          f"(valid: 0..{info.num_layers - 2})")


@dataclass(frozen=True)
class EarlyExit(Recipe):
    """CALM-style early exit (lossy): after each layer in ``layers`` an exit branch (the model's final
    norm + LM head, after the calibrated adapter when ``calibration`` is given) predicts the next
    token; the first whose probability reaches the layer's threshold is emitted, and the skipped layers
    cache k/v computed from the exited state. ``threshold``: one value or one per layer; or
    ``target_agreement`` with a ``calibration`` (an ExitCalibration or its saved path) picks each
    layer's threshold from held-out text."""

    layers: tuple[int, ...] | int
    threshold: tuple[float, ...] | float | None = None
    calibration: object = None
    target_agreement: float | None = None
    name = "earlyexit"

    def __post_init__(self):
        layers = layers_ok(self.layers)
        if layers is None:
            raise RecipeError("layers must name at least one exit layer")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if (self.threshold is None) == (self.target_agreement is None):
            raise RecipeError("give either threshold (confidence per exit) or target_agreement with a calibration")
        if self.threshold is not None:
            th = (self.threshold,) if isinstance(self.threshold, (int, float)) else tuple(self.threshold)
            if len(th) == 1:
                th = th * len(self.layers)
            if len(th) != len(self.layers) or any(not 0.0 < t <= 1.0 for t in th):
                raise RecipeError(f"threshold must be one probability in (0, 1] or one per exit layer, got "
                                  f"{self.threshold!r} for layers {list(self.layers)}")
            object.__setattr__(self, "threshold", th)
        else:
            if not 0.0 < self.target_agreement <= 1.0:
                raise RecipeError(f"target_agreement must be in (0, 1], got {self.target_agreement}")
            if self.calibration is None:
                raise RecipeError("target_agreement needs a calibration (skimfx.calibrate_exits)")

    def passes(self, info: ModelInfo) -> list:
        _exit_layers(info, self.layers)
        cal = _calibration(self.calibration)
        if cal is not None:
            missing = [l for l in self.layers if l not in cal.adapters]
            if missing:
                raise RecipeError(f"the calibration has no exit at layers {missing} (it has {list(cal.layers)})")
        adapters = {l: cal.adapters[l] for l in self.layers if cal.adapters[l] is not None} if cal else {}
        th = self.threshold or tuple(cal.threshold(l, self.target_agreement) for l in self.layers)
        config = EarlyExitConfig(tuple(zip(self.layers, th)))
        return [bind_pass(early_exit, "early_exit", layers=self.layers, adapters=adapters),
                bind_pass(decode_with, "decode_with", config=config)]


DRAFT_SOURCES = ("lookahead", "exit", "skip")


@dataclass(frozen=True)
class SelfSpeculative(Recipe):
    """Lossless self-speculative decoding: ``draft`` = "lookahead" (n-gram drafts from the prompt and
    the text so far), "exit" (LayerSkip: the first ``exit_layer`` + 1 layers and an exit branch draft,
    the remaining layers verify), "skip" (Draft&Verify: the model without ``skip_layers`` drafts, the
    whole model verifies; ``skimfx.calibrate_skip`` chooses the layers), or several tried in order
    ("lookahead/exit": an n-gram draft when one is found, else the exit draft). Up to ``draft_tokens``
    drafts per step, verified in one pass; the output is the greedy output without self-speculation: the
    dense one, or with a KV cache policy that policy's own (each draft token reads what its decode step
    would read; a policy that evicts during decode verifies them step by step and rolls its evictions back).
    ``batched``: a batch of prompts with lookahead drafts only is verified together, one pass per step for
    all sequences (ragged draft lengths, per-sequence rollback); otherwise (or false) prompt by prompt.
    ``adaptive``: the draft length follows acceptance (n-gram drafts start at ``draft_tokens``, model drafts at 2), and exit and
    skip drafting are switched off for a while when they measure slower than plain decoding.
    ``calibration``: adapters for the exit branch. ``skip_layers``: layer indices, or a
    ``SkipCalibration`` (or its saved path) whose chosen set is used. ``reflow`` (with the tokenizer given to
    ``skimfx.compile``): lookahead also drafts from the prompt's text with its hard-wrapped lines joined, as a
    quoting answer writes it (``runtime.decoding.drafts.join_wrapped_lines``); a draft source only, the output
    does not change."""

    draft: str | tuple[str, ...] = "lookahead"
    draft_tokens: int = 8
    exit_layer: int | None = None
    calibration: object = None
    adaptive: bool = True
    skip_layers: object = None
    batched: bool = True
    reflow: bool = True
    name = "selfspeculative"

    def __post_init__(self):
        src = tuple(self.draft.split("/")) if isinstance(self.draft, str) else tuple(self.draft)
        if not src or any(s not in DRAFT_SOURCES for s in src) or len(set(src)) != len(src):
            raise RecipeError(f"draft must be one or more of {DRAFT_SOURCES} (e.g. 'lookahead/exit'), got "
                              f"{self.draft!r}")
        object.__setattr__(self, "draft", src)
        positive("draft_tokens", self.draft_tokens)
        for flag in ("adaptive", "batched", "reflow"):
            if not isinstance(getattr(self, flag), bool):
                raise RecipeError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if ("exit" in src) != (self.exit_layer is not None):
            raise RecipeError("exit_layer is needed exactly when the draft comes from an exit "
                              f"(draft={'/'.join(src)}, exit_layer={self.exit_layer})")
        if self.exit_layer is not None and (not isinstance(self.exit_layer, int) or self.exit_layer < 0):
            raise RecipeError(f"exit_layer must be a layer index >= 0, got {self.exit_layer!r}")
        if ("skip" in src) != (self.skip_layers is not None):
            raise RecipeError("skip_layers is needed exactly when the draft skips layers "
                              f"(draft={'/'.join(src)}, skip_layers={self.skip_layers!r}); "
                              "skimfx.calibrate_skip chooses them")
        if self.skip_layers is not None:
            object.__setattr__(self, "skip_layers", _skip_set(self.skip_layers))

    def with_tokenizer(self, tokenizer) -> "SelfSpeculative":
        if not self.reflow or "lookahead" not in self.draft or not _can_retokenize(tokenizer):
            return self
        done = dataclasses.replace(self)
        object.__setattr__(done, "_tokenizer", tokenizer)
        return done

    def passes(self, info: ModelInfo) -> list:
        if isinstance(self.skip_layers, (str, Path)):
            raise RecipeError(f"skip_layers={str(self.skip_layers)!r} is a path: skimfx.compile loads it; to build the "
                              "passes yourself, load it first (skimfx.SkipCalibration.load(path))")
        if self.skip_layers is not None:
            bad = [l for l in self.skip_layers if l >= info.num_layers]
            if bad or len(self.skip_layers) >= info.num_layers:
                raise RecipeError(f"skip_layers {list(self.skip_layers)} do not fit this {info.num_layers}-layer "
                                  "model (indices 0..L-1, at least one layer kept)")
        config = SpeculativeConfig(self.draft, self.draft_tokens, self.exit_layer, self.adaptive,
                                   min_gain=1.0 if self.adaptive else 0.0, skip_layers=self.skip_layers or (),
                                   batched=self.batched, reflow_with=getattr(self, "_tokenizer", None))
        out = []
        if self.exit_layer is not None:
            _exit_layers(info, (self.exit_layer,))
            cal = _calibration(self.calibration)
            adapter = cal.adapters.get(self.exit_layer) if cal else None
            out.append(bind_pass(early_exit, "early_exit", layers=(self.exit_layer,),
                              adapters={self.exit_layer: adapter} if adapter is not None else {}))
        return out + [bind_pass(decode_with, "decode_with", config=config)]


def _can_retokenize(tokenizer) -> bool:
    """Does ``tokenizer`` turn ids into text and back (``decode``, and called on text)?"""
    return tokenizer is not None and callable(tokenizer) and callable(getattr(tokenizer, "decode", None))
