"""Recipes: named, validated configurations that select and parameterise passes.

Each recipe is a dataclass validated in ``__post_init__`` (parameters alone) and in ``passes(info)``
(against the model: layer ranges). ``RECIPES`` maps a name to its class, so adding a method is one
small class.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from .passes.kv_policy import kv_policy
from .passes.prune_tokens import prune_tokens
from .program import CachePolicy, ModelInfo, Selection


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


def _sentence_ok(r) -> None:
    """``granularity``: "token" (the papers' rule) or "sentence": score each sentence by the max (or
    mean, ``sentence_reduce``) of its tokens' scores and keep whole sentences, best first, up to the
    budget; sentences are cut at ``max_sentence`` tokens. Needs the tokenizer at compile time."""
    if r.granularity not in ("token", "sentence"):
        raise RecipeError(f"granularity must be 'token' or 'sentence', got {r.granularity!r}")
    if r.sentence_reduce not in ("max", "mean"):
        raise RecipeError(f"sentence_reduce must be 'max' or 'mean', got {r.sentence_reduce!r}")
    if not isinstance(r.max_sentence, int) or r.max_sentence < 1:
        raise RecipeError(f"max_sentence must be a token count >= 1, got {r.max_sentence!r}")


def _sentence_fields(r) -> dict:
    return dict(granularity=r.granularity, sentence_reduce=r.sentence_reduce, max_sentence=r.max_sentence)


@dataclass(frozen=True)
class GemFilter(Recipe):
    """GemFilter (Shi et al., 2024, "Discovering the Gems in Early Layers"): run layers 0..``layer``,
    score every prompt token by the last query's attention logits q·Kᵀ (no softmax, no scaling)
    summed over heads, avg-pool kernel 5, keep the top ``keep`` (sorted, plus the last ``keep_last``
    tokens), then run the whole model on the kept token ids with fresh contiguous positions.
    ``granularity="sentence"`` keeps whole sentences instead (see ``_sentence_ok``)."""

    layer: int
    keep: int
    pool_kernel: int = 5
    keep_last: int = 8
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    name = "gemfilter"

    def __post_init__(self):
        _positive("keep", self.keep)
        _sentence_ok(self)
        if not isinstance(self.layer, int) or self.layer < 0:
            raise RecipeError(f"layer must be a layer index >= 0, got {self.layer!r}")
        if self.keep_last < 0 or self.keep_last > self.keep:
            raise RecipeError(f"keep_last must be in 0..keep ({self.keep}), got {self.keep_last}")

    def selections(self) -> list[Selection]:
        return [Selection(layer=self.layer, keep=self.keep, mode="rerun", window=1, softmax=False, heads="sum",
                          pool="avg" if self.pool_kernel > 1 else None, pool_kernel=self.pool_kernel, scale=1.0,
                          keep_last=self.keep_last, method="GemFilter", **_sentence_fields(self))]

    def passes(self, info: ModelInfo) -> list:
        return [_named(prune_tokens, "prune_tokens", selections=self.selections())]


@dataclass(frozen=True)
class PromptDistill(Recipe):
    """PromptDistill (Jin et al., 2025): at each selection layer r_i, score prompt tokens by the last
    token's q·Kᵀ/√d averaged over heads (optional avg-pool kernel 5), keep the top ``keep_i`` (sorted,
    plus the last ``keep_last``); layers after r_i run on the kept tokens with their original
    positions. ``truncate_earlier_kv`` also cuts the KV of layers <= r_i to the kept tokens.
    ``granularity="sentence"`` keeps whole sentences instead (see ``_sentence_ok``)."""

    layers: tuple[int, ...] | int
    keep: tuple[int, ...] | int
    truncate_earlier_kv: bool = False
    pool_kernel: int = 5
    keep_last: int = 8
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    name = "promptdistill"

    def __post_init__(self):
        _sentence_ok(self)
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
                          method="PromptDistill", **_sentence_fields(self))
                for r, k in zip(self.layers, self.keep)]

    def passes(self, info: ModelInfo) -> list:
        return [_named(prune_tokens, "prune_tokens", selections=self.selections())]


# ----------------------------------------------------------------------------------------------
# KV cache policies
# ----------------------------------------------------------------------------------------------
def _amount_ok(name: str, value, allow_zero: bool = False) -> None:
    """A token count (int) or a fraction of the prompt (float in (0, 1))."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{name} must be a token count (int) or a fraction of the prompt (float in (0, 1)), "
                          f"got {value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise RecipeError(f"{name} as a fraction must be in (0, 1), got {value}")
    if isinstance(value, int) and (value < 0 or (value == 0 and not allow_zero)):
        raise RecipeError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _layers_ok(layers) -> tuple[int, ...] | None:
    if layers is None:
        return None
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    if not layers or any(not isinstance(l, int) or l < 0 for l in layers):
        raise RecipeError(f"layers must be layer indices >= 0, got {list(layers)}")
    return layers


def _policy_layers(info: ModelInfo, layers: tuple[int, ...] | None, skip: int = 0) -> list[int]:
    """The layers a policy applies to: the given ones, or every full-attention layer from ``skip`` on
    (sliding-window layers already read a bounded window)."""
    if layers is not None:
        return list(layers)
    return [l for l in range(skip, info.num_layers) if info.sliding_window[l] is None]


def pyramid_budgets(budget: int | float, n: int, floor: int | float, beta: int = 20) -> list:
    """PyramidKV (Cai et al., 2024) per-layer budgets: an arithmetic ramp from the lowest layer (largest)
    to the highest (smallest) whose mean is ``budget``; ``floor`` (the always-kept tokens) is added to
    every layer and the top layer keeps ``(budget - floor) / beta`` more."""
    if n == 1:
        return [budget]
    free = budget - floor
    lo = free / beta
    hi = 2 * free - lo
    out = [floor + hi - i * (hi - lo) / (n - 1) for i in range(n)]
    return [max(1, int(round(b))) for b in out] if isinstance(budget, int) else [min(0.999, b) for b in out]


@dataclass(frozen=True)
class _KVRecipe(Recipe):
    """Shared by the cache-policy recipes: which layers, and PyramidKV budgets."""

    def _policies(self, info: ModelInfo, make, floor, skip: int = 0) -> dict[int, CachePolicy]:
        layers = _policy_layers(info, getattr(self, "layers", None), skip)
        budgets = (pyramid_budgets(self.budget_total, len(layers), floor) if getattr(self, "pyramid", False)
                   else [self.budget_total] * len(layers))
        return {l: make(b) for l, b in zip(layers, budgets)}

    def passes(self, info: ModelInfo) -> list:
        return [_named(kv_policy, "kv_policy", policies=self.policies(info))]


@dataclass(frozen=True)
class SnapKV(_KVRecipe):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): after
    prefill, each KV head keeps the ``budget`` prompt tokens that the last ``window`` queries attend to
    most (softmax attention summed over the window, mean over the GQA group, avg-pool ``pool_kernel``),
    the window itself always. ``pyramid``: PyramidKV per-layer budgets with the same total.
    ``granularity="sentence"``: each KV head keeps whole prompt sentences by their tokens' scores (see
    ``_sentence_ok``), topped up with the best single tokens so that every head keeps the budget."""

    budget: int | float
    window: int = 32
    pool_kernel: int = 5
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    name = "snapkv"

    def __post_init__(self):
        _amount_ok("budget", self.budget)
        _sentence_ok(self)
        _positive("window", self.window)
        if isinstance(self.budget, int) and self.window >= self.budget:
            raise RecipeError(f"window ({self.window}) must be smaller than budget ({self.budget})")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise RecipeError(f"pool_kernel must be odd and >= 1, got {self.pool_kernel}")
        object.__setattr__(self, "layers", _layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        floor = self.window if isinstance(self.budget, int) else 0.0
        return self._policies(info, lambda b: CachePolicy("snapkv", "evict", b, window=self.window,
                                                          pool_kernel=self.pool_kernel, **_sentence_fields(self)),
                              floor)


@dataclass(frozen=True)
class StreamingLLM(_KVRecipe):
    """StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"): keep
    the first ``sinks`` tokens and the ``recent`` newest; during decode the oldest non-sink token is
    evicted for each new one, so the cache stays at sinks + recent (``evict_during_decode=False``:
    compress the prompt only and let decode append, as kvpress's StreamingLLMPress does)."""

    recent: int | float
    sinks: int = 4
    evict_during_decode: bool = True
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    name = "streamingllm"

    def __post_init__(self):
        _amount_ok("recent", self.recent)
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise RecipeError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        object.__setattr__(self, "layers", _layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.recent + self.sinks if isinstance(self.recent, int) else self.recent

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        floor = self.sinks if isinstance(self.recent, int) else 0.0
        return self._policies(info, lambda b: CachePolicy("streamingllm", "evict", b, sinks=self.sinks,
                                                          decode_evict=self.evict_during_decode), floor)


@dataclass(frozen=True)
class H2O(_KVRecipe):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle"): every key's attention received from all
    queries so far is accumulated; each KV head keeps the ``heavy`` highest-scoring tokens plus the
    ``recent`` newest, after prefill and at every decode step (the lowest non-recent token is evicted
    for each new one). ``granularity="sentence"``: the prefill compression keeps whole prompt sentences
    by their tokens' accumulated scores (topped up with single tokens to the budget); decode-time
    eviction stays per token."""

    heavy: int | float
    recent: int | float
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    name = "h2o"

    def __post_init__(self):
        _amount_ok("heavy", self.heavy)
        _sentence_ok(self)
        _amount_ok("recent", self.recent)
        if type(self.heavy) is not type(self.recent):
            raise RecipeError(f"heavy and recent must both be token counts or both fractions, got "
                              f"{self.heavy!r} and {self.recent!r}")
        if isinstance(self.heavy, float) and self.heavy + self.recent >= 1.0:
            raise RecipeError(f"heavy + recent must be a fraction below 1, got {self.heavy + self.recent}")
        object.__setattr__(self, "layers", _layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.heavy + self.recent

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        return self._policies(info, lambda b: CachePolicy("h2o", "evict", b, recent=self.recent, decode_evict=True,
                                                          **_sentence_fields(self)), self.recent)


@dataclass(frozen=True)
class Quest(_KVRecipe):
    """Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"):
    the full cache stays; per page of ``page_size`` keys the channel-wise min/max is kept up to date,
    and each decode step reads the top pages by the bound Σ_i max(q_i·min_i, q_i·max_i), about
    ``token_budget`` tokens (the newest page always). The first ``dense_layers`` layers read everything."""

    token_budget: int | float
    page_size: int = 16
    dense_layers: int = 2
    name = "quest"

    def __post_init__(self):
        _amount_ok("token_budget", self.token_budget)
        _positive("page_size", self.page_size)
        if isinstance(self.token_budget, int) and self.token_budget < self.page_size:
            raise RecipeError(f"token_budget ({self.token_budget}) must be at least one page ({self.page_size})")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise RecipeError(f"dense_layers must be an integer >= 0, got {self.dense_layers!r}")

    @property
    def budget_total(self):
        return self.token_budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        if self.dense_layers >= info.num_layers:
            raise RecipeError(f"dense_layers={self.dense_layers} leaves no layer of this {info.num_layers}-layer "
                              "model to read sparsely")
        return self._policies(info, lambda b: CachePolicy("quest", "sparse", b, page_size=self.page_size),
                              0, skip=self.dense_layers)


@dataclass(frozen=True)
class Delta(_KVRecipe):
    """DELTA (dynamic layer-aware token attention): layers below ``full_layers`` attend densely; each
    layer in ``selection_layers`` attends densely and re-selects the ``budget`` tokens with the highest
    attention from the new query summed over all heads; the layers above it (until the next selection
    layer) read only that set plus the ``recent`` newest tokens. The full cache stays. Default
    selection layers: ``full_layers``, L/3 and 2L/3 (for a 30-layer model: layers 0-1 full, selection at
    2, 10 and 20, so 5 of 30 layers read the whole cache)."""

    budget: int | float
    full_layers: int = 2
    selection_layers: tuple[int, ...] | int | None = None
    recent: int = 32
    name = "delta"

    def __post_init__(self):
        _amount_ok("budget", self.budget)
        if not isinstance(self.full_layers, int) or self.full_layers < 0:
            raise RecipeError(f"full_layers must be an integer >= 0, got {self.full_layers!r}")
        _positive("recent", self.recent)
        sl = _layers_ok(self.selection_layers)
        if sl is not None:
            if list(sl) != sorted(set(sl)):
                raise RecipeError(f"selection_layers must be strictly increasing, got {list(sl)}")
            if sl[0] < self.full_layers:
                raise RecipeError(f"selection layers must be >= full_layers ({self.full_layers}), got {list(sl)}")
        object.__setattr__(self, "selection_layers", sl)

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        L = info.num_layers
        sel = self.selection_layers or (self.full_layers, max(self.full_layers, L // 3),
                                        max(self.full_layers, 2 * L // 3))
        sel = tuple(sorted(set(sel)))
        if sel[-1] >= L - 1:
            raise RecipeError(f"selection layer {sel[-1]} leaves no layer above it to read the selection "
                              f"(valid: {self.full_layers}..{L - 2} for this {L}-layer model)")
        out = {}
        for layer in range(sel[0], L):
            if info.sliding_window[layer] is not None:
                continue
            role = "select" if layer in sel else "reuse"
            out[layer] = CachePolicy("delta", "sparse", self.budget, recent=self.recent, role=role)
        return out


@dataclass(frozen=True)
class SentenceKV(_KVRecipe):
    """SentenceKV (sentence-level semantic KV caching): after prefill, each prompt sentence is summarised
    per KV head by its mean key (kept on the device); with ``offload`` the prompt's token KV moves to
    host memory (pinned when the cache is on a GPU) and only the first ``sinks`` and the last ``recent``
    prompt tokens stay on the device. Each decode step scores the sentences by the new query (summed over
    the GQA group) against their mean keys and attends to the best whole sentences up to ``budget``
    prompt tokens in all (sinks and recent included), plus every generated token. ``offload=False``
    keeps the cache on the device and reads the same set sparsely. Needs the tokenizer at compile
    time; sentences are cut at ``max_sentence`` tokens."""

    budget: int | float
    offload: bool = True
    sinks: int = 4
    recent: int = 16
    max_sentence: int = 64
    layers: tuple[int, ...] | int | None = None
    name = "sentencekv"

    def __post_init__(self):
        _amount_ok("budget", self.budget)
        for name in ("sinks", "recent"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RecipeError(f"{name} must be an integer >= 0, got {v!r}")
        if isinstance(self.budget, int) and self.budget <= self.sinks + self.recent:
            raise RecipeError(f"budget ({self.budget}) must exceed sinks + recent ({self.sinks + self.recent}): "
                              "the budget counts them")
        if not isinstance(self.offload, bool):
            raise RecipeError(f"offload must be true or false, got {self.offload!r}")
        if not isinstance(self.max_sentence, int) or self.max_sentence < 1:
            raise RecipeError(f"max_sentence must be a token count >= 1, got {self.max_sentence!r}")
        object.__setattr__(self, "layers", _layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        return self._policies(info, lambda b: CachePolicy("sentencekv", "sparse", b, sinks=self.sinks,
                                                          recent=self.recent, granularity="sentence",
                                                          max_sentence=self.max_sentence, offload=self.offload),
                              0)


# ----------------------------------------------------------------------------------------------
# Early exit and self-speculation
# ----------------------------------------------------------------------------------------------
def _calibration(cal):
    if cal is None:
        return None
    from .calibrate import ExitCalibration

    if isinstance(cal, ExitCalibration):
        return cal
    try:
        return ExitCalibration.load(cal)
    except (OSError, KeyError) as e:
        raise RecipeError(f"calibration must be an ExitCalibration or the path of one saved with .save(); "
                          f"loading {cal!r} failed: {e}") from None


def _skip_set(value) -> tuple[int, ...]:
    """Draft&Verify's skipped layers: indices, a SkipCalibration, or the path of a saved one."""
    from .calibrate import SkipCalibration

    if isinstance(value, (str, Path)):
        try:
            value = SkipCalibration.load(value)
        except (OSError, KeyError, TypeError) as e:
            raise RecipeError(f"skip_layers: loading a SkipCalibration from {value!r} failed: {e}") from None
    if isinstance(value, SkipCalibration):
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


def _decode_with(program, mode):
    """Record how generate decodes this Program (the last pass of the early-exit recipes)."""
    from .passes.early_exit import EarlyExitError

    if program.policies:
        raise EarlyExitError(f"{mode}: needs the full KV cache of every layer (tokens are rolled back or "
                             "filled in); remove the KV cache policy")
    if program.decoding is not None:
        raise EarlyExitError(f"one decoding mode at a time: already {program.decoding}")
    program.decoding = mode
    program.history.append(("decode_with", 1))
    return program


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
        layers = _layers_ok(self.layers)
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
        from .passes.early_exit import early_exit
        from .runtime.decoding import EarlyExitDecoding

        _exit_layers(info, self.layers)
        cal = _calibration(self.calibration)
        if cal is not None:
            missing = [l for l in self.layers if l not in cal.adapters]
            if missing:
                raise RecipeError(f"the calibration has no exit at layers {missing} (it has {list(cal.layers)})")
        adapters = {l: cal.adapters[l] for l in self.layers if cal.adapters[l] is not None} if cal else {}
        th = self.threshold or tuple(cal.threshold(l, self.target_agreement) for l in self.layers)
        mode = EarlyExitDecoding(tuple(zip(self.layers, th)))
        return [_named(early_exit, "early_exit", layers=self.layers, adapters=adapters),
                _named(_decode_with, "decode_with", mode=mode)]


DRAFT_SOURCES = ("lookahead", "exit", "skip")


@dataclass(frozen=True)
class SelfSpeculative(Recipe):
    """Lossless self-speculative decoding: ``draft`` = "lookahead" (n-gram drafts from the prompt and
    the text so far), "exit" (LayerSkip: the first ``exit_layer`` + 1 layers and an exit branch draft,
    the remaining layers verify), "skip" (Draft&Verify: the model without ``skip_layers`` drafts, the
    whole model verifies; ``skimfx.calibrate_skip`` chooses the layers), or several tried in order
    ("lookahead/exit": an n-gram draft when one is found, else the exit draft). Up to ``draft_tokens``
    drafts per step, verified in one pass; the output is the dense greedy output. ``adaptive``: the draft
    length follows acceptance (n-gram drafts start at ``draft_tokens``, model drafts at 2), and exit and
    skip drafting are switched off for a while when they measure slower than plain decoding.
    ``calibration``: adapters for the exit branch. ``skip_layers``: layer indices, or a
    ``SkipCalibration`` (or its saved path) whose chosen set is used."""

    draft: str | tuple[str, ...] = "lookahead"
    draft_tokens: int = 8
    exit_layer: int | None = None
    calibration: object = None
    adaptive: bool = True
    skip_layers: object = None
    name = "selfspeculative"

    def __post_init__(self):
        src = tuple(self.draft.split("/")) if isinstance(self.draft, str) else tuple(self.draft)
        if not src or any(s not in DRAFT_SOURCES for s in src) or len(set(src)) != len(src):
            raise RecipeError(f"draft must be one or more of {DRAFT_SOURCES} (e.g. 'lookahead/exit'), got "
                              f"{self.draft!r}")
        object.__setattr__(self, "draft", src)
        _positive("draft_tokens", self.draft_tokens)
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

    def passes(self, info: ModelInfo) -> list:
        from .passes.early_exit import early_exit
        from .runtime.decoding import SpeculativeDecoding

        if self.skip_layers is not None:
            bad = [l for l in self.skip_layers if l >= info.num_layers]
            if bad or len(self.skip_layers) >= info.num_layers:
                raise RecipeError(f"skip_layers {list(self.skip_layers)} do not fit this {info.num_layers}-layer "
                                  "model (indices 0..L-1, at least one layer kept)")
        mode = SpeculativeDecoding(self.draft, self.draft_tokens, self.exit_layer, self.adaptive,
                                   min_gain=1.0 if self.adaptive else 0.0, skip_layers=self.skip_layers or ())
        out = []
        if self.exit_layer is not None:
            _exit_layers(info, (self.exit_layer,))
            cal = _calibration(self.calibration)
            adapter = cal.adapters.get(self.exit_layer) if cal else None
            out.append(_named(early_exit, "early_exit", layers=(self.exit_layer,),
                              adapters={self.exit_layer: adapter} if adapter is not None else {}))
        return out + [_named(_decode_with, "decode_with", mode=mode)]


RECIPES: dict[str, type] = {cls.name: cls for cls in (Dense, GemFilter, PromptDistill, SnapKV, StreamingLLM, H2O,
                                                      Quest, Delta, SentenceKV, EarlyExit, SelfSpeculative)}



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
    policy = [r for r in out if isinstance(r, _KVRecipe)]
    if len(policy) > 1:
        raise RecipeError("one KV cache policy recipe at a time (" + ", ".join(r.name for r in policy) + " given); "
                          "restrict one to some layers with layers=... and compose in Python if needed")
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


__all__ = ["Recipe", "RecipeError", "Dense", "GemFilter", "PromptDistill", "SnapKV", "StreamingLLM", "H2O", "Quest",
           "Delta", "SentenceKV", "EarlyExit", "SelfSpeculative", "RECIPES", "parse_recipe", "recipe_label", "pyramid_budgets"]
