"""Lossy early exit (CALM): exit at the first exit layer whose top-1 probability reaches its threshold.

A KV policy may sit on layers at or below the lowest exit: every token runs those layers one at a
time, as plain decoding does. Layers above it get the k/v of exited tokens written directly
(``Executor.fill_kv``), which no policy sees, so policies there are refused."""
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
        above = sorted(l for l in cache.policies if l > lowest)
        if above:
            raise ValueError(f"{self.config}: layers {above} carry a KV cache policy above the lowest exit ({lowest}); "
                             "a token that exits gets those layers' k/v written past the policy")
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
