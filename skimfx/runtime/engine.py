"""Generation: ``generate`` runs a prefill and then decode steps (eager, or the captured step of
``static.py``) around a ``KVCache``; decoding modes that run fewer layers per token go to ``decoding/``.

The steps themselves (``extend``, ``prefill``, ``decode_step``, ``plan_capacity``) are in ``steps.py``
and re-exported here.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..program import Program
from .cache import KVCache
from .decoding import generate as generate_with_decoder
from .sampling import SamplingConfig, sample
from .static import CAPACITY_STEP, StaticDecoder
from .stats import Generation, Stats
from .steps import decode_step, extend, pad_right, plan_capacity, prefill

__all__ = ["generate", "extend", "prefill", "decode_step", "pad_right", "plan_capacity", "DECODE_MODES",
           "Generation", "Stats"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DECODE_MODES = ("eager", "compiled", "graph")


def generate(program: Program, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
             stop_tokens: set[int] = frozenset(), max_cache_len: int | None = None,
             callback: Callable[[int, int], None] | None = None, decode: str = "eager",
             backend: str = "inductor") -> Generation:
    """Generate for a batch of token-id prompts (any lengths).

    ``callback(batch_index, token_id)`` is called for every token as soon as it is chosen.
    Stopping: a sequence stops after emitting a stop token (which is kept) or ``max_new_tokens``.
    ``decode``: "eager" runs each step through the interpreted Program (the reference path);
    "compiled" runs the captured step (``runtime/static.py``) under ``torch.compile(backend)``;
    "graph" also replays it as a CUDA graph (CUDA only). The prefill is the eager one in every mode.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if program.decoding is not None:     # early exit / self-speculation: the decoder registered for its mode
        return generate_with_decoder(program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len,
                                     callback)
    info = program.info
    lens = [len(p) for p in prompts]
    capacity = max(lens) + max_new_tokens
    if max_cache_len is not None and capacity > max_cache_len:
        raise ValueError(
            f"the longest prompt has {max(lens)} tokens and max_new_tokens={max_new_tokens}: "
            f"{capacity} > max_cache_len={max_cache_len}; shorten the prompt or ask for fewer tokens")
    device = info.device
    capacity = plan_capacity(program, max(lens), max_new_tokens)
    if decode != "eager":
        # a captured step is compiled per shape: round the capacities up so that calls share graphs
        capacity = [-(-c // CAPACITY_STEP) * CAPACITY_STEP for c in capacity]
    cache = KVCache.for_program(program, len(prompts), capacity)
    gen = torch.Generator(device=device)
    if sampling.seed is not None:
        gen.manual_seed(sampling.seed)
    stats = Stats(prompt_tokens=lens)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    reasons = ["length"] * len(prompts)

    def take(tok: torch.Tensor) -> int:
        n = 0
        for b, t in enumerate(tok.tolist()):
            if done[b]:
                continue
            out[b].append(t)
            n += 1
            if callback is not None:
                callback(b, t)
            if t in stop_tokens:
                done[b], reasons[b] = True, "stop"
            elif len(out[b]) >= max_new_tokens:
                done[b] = True
        return n

    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        logits = prefill(program, cache, prompts, record=stats.selected, record_kv=stats.kv_kept)
        tok = sample(logits, sampling, gen)
        take(tok)
        stats.ttft_s = time.perf_counter() - t0
        stats.kv_prefill_bytes = cache.nbytes()
        stats.layer_tokens = [max(cache.lengths(i)) for i in range(cache.num_layers)]
        t1 = time.perf_counter()
        moved = [0]
        if decode == "eager" or all(done):
            step = lambda t: decode_step(program, cache, t, reads=stats.reads, moved=moved)  # noqa: E731
            static = None
        else:
            static = StaticDecoder(program, cache, backend, cuda_graph=decode == "graph")
            step = static.step
        while not all(done):
            logits = step(tok)
            tok = sample(logits, sampling, gen)
            stats.decode_tokens += take(tok)
        if static is not None:
            static.finish(stats.reads)
        _sync(device)
        stats.decode_s = time.perf_counter() - t1
    stats.kv_bytes = cache.nbytes()
    stats.kv_host_bytes = cache.host_bytes()
    stats.moved_bytes = moved[0]
    stats.kv_used_bytes = cache.used_bytes()
    return Generation(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts])
