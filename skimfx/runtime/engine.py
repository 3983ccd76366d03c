"""Run a Program: ``extend`` (prefill / decode step) and ``generate``, around a ``KVCache``.

The stages of a Program are executed by the ``Executor`` (values flow between them by name). Every
stage receives ``ctx`` (a ``Ctx``): the lowered attention op calls ``ctx.attend``, which runs the
layer's KV policy (or the dense path): it writes the new k/v into the cache and attends over it.

A batch of prompts with different lengths is right-padded: causal attention never lets a real
token see the padding after it, the padding's k/v are written past each sequence's length (so the
next write overwrites them), and each sequence's logits are read at its own last token.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

from ..program import Program
from .cache import KVCache
from .context import Ctx
from .executor import Executor, Rerun
from .sampling import SamplingConfig, sample
from .stats import Generation, Stats


def extend(program: Program, cache: KVCache, input_ids: torch.Tensor, n_valid: list[int] | None = None,
           all_logits: bool = False, record: dict | None = None, record_kv: dict | None = None,
           reads: dict | None = None, moved: list[int] | None = None) -> torch.Tensor:
    """Feed T new tokens per sequence (``input_ids [B, T]``, right-padded to ``n_valid``).

    Returns the logits at each sequence's last real token, [B, V] (or [B, T, V] with
    ``all_logits``). Positions continue from ``cache.positions``. Token selection (the Program's
    ``select`` stages) runs when this is the first prefill of the cache and ``all_logits`` is off.
    ``record`` receives the kept token indices of each selection layer, ``record_kv`` the prompt
    slots each evicting layer kept, ``reads`` per layer [keys read, keys cached] of single-token steps,
    ``moved[0]`` the bytes copied from offloaded (host) KV to the device.
    """
    B, T = input_ids.shape
    n_valid = [T] * B if n_valid is None else list(n_valid)
    dev = input_ids.device
    position_ids = torch.tensor(cache.positions, device=dev)[:, None] + torch.arange(T, device=dev)[None]
    fresh = not all_logits and not any(cache.positions)        # the first prefill of a generation
    prune = bool(program.selections) and fresh and T > 1
    # GemFilter's first pass is thrown away (the re-run rebuilds the cache): no eviction in it
    rerun = prune and any(sel.mode == "rerun" for sel in program.selections.values())
    ctx = Ctx(cache, n_valid, program, prune=prune, compress=fresh and not rerun)
    executor = Executor(program)
    out = executor.forward(ctx, input_ids, position_ids, last_only=not all_logits)
    if record is not None:
        record.update(ctx.selected)
    if record_kv is not None:
        record_kv.update(ctx.kv_kept)
    if reads is not None:
        for layer, (r, c) in ctx.reads.items():
            acc = reads.setdefault(layer, [0, 0])
            acc[0] += r
            acc[1] += c
    if moved is not None:
        moved[0] += ctx.moved
    if isinstance(out, Rerun):
        # GemFilter: the kept token ids become the prompt, with fresh contiguous positions
        ids = torch.gather(input_ids, 1, out.index)
        cache.reset(headroom=cache.capacity(0) - T, tokens=ids.shape[1])
        K = ids.shape[1]
        ctx = Ctx(cache, out.kept, program, prune=False, compress=True)
        positions = torch.arange(K, device=dev)[None].expand(B, -1)
        out = executor.forward(ctx, ids, positions, last_only=True)
        cache.positions = list(ctx.n_valid)
        if record_kv is not None:
            record_kv.update(ctx.kv_kept)
        return out
    cache.positions = [p + n for p, n in zip(cache.positions, n_valid)]
    return out


def prefill(program: Program, cache: KVCache, prompts: list[list[int]], record: dict | None = None,
            record_kv: dict | None = None) -> torch.Tensor:
    """Prefill a batch of prompts of any lengths; returns the next-token logits [B, V].

    ``record`` / ``record_kv``, when given, receive the kept token indices of each selection layer /
    the kept prompt slots of each evicting layer."""
    ids = pad_right(prompts, cache.device)
    return extend(program, cache, ids, [len(p) for p in prompts], record=record, record_kv=record_kv)


def decode_step(program: Program, cache: KVCache, tokens: torch.Tensor, reads: dict | None = None,
                moved: list[int] | None = None) -> torch.Tensor:
    """One token per sequence (``tokens [B]``); returns the next-token logits [B, V]."""
    return extend(program, cache, tokens[:, None], reads=reads, moved=moved)


def pad_right(prompts: list[list[int]], device, pad_id: int = 0) -> torch.Tensor:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    return ids.to(device)


def plan_capacity(program: Program, prompt_len: int, max_new_tokens: int) -> list[int]:
    """Slots to allocate per layer: the tokens each layer will see in prefill, plus the new tokens.

    Layers after a PromptDistill selection only ever hold ``keep`` prompt tokens; for GemFilter the
    first pass needs layers 0..r only (the re-run reallocates every layer to the kept tokens).
    """
    L = program.info.num_layers
    tokens = [prompt_len] * L
    for sel in sorted(program.selections.values(), key=lambda s: s.layer):
        if prompt_len <= sel.keep:
            continue
        for layer in range(sel.layer + 1, L):
            tokens[layer] = 0 if sel.mode == "rerun" else min(tokens[layer], sel.keep)
    return [t + max_new_tokens for t in tokens]


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
        # imported here: the decoding package is built on this module's prefill and plan_capacity
        from .decoding import generate as decode

        return decode(program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback)
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
        from .static import CAPACITY_STEP

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
            from .static import StaticDecoder

            static = StaticDecoder.for_cache(program, cache, backend, cuda_graph=decode == "graph")
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
