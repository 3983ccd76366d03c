"""The steps every loop is made of: ``extend`` (prefill / decode step), ``prefill``, ``decode_step``, and
how much cache a generation needs (``plan_capacity``).

A batch of prompts with different lengths is right-padded: causal attention never lets a real
token see the padding after it, the padding's k/v are written past each sequence's length (so the
next write overwrites them), and each sequence's logits are read at its own last token.
"""
from __future__ import annotations

import warnings

import torch

from ..program import Program
from .cache import KVCache
from .context import Ctx
from .executor import Executor, Rerun
from .probe import probe_prompt


def extend(program: Program, cache: KVCache, input_ids: torch.Tensor, n_valid: list[int] | None = None,
           all_logits: bool = False, record: dict | None = None, record_kv: dict | None = None,
           reads: dict | None = None, moved: list[int] | None = None) -> torch.Tensor:
    """Feed T new tokens per sequence (``input_ids [B, T]``, right-padded to ``n_valid``).

    Returns the logits at each sequence's last real token, [B, V] (or [B, T, V] with
    ``all_logits``). Positions continue from ``cache.positions``. Token selection (the Program's
    ``select`` stages) runs when this is the first prefill of the cache and ``all_logits`` is off.
    ``record`` receives the kept token indices of each selection layer, ``record_kv`` the prompt
    slots each evicting layer kept, ``reads`` per layer [keys read, keys cached] of single-token steps,
    ``moved[0]`` the bytes copied from offloaded (host) KV to the device. After the first prefill, the
    probe forwards that a KV policy asks for run before it compresses (``probe.py``: KVzip).
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
    if ctx.compress and not isinstance(out, Rerun):
        probe_prompt(executor, ctx, input_ids, n_valid)
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
        probe_prompt(executor, ctx, ids, ctx.n_valid)
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
        keep = sel.tokens(prompt_len)
        if prompt_len <= keep:
            continue
        for layer in range(sel.layer + 1, L):
            tokens[layer] = 0 if sel.mode == "rerun" else min(tokens[layer], keep)
    return [t + max_new_tokens for t in tokens]
