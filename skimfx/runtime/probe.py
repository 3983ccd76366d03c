"""Probe forwards: tokens run through the whole model after a prompt, before some layers compress it.

A policy that scores the prompt by what the model does next (KVzip: the model reconstructs the prompt,
and each cached pair is scored by the attention the reconstruction gives it) asks for these forwards
with ``KVPolicy.probe_inputs``. Each forward starts right after each sequence's prompt (RoPE positions
continue from the prompt length), attends over the full, not yet compressed cache, and then every layer
forgets the probe's k/v (``KVCache.rewind``), so decoding continues exactly where the prompt ended. Layers
the probe grows past their capacity get the room for the probes only. Then the asking policies compress
(``after_probes``), in the prompt's prefill context (their kept slots land in its stats).
"""
from __future__ import annotations

import torch

from .cache import KVCache
from .context import Ctx
from .executor import Executor


def probe_prompt(executor: Executor, ctx: Ctx, ids: torch.Tensor, n: list[int]) -> None:
    """Run the probe forwards the cache's policies ask for after the prompt ``ids [B, T]`` (sequence b's
    first ``n[b]`` tokens, as prefilled into ``ctx.cache``), then let those policies compress."""
    cache = ctx.cache
    asked = {layer: pol.probe_inputs(ctx, ids, n) for layer, pol in sorted(cache.policies.items())}
    asked = {layer: rounds for layer, rounds in asked.items() if rounds is not None}
    if not asked:
        return
    layers = sorted(asked)
    rounds = asked[layers[0]]
    for layer in layers[1:]:
        if asked[layer] != rounds:
            # one forward serves every layer: the layers must agree on what it runs
            raise ValueError(f"layers {layers[0]} and {layer} ask for different probe forwards (different "
                             "reconstruction parameters); give every such layer the same parameters")
    if rounds:
        last = [int(t) for t in ids[torch.arange(len(n)), torch.tensor(n) - 1].tolist()]
        _run(executor, cache, rounds, list(n), last)
    for layer in layers:
        cache.policies[layer].after_probes(ctx)


def _run(executor: Executor, cache: KVCache, rounds: list[list[list[int]]], starts: list[int],
         placeholders: list[int]) -> None:
    dev = cache.device
    lengths = [list(cache.lengths(l)) for l in range(cache.num_layers)]
    longest = max(len(row) for rows in rounds for row in rows)
    capacity = [cache.capacity(l) for l in range(cache.num_layers)]
    grown = [l for l in range(cache.num_layers) if max(lengths[l]) + longest > capacity[l]]
    for l in grown:
        cache.resize(l, max(lengths[l]) + longest)
    try:
        for i, rows in enumerate(rounds):
            # a sequence that sits this forward out runs one placeholder token (its policy ignores it)
            rows = [row or [ph] for row, ph in zip(rows, placeholders)]
            n = [len(row) for row in rows]
            ids = torch.zeros(len(rows), max(n), dtype=torch.long)
            for b, row in enumerate(rows):
                ids[b, :len(row)] = torch.as_tensor(row, dtype=torch.long)
            ids = ids.to(dev)
            positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(max(n), device=dev)[None]
            pctx = Ctx(cache, n, executor.program)
            pctx.probe = i
            executor.forward(pctx, ids, positions, last_only=True)
            for l in range(cache.num_layers):
                cache.rewind(l, lengths[l])
    finally:
        for l in range(cache.num_layers):
            if list(cache.lengths(l)) != lengths[l]:
                cache.rewind(l, lengths[l])
        for l in grown:
            cache.resize(l, capacity[l])


__all__ = ["probe_prompt"]
