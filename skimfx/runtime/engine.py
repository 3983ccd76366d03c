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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..kernels import attention, sparse_attention, token_scores, topk_sentences, topk_tokens
from ..program import Program
from . import policies as P
from .cache import KVCache
from .sampling import SamplingConfig, sample
from .sentences import segment_batch


class Ctx:
    """Per-call state the lowered graph sees: the cache, how many of the T new tokens of each
    sequence are real (the rest is right padding), and whether selection stages run (a prefill
    of a fresh prompt) or are skipped (decode, or a full-logits forward)."""

    def __init__(self, cache: KVCache, n_valid: list[int], program: Program | None = None, prune: bool = False,
                 compress: bool = False):
        self.cache = cache
        self.n_valid = n_valid
        self.program = program
        self.prune = prune
        self.compress = compress        # evicting policies shrink the cache after this prefill
        self.kept: list[int] | None = None
        self.selected: dict[int, list[list[int]]] = {}   # layer -> kept token indices per sequence
        self._bounds: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.policies = program.policies if program is not None else {}
        # single-token steps: layer -> [keys read, keys cached] summed over sequences (attended fraction)
        self.reads: dict[int, list[int]] = {}
        self.delta_set: torch.Tensor | None = None       # DELTA: slots chosen by the last "select" layer
        self.kv_kept: dict[int, list[list[list[int]]]] = {}  # evicting layer -> [b][kv head] kept prompt slots
        self.sentence_ids: torch.Tensor | None = None    # [B, T] sentence of each token (sentence granularity)
        self.moved = 0                                   # bytes copied host -> device (offloaded KV)

    def select(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Score this prefill's tokens with the last queries of ``layer`` and pick the kept ones.

        q: [B, Hq, T, D]. The prompt started at slot 0 of every cache, so cache slot j of layer
        ``layer`` is token j of the current token axis. Returns index [B, K]; ``self.kept`` holds
        the kept count per sequence.
        """
        sel = self.program.selections[layer]
        lengths = self.cache.lengths(layer)
        dev = q.device
        w = max(1, min(sel.window, min(self.n_valid)))
        starts = torch.tensor([n - w for n in self.n_valid], device=dev)
        q_win = gather_tokens(q, 2, starts[:, None] + torch.arange(w, device=dev)[None])
        keys, _ = self.cache.view(layer, max(lengths))
        kv_len = torch.tensor(lengths, device=dev)
        scale = sel.scale if sel.scale is not None else self.program.attention[layer].scale
        scores = token_scores(q_win, keys, kv_len - w, kv_len, scale, softmax=sel.softmax, heads=sel.heads,
                              pool=sel.pool, pool_kernel=sel.pool_kernel)
        if sel.granularity == "sentence":
            index, self.kept = topk_sentences(scores, self.sentence_ids, sel.keep, self.n_valid, sel.keep_last,
                                              sel.sentence_reduce)
        else:
            index, self.kept = topk_tokens(scores, sel.keep, self.n_valid, sel.keep_last)
        return index

    def attend(self, layer: int, q, k, v, *, scale: float, window: int | None, softcap: float | None):
        pol = self.policies.get(layer)
        T = q.shape[2]
        if pol is not None and T == 1 and (pol.kind == "sparse" or pol.decode_evict):
            return self._attend_policy(pol, layer, q, k, v, scale, softcap)
        cache = self.cache
        starts = tuple(cache.lengths(layer))
        if pol is not None and pol.decode_evict and any(starts):
            raise ValueError(f"{pol.method}: a cache that evicts during decode takes one new token per step; "
                             f"extending it by {T} tokens at once is not supported (prefill the whole prompt)")
        if pol is not None and pol.offload and "centroid" in cache.meta[layer]:
            raise ValueError(f"{pol.method}: the prompt's KV was offloaded after prefill, so the cache takes one new "
                             f"token per step; extending it by {T} tokens at once is not supported (prefill the "
                             "whole prompt, or use offload=False)")
        bounds = self._bounds.get(starts)
        if bounds is None:  # layers with the same lengths (all of them, when dense) share these
            q_start = torch.tensor(starts, dtype=torch.long, device=q.device)
            bounds = self._bounds[starts] = (q_start, q_start + T)
        cache.write(layer, k, v)
        keys, values = cache.view(layer, max(starts) + T)
        out = attention(q, keys, values, bounds[0], bounds[1], scale, window, softcap)
        cache.advance(layer, self.n_valid)
        if T == 1:
            self._count(layer, cache.lengths(layer))
        if pol is not None and pol.method == "quest":
            P.quest_update_pages(pol, cache, layer, list(starts))
        elif pol is not None and pol.method == "sentencekv" and self.compress and T > 1:
            P.sentencekv_after_prefill(pol, cache, layer, self.sentence_ids)
        elif pol is not None and pol.kind == "evict" and self.compress and T > 1:   # the prompt is in: shrink it
            index = P.evict_after_prefill(pol, cache, layer, q, scale, self.sentence_ids)
            if index is not None:
                self.kv_kept[layer] = [[row[:n] for row in heads] for heads, n in
                                       zip(index.tolist(), cache.lengths(layer))]
        return out

    def _count(self, layer: int, read: list[int], cached: list[int] | None = None) -> None:
        r = self.reads.setdefault(layer, [0, 0])
        r[0] += sum(read)
        r[1] += sum(cached if cached is not None else read)

    def _attend_policy(self, pol, layer: int, q, k, v, scale: float, softcap: float | None):
        """A single-token step of an evicting-in-decode or sparse-read layer."""
        cache = self.cache
        if pol.kind == "evict":
            out = P.evict_decode(pol, cache, layer, q, k, v, scale, softcap, self.n_valid)
            self._count(layer, cache.lengths(layer))
            return out
        if pol.method == "sentencekv" and "centroid" in cache.meta[layer]:
            out, read, cached, moved = P.sentencekv_decode(pol, cache, layer, q, k, v, scale, softcap, self.n_valid)
            self._count(layer, read, cached)
            self.moved += moved
            return out
        old = list(cache.lengths(layer))
        cache.write(layer, k, v)
        cache.advance(layer, self.n_valid)
        lengths = cache.lengths(layer)
        kv_len = cache.lengths_tensor(layer)
        keys, values = cache.view(layer, max(lengths))
        budget = pol.tokens(max(lengths))
        if pol.method == "quest":
            P.quest_update_pages(pol, cache, layer, old)
            if max(lengths) > budget:
                index = P.quest_index(pol, cache, layer, q, budget)
                self._count(layer, [min(m, index.shape[-1]) for m in lengths], lengths)
                return sparse_attention(q[:, :, 0], keys, values, index, kv_len, scale, softcap)[:, :, None]
        elif pol.role == "select":
            self.delta_set = None
            if max(lengths) > budget + pol.recent:
                out, self.delta_set = P.delta_select(pol, q, keys, values, kv_len, scale, softcap, budget)
                self._count(layer, lengths)
                return out
        elif self.delta_set is not None:
            index = self.delta_set
            self._count(layer, [min(m, index.shape[-1]) for m in lengths], lengths)
            return sparse_attention(q[:, :, 0], keys, values, index, kv_len, scale, softcap)[:, :, None]
        self._count(layer, lengths)
        return attention(q, keys, values, kv_len - 1, kv_len, scale, None, softcap)


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


@dataclass
class Rerun:
    """A GemFilter selection: run the whole model again on these token indices [B, K]."""

    index: torch.Tensor
    kept: list[int]


def forward(program: Program, ctx: Ctx, input_ids: torch.Tensor, position_ids: torch.Tensor,
            last_only: bool = False) -> torch.Tensor | Rerun:
    """Run all stages; returns logits [B, T, V], or [B, V] at each sequence's last real token.

    A selection stage (``ctx.prune``) gathers every token-axis value that a later stage reads, so
    later layers run on the kept tokens; a GemFilter selection returns ``Rerun`` instead.
    """
    if program.stages is None:
        raise ValueError("the Program is not split into stages; run the split_layers pass")
    env = {"input_ids": input_ids, "position_ids": position_ids}
    stages = program.stages
    sentence_rules = [s for s in program.selections.values() if s.granularity == "sentence" and ctx.prune] + \
        [p for p in program.policies.values() if p.granularity == "sentence" and ctx.compress]
    if sentence_rules and input_ids.shape[1] > 1:
        if program.sentence_ends is None:
            raise ValueError("sentence-granular selection needs the tokenizer's sentence endings: compile with "
                             "skimfx.compile(model, recipe, tokenizer=tok)")
        ctx.sentence_ids = segment_batch(input_ids, ctx.n_valid, program.sentence_ends,
                                         min(s.max_sentence for s in sentence_rules))
    for i, st in enumerate(stages):
        args = [env[n] for n in st.inputs]
        if st.kind == "select":
            sel = program.selections[st.layer]
            if not ctx.prune:
                continue
            if max(ctx.n_valid) <= sel.keep:
                warnings.warn(f"{sel.method or 'selection'} at layer {sel.layer}: keep={sel.keep} >= prompt length "
                              f"{max(ctx.n_valid)}, so no tokens are pruned", stacklevel=3)
                continue
            (index,) = st.module(ctx, *args)
            ctx.selected[sel.layer] = [row[:k] for row, k in zip(index.tolist(), ctx.kept)]
            if sel.mode == "rerun":
                return Rerun(index, ctx.kept)
            later = {n for s in stages[i + 1:] for n in s.inputs}
            for name in later & env.keys():
                env[name] = gather_tokens(env[name], program.values[name].token_axis, index)
            if ctx.sentence_ids is not None:
                ctx.sentence_ids = torch.gather(ctx.sentence_ids, 1, index)
            if sel.truncate_earlier_kv:
                for layer in range(sel.layer + 1):
                    ctx.cache.compact(layer, index, ctx.kept)
            ctx.n_valid = ctx.kept
            continue
        if st.kind == "epilogue" and last_only:
            # only each sequence's last real token goes through the final norm and LM head
            last = torch.tensor(ctx.n_valid, device=input_ids.device)[:, None] - 1
            args = [gather_tokens(a, program.values[n].token_axis, last) for a, n in zip(args, st.inputs)]
        outs = st.module(ctx, *args)
        env.update(zip(st.outputs, outs))
    out = env[stages[-1].outputs[0]]
    return out[:, 0] if last_only else out


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
    out = forward(program, ctx, input_ids, position_ids, last_only=not all_logits)
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
        out = forward(program, ctx, ids, positions, last_only=True)
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


@dataclass
class Stats:
    """Measurements of one call. Decode throughput counts the tokens of sequences still running."""

    prompt_tokens: list[int]
    ttft_s: float = 0.0                 # prefill + first token
    decode_s: float = 0.0
    decode_tokens: int = 0
    kv_bytes: int = 0                   # physical bytes of the KV cache on the model's device
    kv_host_bytes: int = 0              # bytes of KV offloaded to host memory (SentenceKV)
    moved_bytes: int = 0                # bytes copied from offloaded KV during decode (host -> device on a GPU)
    kv_used_bytes: int = 0              # bytes of the filled slots
    kv_prefill_bytes: int = 0           # physical bytes of the KV cache right after prefill
    layer_tokens: list[int] = field(default_factory=list)  # prompt tokens each layer holds after prefill
    selected: dict[int, list[list[int]]] = field(default_factory=dict)  # selection layer -> kept indices
    kv_kept: dict[int, list[list[list[int]]]] = field(default_factory=dict)  # evicting layer -> [b][head] slots
    reads: dict[int, list[int]] = field(default_factory=dict)  # layer -> [keys read, keys cached] in decode
    decoding: Any = None                # what an early-exit / speculative decoding mode did (DecodeStats)

    @property
    def attended_fraction(self) -> float:
        """Keys read / keys cached over all layers and decode steps (1.0 when dense)."""
        r = sum(v[0] for v in self.reads.values())
        c = sum(v[1] for v in self.reads.values())
        return r / c if c else float("nan")

    def layer_attended_fraction(self) -> dict[int, float]:
        return {l: r / c for l, (r, c) in sorted(self.reads.items()) if c}

    @property
    def moved_bytes_per_token(self) -> float:
        """Bytes copied from offloaded KV per generated token (all layers)."""
        return self.moved_bytes / self.decode_tokens if self.decode_tokens else 0.0

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
    if program.decoding is not None:     # early exit / self-speculation: their own decode loop
        return program.decoding.generate(program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len,
                                         callback)
    info = program.info
    lens = [len(p) for p in prompts]
    capacity = max(lens) + max_new_tokens
    if max_cache_len is not None and capacity > max_cache_len:
        raise ValueError(
            f"the longest prompt has {max(lens)} tokens and max_new_tokens={max_new_tokens}: "
            f"{capacity} > max_cache_len={max_cache_len}; shorten the prompt or ask for fewer tokens")
    device = info.device
    cache = KVCache.for_program(program, len(prompts), plan_capacity(program, max(lens), max_new_tokens))
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
        while not all(done):
            logits = decode_step(program, cache, tok, reads=stats.reads, moved=moved)
            tok = sample(logits, sampling, gen)
            stats.decode_tokens += take(tok)
        _sync(device)
        stats.decode_s = time.perf_counter() - t1
    stats.kv_bytes = cache.nbytes()
    stats.kv_host_bytes = cache.host_bytes()
    stats.moved_bytes = moved[0]
    stats.kv_used_bytes = cache.used_bytes()
    return Generation(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts])
