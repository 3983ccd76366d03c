"""DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads").

Only some heads need the whole context. Retrieval heads keep the full cache; streaming heads keep the
first ``sinks`` and the ``recent`` newest tokens (an attention sink and a local window). Which KV heads of
a layer stream (``params.streaming``) comes from a calibration of how much each head needs tokens outside
its window (``calibrate/duo.py``). After prefill the layer is stored as two head groups (``headwise.py``:
retrieval heads, streaming heads), so the streaming heads' memory is really released.

During decode (``decode_evict``, the paper's rule) the streaming group stays at ``sinks + recent`` slots:
once full, each new token overwrites the oldest non-sink token (its slots form a ring after the sinks), so
a streaming head's query reads the sinks and the ``recent`` newest tokens, itself included, and its memory
stays constant however long the generation; retrieval heads append. ``decode_evict=False`` appends to both
groups (as kvpress's DuoAttentionPress, which compresses the prompt only). The prefill itself is dense for
every head (as kvpress; the paper also runs streaming heads' prefill with the window).
"""
from __future__ import annotations

import torch

from ...kernels import attention
from .base import register
from .headwise import HeadwisePolicy


@register
class DuoAttention(HeadwisePolicy):
    name = "duo_attention"

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        self.roll: list[int] | None = None        # per sequence: the next ring slot past the sinks (decode_evict)

    @property
    def window(self) -> int:
        return self.params.sinks + self.params.recent

    def _groups(self, H: int) -> list[tuple[int, ...]]:
        if max(self.params.streaming) >= H:
            raise ValueError(f"duo_attention (layer {self.layer}): streaming heads {list(self.params.streaming)} are "
                             f"not KV heads of this {H}-KV-head model")
        full = tuple(h for h in range(H) if h not in self.params.streaming)
        return [g for g in (full, tuple(self.params.streaming)) if g]

    def split(self, ctx, n: list[int]) -> None:
        """Keep every head's window (streaming) or everything (retrieval) of the ``n[b]`` cached tokens and
        store the layer as the two groups; with decode eviction the streaming group is sized to its window."""
        p, cache = self.params, ctx.cache
        H = cache.num_kv_heads
        groups = self._groups(H)
        dev = cache.device
        S = max(n)
        j = torch.arange(S, device=dev)[None, None]
        nt = torch.tensor(n, device=dev)[:, None, None]
        local = (j < p.sinks) | (j >= nt - p.recent)                              # [B, 1, S]
        full = torch.tensor([h not in p.streaming for h in range(H)], device=dev)[None, :, None]
        scores = (local | full).float().expand(len(n), H, S)
        counts = [[min(m, self.window) if h in p.streaming else m for h in range(H)] for m in n]
        room = cache.capacity(self.layer) - S
        if p.decode_evict:        # the streaming group never holds more than its window
            rooms = [self.window - min(S, self.window) if g == tuple(p.streaming) else room for g in groups]
        else:
            rooms = room
        self.keep_per_head(ctx, scores, n, counts, groups, rooms)
        self.roll = [0] * len(n)

    def after_prefill(self, ctx, q, scale: float) -> None:
        n = list(ctx.cache.lengths(self.layer))
        if not self.params.streaming or (all(m <= self.window for m in n) and not self.params.decode_evict):
            return                                              # every head keeps everything, now and later
        self.split(ctx, n)

    # -- decode: the streaming group rolls -------------------------------------------------------------
    def check_extend(self, ctx, T: int) -> None:
        if self.params.decode_evict and ctx.cache.is_split(self.layer):
            raise ValueError(f"{self.name}: streaming heads that roll their window during decode take one new token "
                             f"per step; extending by {T} tokens at once is not supported (prefill the whole prompt, "
                             "or evict_during_decode=false)")

    def decode(self, ctx, q, k, v, scale, softcap):
        p, cache, layer = self.params, ctx.cache, self.layer
        if not p.decode_evict or not p.streaming:
            return super().decode(ctx, q, k, v, scale, softcap)
        if not cache.is_split(layer):                          # a one-token prompt: nothing was prefilled
            self.split(ctx, list(cache.lengths(layer)))
        G = q.shape[1] // cache.num_kv_heads
        stream = tuple(p.streaming)
        out = torch.empty_like(q)
        for gi, g in enumerate(cache.groups[layer]):
            held = list(g.lengths)
            if g.heads == stream:
                slots = [m if m < self.window else p.sinks + r for m, r in zip(held, self.roll)]
                self.roll = [(r + 1) % p.recent if m >= self.window else r for m, r in zip(held, self.roll)]
                new = [min(m + c, self.window) for m, c in zip(held, ctx.n_valid)]
            else:
                slots, new = held, [m + c for m, c in zip(held, ctx.n_valid)]
            heads = torch.tensor(g.heads, device=q.device)
            idx = torch.tensor(slots, device=q.device)[:, None, None, None].expand(-1, len(g.heads), 1, cache.head_dim)
            g.k.scatter_(2, idx, k.index_select(1, heads).to(g.k.dtype))
            g.v.scatter_(2, idx, v.index_select(1, heads).to(g.v.dtype))
            cache.set_group_lengths(layer, gi, new)
            qh = torch.tensor([h * G + i for h in g.heads for i in range(G)], device=q.device)
            kv_len = torch.tensor(new, device=q.device)
            top = max(new)
            # after a roll the slots are not in age order; the query sees every held slot (kv_len - 1 = itself)
            out[:, qh] = attention(q.index_select(1, qh), g.k[:, :, :top], g.v[:, :, :top], kv_len - 1, kv_len, scale,
                                   None, softcap)
        self._count_reads(ctx)
        return out
