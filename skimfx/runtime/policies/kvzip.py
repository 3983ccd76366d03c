"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction").

A cached KV pair is worth what the model needs it for to reproduce the context, whatever the question
will be. After prefill the model reconstructs the prompt: the prompt (after a chat template's header
``header_ids``, when it starts with one) is cut into chunks of ``chunk`` tokens, and for each chunk one
forward over the full cache runs, right after the prompt: the instruction (``prompt_ids`` for the first
chunk, KVzip's "Repeat the previous context exactly."; ``repeat_ids`` for the others, "Repeat the part
of the previous context exactly, starting with", then the last ``overlap`` tokens before the chunk),
the template's ``suffix_ids`` (the end of the user turn and the start of the assistant's), then the
chunk itself, teacher-forced. The header is not reconstructed: its pairs score 0 (the sinks aside), as
in KVzip's reference code (and kvpress's KVzipPress). The score of a cached pair is the
largest softmax attention it receives from those reconstruction queries, over the queries and the query
heads of its GQA group (per layer and KV head). The first ``sinks`` tokens are always kept; each KV head
keeps its ``budget`` best pairs. The reconstruction's own k/v are discarded (decoding continues at the
prompt's end), and decode appends to the compacted cache.

``scope``: which pairs a reconstruction query scores, and over which keys its softmax runs.
- "chunk" (KVzip's chunked scoring, as in its reference implementation): the reconstruction of a chunk
  scores that chunk's cached pairs only, with the softmax over the sinks, the chunk's cached keys and
  the reconstruction's own keys (causal); the forward itself attends over the whole cache.
- "full": every reconstruction query scores every cached pair with the softmax the forward uses (the
  whole cache and the reconstruction so far); a pair's score is its maximum over all chunks.
- "local" (cheaper): as "chunk", and the reconstruction's attention itself reads only the sinks, its
  chunk's cached keys and its own keys, so a reconstruction query attends to about ``sinks + chunk +
  len(prompt_ids) + overlap + chunk`` keys instead of the whole prompt (attention cost O(n * chunk)
  instead of O(n^2)); the scores are exactly the attention the forward used. The hidden states of later
  layers then follow a chunk-local reconstruction instead of a full-context one.

Alone, every KV head keeps ``budget`` pairs. KVzip's own allocation is one score threshold over all
heads and layers: ``AdaKV(scorer=KVzip(...), alpha=0, share="model")`` (``share="layer"``: over the heads
of each layer, kvpress's ``layerwise=True``), stored as head groups.
"""
from __future__ import annotations

import torch

from ...kernels import attention, gather_kv
from .base import register
from .evicting import EvictingPolicy

# logits held at once when scoring (float32): a block of queries at a time against every key. A block's
# logits pass through mask, softmax and max one after another, so on a CPU a block that stays in cache
# (4 MiB) is ~2.5x faster than a large one (1k-token prompt: 25 vs 67 ms per layer); a GPU wants few, large
# blocks. The blocking does not change the result (each query's softmax is whole within a block).
_BLOCK_ELEMENTS = {"cpu": 1 << 20}
_BLOCK_ELEMENTS_DEFAULT = 1 << 24


def max_attention_received(q: torch.Tensor, keys: torch.Tensor, q_start: torch.Tensor, kv_len: torch.Tensor,
                           live: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """For every key, the largest softmax attention it receives from the first ``live[b]`` queries of each
    sequence, over those queries and the query heads of its GQA group.

    q [B, Hq, T, D]: query t of sequence b sits at key position ``q_start[b] + t`` and sees the keys
    j <= q_start[b] + t with j < kv_len[b]; keys [B, Hkv, S, D]. Returns [B, Hkv, S] (float32; 0 where no
    live query sees the key). Computed for a block of queries at a time, so no T x S x Hq logits are held.
    """
    longest = int(live.max())
    ragged = int(live.min()) < longest
    q = q[:, :, :longest]                                                          # later queries are all padding
    B, Hq, T, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    dev = q.device
    kt = keys.float().transpose(-1, -2)                                            # [B, Hkv, D, S]
    j = torch.arange(S, device=dev)
    out = torch.zeros(B, Hkv, S, dtype=torch.float32, device=dev)
    step = max(1, _BLOCK_ELEMENTS.get(dev.type, _BLOCK_ELEMENTS_DEFAULT) // max(1, B * Hq * S))
    for t0 in range(0, T, step):
        w = min(step, T - t0)
        # the GQA group's queries share one matmul with their KV head (keys are never repeated)
        qb = q[:, :, t0:t0 + w].float().reshape(B, Hkv, G * w, D) * scale
        s = torch.matmul(qb, kt).view(B, Hkv, G, w, S)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        t = t0 + torch.arange(w, device=dev)
        pos = q_start[:, None] + t[None]                                           # [B, w]
        sees = (j[None, None] <= pos[:, :, None]) & (j[None, None] < kv_len[:, None, None])   # [B, w, S]
        # an additive mask and one max over the group and the queries together: the cheap passes on a CPU;
        # every query sees the first key, so no softmax row is empty
        bias = torch.zeros(B, w, S, device=dev).masked_fill_(~sees, float("-inf"))
        p = torch.softmax(s.add_(bias[:, None, None]), dim=-1)
        if ragged:
            p.mul_((t[None] < live[:, None]).float()[:, None, None, :, None])     # padding queries count 0
        out = torch.maximum(out, p.view(B, Hkv, G * w, S).amax(2))
    return out


@register
class KVzip(EvictingPolicy):
    name = "kvzip"

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        self.pending: list[int] | None = None            # prompt lengths waiting for the reconstruction
        self.spans: list[list[tuple[int, int] | None]] = []   # [forward][b]: the prompt span it reconstructs
        self.score: torch.Tensor | None = None           # [B, Hkv, S] largest attention each slot received

    def after_prefill(self, ctx, q, scale: float) -> None:
        n = list(ctx.cache.lengths(self.layer))
        if all(self.params.tokens(m) >= m for m in n):
            return                                       # nothing to evict, so nothing to reconstruct
        self.pending = n
        self.score = torch.zeros(len(n), ctx.cache.num_kv_heads, max(n), dtype=torch.float32, device=q.device)

    def probe_inputs(self, ctx, ids: torch.Tensor, n: list[int]):
        if self.pending is None:
            return None
        if ctx.selected or self.pending != list(n):
            raise ValueError(f"kvzip (layer {self.layer}) reconstructs the whole prompt and cannot follow prefill "
                             f"token pruning (this layer holds {self.pending} of the prompt's {list(n)} tokens, or "
                             "will after the selection); use kvzip without prefill token pruning")
        p = self.params
        prompts = [row[:m] for row, m in zip(ids.tolist(), n)]
        evicts = [p.tokens(m) < m for m in n]
        header = list(p.header_ids)
        # the reconstruction starts after the template's header (in a prompt that does not start with it: at 0)
        starts = [len(header) if header and len(header) < m and tokens[:len(header)] == header else 0
                  for tokens, m in zip(prompts, n)]
        rounds = max(-(-(m - a) // p.chunk) for m, a, e in zip(n, starts, evicts) if e)
        self.spans, inputs = [], []
        for i in range(rounds):
            spans = [(a + i * p.chunk, min(m, a + (i + 1) * p.chunk)) if e and a + i * p.chunk < m else None
                     for m, a, e in zip(n, starts, evicts)]
            instruction = list(p.repeat_ids) if i and p.repeat_ids else list(p.prompt_ids)
            inputs.append([instruction + tokens[max(a, span[0] - p.overlap):span[0]] + list(p.suffix_ids)
                           + tokens[span[0]:span[1]] if span else []
                           for tokens, a, span in zip(prompts, starts, spans)])
            self.spans.append(spans)
        return inputs

    def probe_attend(self, ctx, q, k, v, scale, window, softcap):
        if self.pending is None:             # another layer's reconstruction; this one evicts nothing
            return super().probe_attend(ctx, q, k, v, scale, window, softcap)
        cache, layer, scope = ctx.cache, self.layer, self.params.scope
        n, spans = self.pending, self.spans[ctx.probe]
        T, dev = q.shape[2], q.device
        live = torch.tensor([m if span else 0 for m, span in zip(ctx.n_valid, spans)], device=dev)
        if scope == "local":
            cache.write(layer, k, v)
            cache.advance(layer, ctx.n_valid)
        else:
            out = ctx.attend_dense(layer, q, k, v, scale, window, softcap)
        keys, values = cache.view(layer, max(n) + T)
        if scope == "full":
            start = torch.tensor(n, device=dev)
            # slots past a shorter sequence's prompt hold its reconstruction: ``keep_best`` masks them
            received = max_attention_received(q, keys, start, start + T, live, scale, softcap)
            self.score = torch.maximum(self.score, received[:, :, :self.score.shape[-1]])
            return out
        # the keys of a chunk's scoring: sinks, the chunk's cached slots, then the reconstruction's slots
        rows, before = [], []
        for m, span in zip(n, spans):
            s, e = span if span else (0, 0)
            ctx_slots = list(range(min(self.params.sinks, s))) + list(range(s, e))
            rows.append(ctx_slots + list(range(m, m + T)))
            before.append(len(ctx_slots))
        width = max(len(r) for r in rows)
        index = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=dev)   # padding past kv_len
        start = torch.tensor(before, device=dev)
        picked = gather_kv(keys, index)                                             # [B, Hkv, width, D]
        if scope == "local":
            out = attention(q, picked, gather_kv(values, index), start, start + T, scale, window, softcap)
        received = max_attention_received(q, picked, start, start + T, live, scale, softcap)
        for b, span in enumerate(spans):
            if span:
                s, e = span
                lo = before[b] - (e - s)
                self.score[b, :, s:e] = torch.maximum(self.score[b, :, s:e], received[b, :, lo:before[b]])
        return out

    def after_probes(self, ctx) -> None:
        n, score = self.pending, self.score
        score[:, :, :self.params.sinks] = float("inf")
        self.pending, self.score, self.spans = None, None, []
        self.keep_best(ctx, score, n, [self.params.tokens(m) for m in n])
