"""Run a Program: ``extend`` (prefill / decode step) and ``generate``, around a ``KVCache``.

The stages of a Program are executed in order; values flow between them by name through an
environment dict. Every stage receives ``ctx`` (a ``Ctx``): the lowered attention op calls
``ctx.attend``, which writes the new k/v into the cache and attends over it.

A batch of prompts with different lengths is right-padded: causal attention never lets a real
token see the padding after it, the padding's k/v are written past each sequence's length (so the
next write overwrites them), and each sequence's logits are read at its own last token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels import attention
from ..program import Program
from .cache import KVCache
from .sampling import SamplingConfig, sample


class Ctx:
    """Per-call state the lowered graph sees: the cache and how many of the T new tokens of each
    sequence are real (the rest is right padding)."""

    def __init__(self, cache: KVCache, n_valid: list[int]):
        self.cache = cache
        self.n_valid = n_valid
        self._bounds: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer: int, q, k, v, *, scale: float, window: int | None, softcap: float | None):
        cache = self.cache
        T = q.shape[2]
        starts = tuple(cache.lengths(layer))
        bounds = self._bounds.get(starts)
        if bounds is None:  # layers with the same lengths (all of them, when dense) share these
            q_start = torch.tensor(starts, dtype=torch.long, device=q.device)
            bounds = self._bounds[starts] = (q_start, q_start + T)
        cache.write(layer, k, v)
        keys, values = cache.view(layer, max(starts) + T)
        out = attention(q, keys, values, bounds[0], bounds[1], scale, window, softcap)
        cache.advance(layer, self.n_valid)
        return out


def gather_tokens(x: torch.Tensor, axis: int | None, index: torch.Tensor) -> torch.Tensor:
    """Select tokens ``index [B, K]`` along ``axis`` of ``x`` (batch on dim 0); no-op without an axis."""
    if axis is None:
        return x
    B, K = index.shape
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    view = [B] + [1] * (x.dim() - 1)
    view[axis] = K
    shape = list(x.shape)
    shape[axis] = K
    return torch.gather(x, axis, index.view(view).expand(shape))


def forward(program: Program, ctx: Ctx, input_ids: torch.Tensor, position_ids: torch.Tensor,
            logits_index: torch.Tensor | None = None) -> torch.Tensor:
    """Run all stages; returns logits [B, T, V], or [B, K, V] at ``logits_index [B, K]``."""
    if program.stages is None:
        raise ValueError("the Program is not split into stages; run the split_layers pass")
    env = {"input_ids": input_ids, "position_ids": position_ids}
    for st in program.stages:
        args = [env[n] for n in st.inputs]
        if st.kind == "epilogue" and logits_index is not None:
            # only the rows whose logits are wanted go through the final norm and LM head
            args = [gather_tokens(a, program.values[n].token_axis, logits_index) for a, n in zip(args, st.inputs)]
        outs = st.module(ctx, *args)
        env.update(zip(st.outputs, outs))
    return env[program.stages[-1].outputs[0]]


def extend(program: Program, cache: KVCache, input_ids: torch.Tensor, n_valid: list[int] | None = None,
           all_logits: bool = False) -> torch.Tensor:
    """Feed T new tokens per sequence (``input_ids [B, T]``, right-padded to ``n_valid``).

    Returns the logits at each sequence's last real token, [B, V] (or [B, T, V] with
    ``all_logits``). Positions continue from ``cache.positions``.
    """
    B, T = input_ids.shape
    n_valid = [T] * B if n_valid is None else list(n_valid)
    dev = input_ids.device
    position_ids = torch.tensor(cache.positions, device=dev)[:, None] + torch.arange(T, device=dev)[None]
    ctx = Ctx(cache, n_valid)
    index = None if all_logits else torch.tensor(n_valid, device=dev)[:, None] - 1
    logits = forward(program, ctx, input_ids, position_ids, index)
    cache.positions = [p + n for p, n in zip(cache.positions, n_valid)]
    return logits if all_logits else logits[:, 0]


def prefill(program: Program, cache: KVCache, prompts: list[list[int]]) -> torch.Tensor:
    """Prefill a batch of prompts of any lengths; returns the next-token logits [B, V]."""
    ids = pad_right(prompts, cache.device)
    return extend(program, cache, ids, [len(p) for p in prompts])


def decode_step(program: Program, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token per sequence (``tokens [B]``); returns the next-token logits [B, V]."""
    return extend(program, cache, tokens[:, None])


def pad_right(prompts: list[list[int]], device, pad_id: int = 0) -> torch.Tensor:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    return ids.to(device)


@dataclass
class Stats:
    """Measurements of one call. Decode throughput counts the tokens of sequences still running."""

    prompt_tokens: list[int]
    ttft_s: float = 0.0                 # prefill + first token
    decode_s: float = 0.0
    decode_tokens: int = 0
    kv_bytes: int = 0                   # physical bytes of the KV cache
    kv_used_bytes: int = 0              # bytes of the filled slots

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def __str__(self) -> str:
        return (f"prompt {sum(self.prompt_tokens)} tok, TTFT {self.ttft_s * 1e3:.0f} ms, decode "
                f"{self.decode_tokens_per_s:.1f} tok/s, KV {self.kv_bytes / 2**20:.1f} MiB")


@dataclass
class Generation:
    """New tokens per prompt (prompt not included), why each stopped, and the stats."""

    tokens: list[list[int]]
    finish_reasons: list[str]           # "stop" (a stop token) or "length"
    stats: Stats
    prompts: list[list[int]] = field(default_factory=list)

    @property
    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(program: Program, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
             stop_tokens: set[int] = frozenset(), max_cache_len: int | None = None,
             callback: Callable[[int, int], None] | None = None) -> Generation:
    """Generate for a batch of token-id prompts (any lengths).

    ``callback(batch_index, token_id)`` is called for every token as soon as it is chosen.
    Stopping: a sequence stops after emitting a stop token (which is kept) or ``max_new_tokens``.
    """
    info = program.info
    lens = [len(p) for p in prompts]
    capacity = max(lens) + max_new_tokens
    if max_cache_len is not None and capacity > max_cache_len:
        raise ValueError(
            f"the longest prompt has {max(lens)} tokens and max_new_tokens={max_new_tokens}: "
            f"{capacity} > max_cache_len={max_cache_len}; shorten the prompt or ask for fewer tokens")
    device = info.device
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
        logits = prefill(program, cache, prompts)
        tok = sample(logits, sampling, gen)
        take(tok)
        stats.ttft_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        while not all(done):
            logits = decode_step(program, cache, tok)
            tok = sample(logits, sampling, gen)
            stats.decode_tokens += take(tok)
        _sync(device)
        stats.decode_s = time.perf_counter() - t1
    stats.kv_bytes = cache.nbytes()
    stats.kv_used_bytes = cache.used_bytes()
    return Generation(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts])
