"""The generation loop shared by the decoding modes, the registry of decoders, and ``generate``."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ...program import DecodeConfig, Program
from ..cache import KVCache
from ..context import Ctx
from ..steps import plan_capacity, prefill
from ..executor import Executor
from ..sampling import SamplingConfig
from ..stats import DecodeStats, Generation, Stats


@dataclass
class DecodeState:
    """One sequence's decoding state; a decoder's own state extends it."""

    history: list[int]                                       # prompt + emitted tokens


class Decoder(Protocol):
    """A decoding mode: built from its config; ``step`` emits one or more tokens after ``tok``."""

    extra_slots: int      # cache slots a step writes past the last kept token

    def start(self, ex: Executor, cache: KVCache, history: list[int]) -> DecodeState: ...

    def step(self, ex: Executor, cache: KVCache, state: DecodeState, tok: int, ds: DecodeStats) -> list[int]: ...


def check_cache_room(prompts, max_new_tokens: int, max_cache_len: int | None) -> list[int]:
    """The prompts' lengths; raises when the longest prompt plus ``max_new_tokens`` exceeds the cache."""
    lens = [len(p) for p in prompts]
    if max_cache_len is not None and max(lens) + max_new_tokens > max_cache_len:
        raise ValueError(f"the longest prompt has {max(lens)} tokens and max_new_tokens={max_new_tokens}: "
                         f"{max(lens) + max_new_tokens} > max_cache_len={max_cache_len}; shorten the prompt or ask "
                         "for fewer tokens")
    return lens


DECODERS: dict[str, type[Decoder]] = {}     # DecodeConfig.mode -> decoder class (constructed from the config)


def register(config: type[DecodeConfig]):
    """Class decorator: the decoder for Programs whose ``decoding`` is a ``config``."""

    def add(cls: type) -> type:
        if config.mode in DECODERS:
            raise ValueError(f"decoding mode {config.mode!r} already has a decoder: {DECODERS[config.mode].__name__}")
        DECODERS[config.mode] = cls
        return cls

    return add


def step_env(ex: Executor, cache: KVCache, ids: list[int], start: int) -> tuple[Ctx, dict]:
    """A ``Ctx`` for ``len(ids)`` new tokens of the one sequence in ``cache``, and the prologue's
    environment for them at positions ``start``, ``start + 1``, ..."""
    ctx = Ctx(cache, [len(ids)], ex.program)
    dev = ex.program.info.device
    pos = torch.arange(start, start + len(ids), device=dev)[None]
    return ctx, ex.embed(ctx, torch.tensor([ids], device=dev), pos)


def next_token(ex: Executor, ctx: Ctx, env: dict) -> int:
    """The full model's greedy next token after the last of the step's tokens."""
    return int(ex.logits(ctx, env)[0, -1].argmax())


def generate(program: Program, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
             stop_tokens=frozenset(), max_cache_len: int | None = None,
             callback: Callable[[int, int], None] | None = None) -> Generation:
    """Generate with the decoder registered for ``program.decoding.mode``."""
    config = program.decoding
    if config is None:
        raise ValueError("the Program has no decoding mode (program.decoding is None): use engine.generate")
    cls = DECODERS.get(config.mode)
    if cls is None:
        raise ValueError(f"no decoder for decoding mode {config.mode!r} ({config}); known modes: {sorted(DECODERS)}")
    decoder = cls(config)
    if hasattr(decoder, "generate"):      # a mode that decodes a batch of its own (short-m@k's k chains)
        return decoder.generate(program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback)
    return decode_loop(decoder, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback)


def decode_loop(decoder: Decoder, program: Program, prompts: list[list[int]], max_new_tokens: int,
                sampling: SamplingConfig, stop_tokens, max_cache_len, callback) -> Generation:
    """Prefill each prompt (the ordinary prefill, with any pruning), then let ``decoder`` step until a
    stop token or ``max_new_tokens``; greedy, one sequence at a time."""
    if not sampling.greedy:
        raise ValueError(f"{type(decoder).__name__} decodes greedily (lossless verification and calibrated exits "
                         "compare argmax tokens); use temperature=0")
    lens = check_cache_room(prompts, max_new_tokens, max_cache_len)
    stats = Stats(prompt_tokens=lens)
    ds = DecodeStats()
    out, reasons = [], []
    ex = Executor(program)
    with torch.inference_mode():
        for b, prompt in enumerate(prompts):
            capacity = plan_capacity(program, len(prompt), max_new_tokens + decoder.extra_slots)
            cache = KVCache.for_program(program, 1, capacity)
            t0 = time.perf_counter()
            logits = prefill(program, cache, [prompt], record=stats.selected, record_kv=stats.kv_kept)
            tok = int(logits[0].argmax())
            stats.ttft_s += time.perf_counter() - t0
            stats.kv_prefill_bytes = max(stats.kv_prefill_bytes, cache.nbytes())
            seq, reason = [tok], "length"
            if callback is not None:
                callback(b, tok)
            t1 = time.perf_counter()
            state = decoder.start(ex, cache, list(prompt) + [tok])
            while tok not in stop_tokens and len(seq) < max_new_tokens:
                new = decoder.step(ex, cache, state, tok, ds)
                for t in new:
                    if len(seq) >= max_new_tokens:
                        break
                    seq.append(t)
                    state.history.append(t)
                    if callback is not None:
                        callback(b, t)
                    if t in stop_tokens:
                        break
                tok = seq[-1]
            if tok in stop_tokens:
                reason = "stop"
            stats.decode_s += time.perf_counter() - t1
            stats.decode_tokens += len(seq) - 1
            stats.kv_bytes = max(stats.kv_bytes, cache.nbytes())
            out.append(seq)
            reasons.append(reason)
    ds.layer_tokens += ex.layer_tokens
    ds.tokens = stats.decode_tokens
    stats.decoding = ds
    return Generation(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts])


__all__ = ["generate", "decode_loop", "DECODERS", "register", "Decoder", "DecodeState", "DecodeStats", "step_env",
           "next_token"]
