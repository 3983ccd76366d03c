"""DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads").

Only some heads need the whole context. Retrieval heads keep the full cache; streaming heads keep the
first ``sinks`` and the ``recent`` newest prompt tokens (an attention sink and a local window). Which KV
heads of a layer stream (``params.streaming``) comes from a calibration of how much each head needs
tokens outside its sinks and recent window (``calibrate/duo.py``). After prefill the layer is stored as
two head groups (``headwise.py``: full heads, streaming heads), so the streaming heads' memory is really
released. Decode appends to both groups (as kvpress's DuoAttentionPress; the paper also rolls the
streaming heads' window during decode).
"""
from __future__ import annotations

import torch

from .base import register
from .headwise import HeadwisePolicy


@register
class DuoAttention(HeadwisePolicy):
    name = "duo_attention"

    def after_prefill(self, ctx, q, scale: float) -> None:
        p, cache = self.params, ctx.cache
        n = list(cache.lengths(self.layer))
        H = cache.num_kv_heads
        window = p.sinks + p.recent
        streaming = [h in p.streaming for h in range(H)]
        if not any(streaming) or all(m <= window for m in n):
            return                                              # every head keeps everything
        if max(p.streaming) >= H:
            raise ValueError(f"duo_attention (layer {self.layer}): streaming heads {list(p.streaming)} are not "
                             f"KV heads of this {H}-KV-head model")
        dev = q.device
        S = max(n)
        j = torch.arange(S, device=dev)[None, None]
        nt = torch.tensor(n, device=dev)[:, None, None]
        local = (j < p.sinks) | (j >= nt - p.recent)                          # [B, 1, S]
        full = torch.tensor(streaming, device=dev)[None, :, None].logical_not()
        scores = (local | full).float().expand(len(n), H, S)
        counts = [[min(m, window) if s else m for s in streaming] for m in n]
        self.keep_per_head(ctx, scores, n, counts)
