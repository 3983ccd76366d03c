"""SentenceKV (sentence-level semantic KV caching).

After prefill, per prompt sentence and KV head the mean key stays resident on the device
(``centroid [B, Hkv, sentences, D]``), with the first ``sinks`` and last ``recent`` prompt tokens. Each
decode step scores the sentences by the GQA group's summed query against those means and reads the
best whole sentences while they fit the budget (``room`` prompt tokens besides the resident ones),
plus everything generated. With ``offload`` the prompt's token KV lives in host memory (pinned on a
GPU) and the chosen sentences' rows are copied to the device for that step only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels import gather_kv, sparse_attention
from .base import KVPolicy, register
from .scoring import mask_to_index


def _pinned_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy for offloading (pinned, so the per-step copies can be asynchronous); a tensor that
    already lives on the host stays where it is."""
    if t.device.type == "cpu":
        return t
    return t.to("cpu").pin_memory()


@register
class SentenceKV(KVPolicy):
    name = "sentencekv"

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        self.centroid: torch.Tensor | None = None        # [B, Hkv, NS, D] mean key per prompt sentence
        self.size: torch.Tensor | None = None            # [B, NS] selectable tokens per sentence
        self.sid: torch.Tensor | None = None             # [B, S] sentence of each prompt slot
        self.selectable: torch.Tensor | None = None      # [B, S] prompt slots read only when chosen
        self.prompt: torch.Tensor | None = None          # [B] prompt length
        self.room: torch.Tensor | None = None            # [B] budget for whole sentences
        self.host_k: torch.Tensor | None = None          # offloaded prompt keys [B, Hkv, S, D] (host)
        self.host_v: torch.Tensor | None = None

    def host_tensors(self):
        return [t for t in (self.host_k, self.host_v) if t is not None]

    @property
    def summarised(self) -> bool:
        return self.centroid is not None

    def check_extend(self, ctx, T: int) -> None:
        if self.params.offload and self.summarised:
            raise ValueError(f"{self.name}: the prompt's KV was offloaded after prefill, so the cache takes one new "
                             f"token per step; extending it by {T} tokens at once is not supported (prefill the "
                             "whole prompt, or use offload=False)")

    def after_prefill(self, ctx, q, scale: float) -> None:
        """Summarise the prompt just written: per sentence and KV head the mean key; mark the resident
        tokens; with ``offload``, move the prompt KV to host memory and shrink the device buffers to the
        resident tokens."""
        pol, cache, layer = self.params, ctx.cache, self.layer
        n = list(cache.lengths(layer))
        B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
        S = max(n)
        dev = cache.device
        keys, values = cache.view(layer, S)
        kv_len = torch.tensor(n, device=dev)
        j = torch.arange(S, device=dev)[None]
        valid = j < kv_len[:, None]                                                  # [B, S]
        sid = ctx.sentence_ids[:, :S].to(dev)
        sid = torch.where(valid, sid - sid[:, :1], 0)
        n_sent = int(sid.max()) + 1
        # sums of keys per sentence (padding routed to an extra sentence that is dropped)
        route = torch.where(valid, sid, n_sent)
        sums = torch.zeros(B, H, n_sent + 1, D, dtype=torch.float32, device=dev)
        sums.scatter_add_(2, route[:, None, :, None].expand(B, H, S, D), keys.float())
        count = torch.zeros(B, n_sent + 1, device=dev).scatter_add_(1, route, torch.ones(B, S, device=dev))
        resident = valid & ((j < pol.sinks) | (j >= kv_len[:, None] - pol.recent))
        selectable = valid & ~resident
        size = torch.zeros(B, n_sent + 1, dtype=torch.long, device=dev).scatter_add_(1, route, selectable.long())
        self.centroid = (sums / count.clamp(min=1)[:, None, :, None])[:, :, :n_sent]
        self.size = size[:, :n_sent]
        self.sid = sid
        self.selectable = selectable
        self.prompt = kv_len
        # the budget for whole sentences, per sequence: the total minus the resident prompt tokens
        self.room = torch.tensor([max(0, pol.tokens(m) - r) for m, r in zip(n, resident.sum(1).tolist())],
                                 device=dev)
        if not pol.offload:
            return
        self.host_k, self.host_v = _pinned_host(keys), _pinned_host(values)
        index = mask_to_index(resident[:, None])[:, 0]                               # [B, R], -1 padded
        kept = resident.sum(1).tolist()
        index = torch.where(index < 0, index[:, :1], index)
        cache.compact(layer, index, kept)

    def chosen_tokens(self, q: torch.Tensor, sid: torch.Tensor, selectable: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] bool: the selectable prompt slots of the best whole sentences per KV head within the
        room. q [B, Hq, 1, D]; sentences are scored by (sum of the GQA group's queries) · (mean key), best
        first while their sizes fit. ``sid`` / ``selectable`` [B, S]: each slot's sentence and whether it is
        read only when chosen (S: the prompt, or the whole capacity for the captured step)."""
        cent = self.centroid
        B, H, NS, D = cent.shape
        qg = q[:, :, 0].float().view(B, H, -1, D).sum(2)                              # [B, H, D]
        score = torch.einsum("bhd,bhnd->bhn", qg, cent)
        size = self.size[:, None].expand(B, H, NS)
        score = score.masked_fill(size == 0, float("-inf"))
        order = score.argsort(dim=-1, descending=True)
        fits = torch.gather(size, 2, order).cumsum(-1) <= self.room[:, None, None]
        fits &= torch.gather(score, 2, order) > float("-inf")
        chosen = torch.zeros(B, H, NS, dtype=torch.bool, device=q.device).scatter_(2, order, fits)
        return torch.gather(chosen, 2, sid[:, None].expand(B, H, sid.shape[1])) & selectable[:, None]

    def sentence_index(self, q: torch.Tensor) -> torch.Tensor:
        """The prompt slots of the best whole sentences per KV head -> [B, Hkv, K] (-1 padded)."""
        return mask_to_index(self.chosen_tokens(q, self.sid, self.selectable))

    def decode(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        """One new token per sequence: write it (it stays resident), read the chosen sentences plus the
        resident tokens (dense until the prompt was summarised)."""
        if not self.summarised:
            return super().decode(ctx, q, k, v, scale, softcap)
        cache, layer = ctx.cache, self.layer
        cache.write(layer, k, v)
        cache.advance(layer, ctx.n_valid)
        return self.read(ctx, q, list(cache.lengths(layer)), scale, softcap)

    # -- self-speculation -----------------------------------------------------------------------------
    def verify(self, ctx, q, k, v, scale: float, softcap) -> torch.Tensor:
        """Several draft tokens: all are written (they stay resident); query t reads the sentences it
        chooses itself plus the resident tokens up to t, as its decode step would."""
        if not self.summarised:
            return super().verify(ctx, q, k, v, scale, softcap)
        if self.params.offload:         # each step copies in the sentences its own query chooses
            return self.verify_stepwise(ctx, q, k, v, scale, softcap)
        cache, layer = ctx.cache, self.layer
        old = list(cache.lengths(layer))
        cache.write(layer, k, v)
        cache.advance(layer, ctx.n_valid)
        outs = [self.read(ctx, q[:, :, t:t + 1], [o + min(t + 1, n) for o, n in zip(old, ctx.n_valid)], scale,
                          softcap) for t in range(q.shape[2])]
        return torch.cat(outs, dim=2)

    def truncate(self, cache, old: list[int], new: list[int]) -> None:
        """Generated tokens may go (the summary describes the prompt only); the prompt may not."""
        if not self.summarised or old == new:
            return
        # the prompt's slots on the device: all of it, or (offloaded) its resident sinks and recent tokens
        floor = self._resident_counts() if self.params.offload else self.prompt.tolist()
        if any(n < p for n, p in zip(new, floor)):
            raise ValueError(f"layer {self.layer}: sentencekv summarised a prompt that holds {floor} slots of this "
                             f"layer; truncating to {new} would cut into it")

    def read(self, ctx, q, lengths: list[int], scale: float, softcap) -> torch.Tensor:
        """The attention of one query per sequence (``q [B, Hq, 1, D]``) over the first ``lengths[b]`` slots:
        the sentences it chooses plus the resident tokens."""
        cache, layer = ctx.cache, self.layer
        kv_len = cache.lengths_tensor(layer) if lengths == cache.lengths(layer) else \
            torch.tensor(lengths, device=q.device)
        L = max(lengths)
        keys, values = cache.view(layer, L)
        index = self.sentence_index(q)                                               # prompt slots, [B, H, K]
        picked = (index >= 0).sum(-1)                                                # [B, H]
        dev = q.device
        if self.params.offload:
            rows = index.clamp(min=0).to(self.host_k.device)
            # the chosen rows of the host store, copied to the device for this step only
            gk = gather_kv(self.host_k, rows).to(dev, non_blocking=True)
            gv = gather_kv(self.host_v, rows).to(dev, non_blocking=True)
            K = index.shape[-1]
            j = torch.arange(L, device=dev)[None, None].expand(*index.shape[:2], L)
            resident = torch.where(j < kv_len[:, None, None], K + j, -1)             # every device slot
            gathered = torch.where(index >= 0, torch.arange(K, device=dev), -1)      # rows of gk / gv
            out = sparse_attention(q[:, :, 0], torch.cat([gk, keys], 2), torch.cat([gv, values], 2),
                                   torch.cat([gathered, resident], -1), torch.full_like(kv_len, K + L), scale,
                                   softcap)
            # the rows copied out of the host store (host -> device on a GPU; within host memory on a CPU cache)
            ctx.moved += int(picked.sum()) * cache.head_dim * 2 * gk.element_size()
            read = [round(x) for x in (picked.float().mean(1) + kv_len).tolist()]
            cached = [m + l - r for m, l, r in zip(self.prompt.tolist(), lengths, self._resident_counts())]
            ctx.count(layer, read, cached)
            return out[:, :, None]
        # on-device cache: the chosen sentences plus every non-selectable slot (sinks, recent, generated)
        sel = self.selectable
        j = torch.arange(L, device=dev)[None]
        always = (j < kv_len[:, None]) & ~F.pad(sel, (0, L - sel.shape[1]))
        mask = torch.zeros(*index.shape[:2], L + 1, dtype=torch.bool, device=dev)
        mask.scatter_(2, torch.where(index < 0, L, index), True)
        mask = mask[..., :L] | always[:, None]
        read_index = mask_to_index(mask)
        out = sparse_attention(q[:, :, 0], keys, values, read_index, kv_len, scale, softcap)
        ctx.count(layer, [round(x) for x in (read_index >= 0).sum(-1).float().mean(1).tolist()], list(lengths))
        return out[:, :, None]

    def _resident_counts(self) -> list[int]:
        """Prompt tokens that stayed on the device per sequence (the first sinks and the last recent)."""
        valid = torch.arange(self.sid.shape[1], device=self.sid.device)[None] < self.prompt[:, None]
        return (valid & ~self.selectable).sum(1).tolist()

    # -- the captured decode step (on-device cache only) ----------------------------------------------
    @property
    def supports_static(self) -> bool:
        return not self.params.offload

    def prepare_static(self, cache) -> None:
        """The prompt's masks padded to the layer's capacity (fixed shapes)."""
        if not self.summarised:
            return
        C = cache.capacity(self.layer)
        pad = C - self.sid.shape[1]
        self.static_sid = F.pad(self.sid, (0, pad))
        self.static_selectable = F.pad(self.selectable, (0, pad))

    def static_count(self, n: int, b: int) -> tuple[int, int]:
        return n, n     # the masked read touches every slot (the chosen set varies per head and step)

    def static_decode(self, sctx, q, k, v, scale, softcap):
        """Write the token (it stays resident); attend to the chosen whole sentences plus every
        non-selectable slot, as a per-KV-head mask over the whole capacity (dense until summarised)."""
        if not self.summarised:
            return sctx.attend_dense(self.layer, q, k, v, scale, None, softcap)
        cache = sctx.cache
        kv_len = sctx.write(self.layer, k, v)
        keys, values = cache.k[self.layer], cache.v[self.layer]
        B, H, _, D = self.centroid.shape
        C = keys.shape[2]
        tokens = self.chosen_tokens(q, self.static_sid, self.static_selectable)
        j = torch.arange(C, device=q.device)[None]
        always = (j < kv_len[:, None]) & ~self.static_selectable                     # [B, C]
        mask = (tokens | always[:, None])[:, :, None]                                 # [B, H, 1, C]
        qh = q.float().view(B, H, -1, D)
        if softcap is not None:
            s = torch.einsum("bhgd,bhcd->bhgc", qh, keys.float()) * scale
            s = softcap * torch.tanh(s / softcap)
            out = torch.einsum("bhgc,bhcd->bhgd", torch.softmax(s.masked_fill(~mask, float("-inf")), -1),
                               values.float())
        else:
            out = F.scaled_dot_product_attention(qh, keys.float(), values.float(), attn_mask=mask, scale=scale)
        return out.reshape(q.shape).to(q.dtype)
