"""Lossy early exit (CALM): exit at the first exit layer whose top-1 probability reaches its threshold.

KV policies compose: every token runs the layers up to its exit one at a time, as plain decoding does,
and the layers above get the k/v of the exited token through their policy's write path
(``Executor.fill_kv`` -> ``KVPolicy.fill``: appended, or written into an evicted slot), with no query at
those layers. A policy that needs a query to place a token (TOVA's decode eviction, DuoAttention's rolling
streaming heads) is refused above the lowest exit (``CachePolicy.fill_conflict``)."""
from __future__ import annotations

from ...program import EarlyExitConfig
from ..cache import KVCache
from ..executor import Executor
from ..stats import DecodeStats
from .loop import DecodeState, next_token, register, step_env


@register(EarlyExitConfig)
class EarlyExitDecoder:
    """Exit at the first exit layer whose top-1 probability reaches its threshold: the token is
    emitted, the layers above get the k/v of the exited hidden state (``program.kv_fill``), and the
    step ends; no exit reaches its threshold -> the full model's token."""

    extra_slots = 1

    def __init__(self, config: EarlyExitConfig):
        self.config = config
        self.thresholds = config.thresholds                 # (layer, threshold), ascending layers

    def __str__(self) -> str:
        return str(self.config)

    def start(self, ex: Executor, cache: KVCache, history: list[int]) -> DecodeState:
        lowest = self.thresholds[0][0]
        for layer, pol in sorted(cache.policies.items()):
            why = pol.params.fill_conflict() if layer > lowest else None
            if why is not None:
                raise ValueError(f"{self.config}: layer {layer} lies above the lowest exit ({lowest}): {why}")
        return DecodeState(history)

    def step(self, ex: Executor, cache: KVCache, state: DecodeState, tok: int, ds: DecodeStats) -> list[int]:
        pos = cache.positions[0]
        ctx, env = step_env(ex, cache, [tok], pos)
        done = 0
        for layer, thr in self.thresholds:
            ex.run_layers(ctx, env, done, layer + 1)
            done = layer + 1
            top, prob, _ = ex.exit(ctx, env, layer)
            if float(prob[-1]) >= thr:
                ex.fill_kv(ctx, env, layer)
                cache.positions = [pos + 1]
                ds.exits[layer] = ds.exits.get(layer, 0) + 1
                return [int(top[-1])]
        L = ex.num_layers
        ex.run_layers(ctx, env, done, L)
        cache.positions = [pos + 1]
        ds.exits[L - 1] = ds.exits.get(L - 1, 0) + 1
        return [next_token(ex, ctx, env)]


__all__ = ["EarlyExitDecoder"]
