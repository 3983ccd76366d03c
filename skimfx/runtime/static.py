"""The captured decode step: one decode step of a Program as a pure tensor function of fixed-shape state.

The eager runtime decides shapes and loop bounds on the host (Python lists of lengths, ``max()`` over
them, per-layer dict look-ups): a step of a small model is then bound by Python, not by the device.
Here the whole step is one function of device tensors, traced once:

- state: the KV cache at its capacity (the ``KVCache``'s own buffers, written in place), the filled
  length of every layer and sequence (``lengths [L, B]``), the next position of every sequence
  (``positions [B]``), and each KV policy's typed state (page bounds, ...);
- every stage runs in order (selection stages are prefill-only); the lowered attention op calls
  ``StaticCtx.attend``, which writes the new k/v at each sequence's length and attends over the whole
  capacity with a length mask (no slicing to a host-known length), or hands the layer to its policy's
  ``static_decode`` (fixed-size selections: a budget is a constant of the compiled step, padding
  entries masked);
- no host syncs, no Python branches on tensor values: ``torch.compile(step, fullgraph=True,
  dynamic=False)`` traces it with zero graph breaks, and on CUDA the step can be replayed as a CUDA
  graph (the inputs copied into static buffers, one graph per batch size).

``StaticDecoder(program, cache)`` takes over a cache after an eager prefill; ``sync()`` writes the
lengths and positions back to the cache's host bookkeeping (for eager steps, rollback or stats).
Policies without a ``static_decode`` are refused with an error that names them.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

from ..kernels import attention_mask
from ..kernels._triton import use_triton
from ..program import Program
from .cache import KVCache


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor, scale: float,
                     window: int | None, softcap: float | None) -> torch.Tensor:
    """The T new queries of each sequence (q [B, Hq, T, D] at positions ``kv_len - T .. kv_len - 1``) over
    the first ``kv_len`` rows of ``k``/``v`` [B, Hkv, C, D], causally, as a fixed-shape computation over all
    C rows: the registered Triton op on CUDA (one node), a masked SDPA on CPU."""
    B, Hq, T, D = q.shape
    if use_triton(q):
        return torch.ops.skimfx.attention(q, k, v, kv_len - T, kv_len, scale, window, softcap)
    Hkv, C = k.shape[1], k.shape[2]
    g = Hq // Hkv
    mask = attention_mask(T, C, kv_len - T, kv_len, window)[:, :, None]          # [B, 1, 1, T, C]
    qg = q.float().view(B, Hkv, g, T, D)
    if T == 1 and softcap is None:                                               # one SDPA per KV head
        out = torch.nn.functional.scaled_dot_product_attention(qg[:, :, :, 0], k.float(), v.float(),
                                                               attn_mask=mask[:, :, :, 0], scale=scale)
        return out.reshape(B, Hq, 1, D).to(q.dtype)
    s = torch.einsum("bkgtd,bkcd->bkgtc", qg, k.float()) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    out = torch.einsum("bkgtc,bkcd->bkgtd", p, v.float())
    return out.reshape(B, Hq, T, D).to(q.dtype)


class StaticCtx:
    """What the lowered graph sees inside a captured step: the cache buffers and device lengths only."""

    def __init__(self, cache: KVCache, lengths: torch.Tensor):
        self.cache = cache
        self.lengths = lengths                      # [L, B] filled slots per layer and sequence

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write T new tokens per sequence (k/v [B, Hkv, T, D]) after each sequence's length; returns the
        new lengths [B]."""
        n = self.lengths[layer]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        T = k.shape[2]
        slots = n[:, None] + torch.arange(T, device=n.device)                       # [B, T]
        idx = slots[:, None, :, None].expand(-1, kc.shape[1], T, kc.shape[3])
        kc.scatter_(2, idx, k.to(kc.dtype))
        vc.scatter_(2, idx, v.to(vc.dtype))
        grown = n + T
        self.lengths[layer] = grown
        return grown

    def attend(self, layer: int, q, k, v, *, scale: float, window: int | None, softcap: float | None):
        policy = self.cache.policies.get(layer)
        if policy is not None and q.shape[2] > 1:
            raise NotImplementedError(f"layer {layer}: a captured step of {q.shape[2]} tokens (a verification) runs "
                                      f"dense layers only; {policy.name} reads one token per step")
        if policy is not None:
            return policy.static_decode(self, q, k, v, scale, softcap)
        return self.attend_dense(layer, q, k, v, scale, window, softcap)

    @staticmethod
    def attention(q, k, v, kv_len, scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
        return static_attention(q, k, v, kv_len, scale, window, softcap)

    def attend_dense(self, layer: int, q, k, v, scale: float, window: int | None, softcap: float | None):
        """Write the new token and attend over every filled slot of the layer."""
        kv_len = self.write(layer, k, v)
        return static_attention(q, self.cache.k[layer], self.cache.v[layer], kv_len, scale, window, softcap)

    def select(self, layer: int, q):
        raise RuntimeError("token selection runs at prefill only; the captured step has no selection stages")


_STEPS: dict[tuple[int, str | None], Callable] = {}
RECOMPILE_LIMIT = 64
CAPACITY_STEP = 256        # generate rounds a captured cache's capacity up to a multiple: shapes repeat


def step_function(program: Program, backend: str | None) -> Callable:
    """``step(cache, lengths, positions, tokens) -> logits [B, V]`` for ``program``: one decode step as a
    function of its state, compiled once per Program and backend (``torch.compile(fullgraph=True,
    dynamic=False)``; None: not compiled) and reused by every cache of the same shapes."""
    key = (id(program), backend)
    fn = _STEPS.get(key)
    if fn is not None:
        return fn
    stages = [s for s in program.stages if s.kind != "select"]       # selection runs at prefill only

    def step(cache: KVCache, lengths: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens[:, None] if tokens.dim() == 1 else tokens                        # [B, T]
        T = ids.shape[1]
        ctx = StaticCtx(cache, lengths)
        env = {"input_ids": ids, "position_ids": positions[:, None] + torch.arange(T, device=ids.device)}
        for st in stages:
            env.update(zip(st.outputs, st.module(ctx, *[env[n] for n in st.inputs])))
        positions += T
        logits = env[stages[-1].outputs[0]]
        return logits[:, 0] if tokens.dim() == 1 else logits

    if backend is not None:
        compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)

        def fn(*args):
            # one graph per shape (batch, capacities, tokens per step): more than dynamo's default of 8 per
            # function when one process serves many shapes; generate rounds capacities up (CAPACITY_STEP)
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(*args)
    else:
        fn = step
    _STEPS[key] = fn
    weakref.finalize(program, _STEPS.pop, key, None)
    return fn


class StaticDecoder:
    """Decode steps of ``program`` over ``cache`` (after its prefill) as one captured function.

    ``backend``: the ``torch.compile`` backend ("inductor", "eager", "aot_eager"), or None to run the same
    tensor function uncompiled (for reference). ``cuda_graph`` (CUDA only): record the compiled step once
    and replay it, the tokens copied into a static buffer. ``finish`` writes the device lengths and
    positions back to the cache's host bookkeeping and adds the keys read to a stats dict.
    """

    def __init__(self, program: Program, cache: KVCache, backend: str | None = "inductor", cuda_graph: bool = False):
        if program.stages is None:
            raise ValueError("the Program is not split into stages; run the split_layers pass")
        missing = sorted({type(p).__name__ for p in cache.policies.values() if not p.supports_static})
        if missing:
            raise NotImplementedError(f"the captured decode step does not run the KV policies {missing} (their "
                                      "decode-time eviction is host code); decode them with decode='eager'")
        if cuda_graph and cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {cache.device} (use decode='compiled')")
        self.program = program
        self.cache = cache
        dev = cache.device
        self.start = [list(cache.lengths(l)) for l in range(cache.num_layers)]
        self.lengths = torch.tensor(self.start, dtype=torch.long, device=dev)
        self.positions = torch.tensor(cache.positions, dtype=torch.long, device=dev)
        self.steps = 0
        for pol in cache.policies.values():
            pol.prepare_static(cache)
        self._fn = step_function(program, backend)
        self.cuda_graph = cuda_graph
        self._graph = None
        self._tokens = torch.zeros(cache.batch, dtype=torch.long, device=dev)
        self._logits = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence (``tokens [B]``) -> next-token logits [B, V]; or T tokens per sequence
        (``tokens [B, T]``: the last token and T - 1 drafts of a self-speculative verification, dense layers
        only) -> logits [B, T, V]. Each T is its own compiled graph (and CUDA graph)."""
        self.steps += 1
        if not self.cuda_graph or tokens.dim() == 2:
            return self._fn(self.cache, self.lengths, self.positions, tokens)
        self._tokens.copy_(tokens)
        if self._graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):                 # warm up (compiles, autotunes) outside the graph
                state = self._save_state()
                self._fn(self.cache, self.lengths, self.positions, self._tokens)
                self._restore_state(state)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):                # records the step; runs nothing
                self._logits = self._fn(self.cache, self.lengths, self.positions, self._tokens)
        self._graph.replay()
        return self._logits.clone()

    def _save_state(self):
        return self.lengths.clone(), self.positions.clone(), [p.static_state() for p in self.cache.policies.values()]

    def _restore_state(self, state) -> None:
        lengths, positions, pols = state
        self.lengths.copy_(lengths)
        self.positions.copy_(positions)
        for p, s in zip(self.cache.policies.values(), pols):
            p.restore_static_state(s)

    def finish(self, reads: dict | None = None) -> None:
        """Write the device lengths and positions back to the cache's host bookkeeping; add each layer's
        [keys read, keys cached] over the steps taken to ``reads`` (as the eager runtime counts them)."""
        for l, n in enumerate(self.lengths.tolist()):
            self.cache._lengths[l] = list(n)
            self.cache._lengths_dev[l] = None
        self.cache.positions = self.positions.tolist()
        if reads is None:
            return
        for l, start in enumerate(self.start):
            pol = self.cache.policies.get(l)
            acc = reads.setdefault(l, [0, 0])
            for s in range(1, self.steps + 1):
                for b, n0 in enumerate(start):
                    r, c = pol.static_count(n0 + s, b) if pol is not None else (n0 + s, n0 + s)
                    acc[0] += r
                    acc[1] += c


__all__ = ["StaticDecoder", "StaticCtx", "static_attention", "step_function"]
