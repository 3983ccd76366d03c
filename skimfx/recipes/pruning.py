"""Prefill token pruning recipes: later layers see only the prompt tokens that matter (GemFilter,
PromptDistill), at token or sentence granularity. Each contributes ``prune_tokens`` with its
``Selection`` rule."""
from __future__ import annotations

from dataclasses import dataclass

from ..passes.prune_tokens import prune_tokens
from ..program import ModelInfo, Selection
from .base import Recipe, RecipeError, amount_ok, bind_pass, sentence_fields, sentence_ok


@dataclass(frozen=True)
class GemFilter(Recipe):
    """GemFilter (Shi et al., 2024, "Discovering the Gems in Early Layers"): run layers 0..``layer``,
    score every prompt token by the last query's attention logits q·Kᵀ (no softmax, no scaling)
    summed over heads, avg-pool kernel 5, keep the top ``keep`` (tokens, or a fraction of the prompt; sorted,
    plus the last ``keep_last`` tokens), then run the whole model on the kept token ids with fresh
    contiguous positions.
    ``granularity="sentence"`` keeps whole sentences instead (see ``base.sentence_ok``)."""

    layer: int
    keep: int | float
    pool_kernel: int = 5
    keep_last: int = 8
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    name = "gemfilter"

    def __post_init__(self):
        amount_ok("keep", self.keep)
        sentence_ok(self)
        if not isinstance(self.layer, int) or self.layer < 0:
            raise RecipeError(f"layer must be a layer index >= 0, got {self.layer!r}")
        if self.keep_last < 0 or (isinstance(self.keep, int) and self.keep_last > self.keep):
            raise RecipeError(f"keep_last must be in 0..keep ({self.keep}), got {self.keep_last}")

    def selections(self) -> list[Selection]:
        return [Selection(layer=self.layer, keep=self.keep, mode="rerun", window=1, softmax=False, heads="sum",
                          pool="avg" if self.pool_kernel > 1 else None, pool_kernel=self.pool_kernel, scale=1.0,
                          keep_last=self.keep_last, method="GemFilter", **sentence_fields(self))]

    def passes(self, info: ModelInfo) -> list:
        return [bind_pass(prune_tokens, "prune_tokens", selections=self.selections())]


@dataclass(frozen=True)
class PromptDistill(Recipe):
    """PromptDistill (Jin et al., 2025): at each selection layer r_i, score prompt tokens by the last
    token's q·Kᵀ/√d averaged over heads (optional avg-pool kernel 5), keep the top ``keep_i`` (tokens, or a
    fraction of the prompt as given: ``keep=0.25/0.1``, or ``25%/10%`` in a recipe string; sorted, plus the
    last ``keep_last``); layers after r_i run on the kept tokens with their original
    positions. ``truncate_earlier_kv`` also cuts the KV of layers <= r_i to the kept tokens.
    ``granularity="sentence"`` keeps whole sentences instead (see ``base.sentence_ok``).

    Beyond the paper (defaults keep its rule): ``window`` scores with the last ``window`` queries instead
    of the last one, ``softmax`` normalises each query's scores first (SnapKV's observation window), and
    ``heads`` aggregates over heads by "mean" (the paper), "sum" or "max". Which layer selects matters
    more than these: ``bench/selection_layer.py`` shows, per layer, where a needle ranks under each rule."""

    layers: tuple[int, ...] | int
    keep: tuple[int | float, ...] | int | float
    truncate_earlier_kv: bool = False
    pool_kernel: int = 5
    keep_last: int = 8
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    window: int = 1
    softmax: bool = False
    heads: str = "mean"
    name = "promptdistill"

    def __post_init__(self):
        sentence_ok(self)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise RecipeError(f"window is the number of last queries that score the prompt (an int >= 1), "
                              f"got {self.window!r}")
        if not isinstance(self.softmax, bool):
            raise RecipeError(f"softmax must be true or false, got {self.softmax!r}")
        if self.heads not in ("mean", "sum", "max"):
            raise RecipeError(f"heads must be 'mean', 'sum' or 'max', got {self.heads!r}")
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        keep = (self.keep,) if isinstance(self.keep, (int, float)) else tuple(self.keep)
        if any(isinstance(k, bool) or not isinstance(k, (int, float)) for k in keep):
            raise RecipeError(f"keep is, per selection layer, a number of prompt tokens (int) or a fraction of the "
                              f"prompt (float in (0, 1)), got {self.keep!r}")
        if not layers:
            raise RecipeError("layers must name at least one selection layer")
        if len(keep) == 1 and len(layers) > 1:
            keep = keep * len(layers)
        if len(keep) != len(layers):
            raise RecipeError(f"give one keep per selection layer: layers={list(layers)}, keep={list(keep)}")
        for k in keep:
            amount_ok("keep", k)
        if any(not isinstance(r, int) or r < 0 for r in layers):
            raise RecipeError(f"layers must be layer indices >= 0, got {list(layers)}")
        counts = [k for k in keep if isinstance(k, int)]
        if self.keep_last < 0 or (counts and self.keep_last > min(counts)):
            raise RecipeError(f"keep_last must be in 0..min(keep) ({min(counts)}), got {self.keep_last}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", keep)

    def selections(self) -> list[Selection]:
        return [Selection(layer=r, keep=k, mode="continue", window=self.window, softmax=self.softmax, heads=self.heads,
                          pool="avg" if self.pool_kernel > 1 else None, pool_kernel=self.pool_kernel, scale=None,
                          keep_last=self.keep_last, truncate_earlier_kv=self.truncate_earlier_kv,
                          method="PromptDistill", **sentence_fields(self))
                for r, k in zip(self.layers, self.keep)]

    def passes(self, info: ModelInfo) -> list:
        return [bind_pass(prune_tokens, "prune_tokens", selections=self.selections())]
