"""What a layer's ``CachePolicy`` does inside ``Ctx.attend``: evict (SnapKV, StreamingLLM, H2O) or
read sparsely (Quest, DELTA).

Every function here gets the layer's new q/k/v and returns the attention output, exactly like the
dense path, so a policy never changes the graph a layer runs, only what its attention keeps and reads.

Slot bookkeeping. After an evicting policy compacts a layer, a cache slot no longer equals a token
position, and after a decode-time eviction the newest token may sit in any slot. RoPE was applied
before caching, so attention does not care where a token sits; what the policies need is each slot's
*age* (the order in which the layer received it: ``meta["age"] [B, Hkv, cap]``), to keep sinks
(age < sinks) and the recent window (age >= seen - recent). ``meta["seen"]`` counts the tokens a
layer has ever received per sequence.

Selection rules (per KV head unless noted; k/v stay un-repeated, a GQA group shares its KV head's
choice):
- SnapKV (Li et al., 2024): the last ``window`` prompt queries' softmax attention, summed over the
  window, mean over the GQA group, avg-pooled (kernel ``pool_kernel``) over the prefix, top
  (budget - window) of the prefix plus the window.
- StreamingLLM (Xiao et al., 2023): the first ``sinks`` tokens and the most recent ones; during decode
  the oldest non-sink token makes room for the new one.
- H2O (Zhang et al., 2023): accumulated softmax attention each key has received from every query so far
  (summed over the GQA group); keep the heavy hitters plus the ``recent`` newest tokens; during decode
  the lowest-scoring non-recent token makes room for the new one, and every step's attention is added.
- Quest (Tang et al., 2024): see ``kernels/kv_pages.py``; the top pages (the current page always) are read.
- DELTA: a "select" layer attends to everything and picks the ``budget`` tokens with the highest
  attention summed over all query heads (plus the ``recent`` newest); the "reuse" layers above it read
  only that set, until the next "select" layer.
- Sentence granularity (SnapKV, H2O at the end of prefill): each KV head keeps whole sentences by the
  max (or mean) of their tokens' scores, best first while they fit (``choose_sentences``), then the
  best single tokens up to the budget: the cache compacts to one length per sequence, so every head
  must keep the same count.
- SentenceKV: per prompt sentence and KV head the mean key stays resident (with the first ``sinks``
  and last ``recent`` prompt tokens); each decode step scores the sentences by the GQA group's summed
  query against those means and reads the best whole sentences while they fit the budget, plus
  everything generated. With ``offload`` the prompt's token KV lives in host memory and the chosen
  sentences' rows are copied to the device for that step only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import (attention, choose_sentences, decode_attention_scores, gather_kv, page_minmax, page_scores,
                       sparse_attention, token_scores)
from ..program import CachePolicy


def _amount(x: int | float, n: int) -> int:
    return max(1, int(round(x * n))) if isinstance(x, float) else int(x)


def keep_index(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per row the ``counts[b]`` highest-scoring slots, in slot order: ``scores [B, H, S]`` ->
    index [B, H, max(counts)]; rows of shorter sequences are padded with their first kept slot."""
    B, H, S = scores.shape
    K = max(counts)
    top = scores.topk(K, dim=-1).indices                                           # best first
    rank = torch.arange(K, device=scores.device)
    live = rank[None, None] < torch.tensor(counts, device=scores.device)[:, None, None]
    top = torch.where(live, top, S).sort(dim=-1).values                              # padding sorts last
    return torch.where(top == S, top[..., :1], top)


def sentence_keep_index(scores: torch.Tensor, sentence_ids: torch.Tensor, counts: list[int], reduce: str,
                        n: list[int]) -> torch.Tensor:
    """``keep_index`` at sentence granularity: per (sequence, KV head) row, the +inf slots (always kept)
    and whole sentences chosen by ``choose_sentences`` within ``counts[b]``, then the best remaining
    single tokens up to exactly ``counts[b]``. scores [B, H, S] (-inf = padding), sentence_ids [B, S]."""
    B, H, S = scores.shape
    boosted = scores.clone()
    for b in range(B):
        m = n[b]
        for h in range(H):
            row = scores[b, h, :m]
            forced = row == float("inf")
            room = counts[b] - int(forced.sum())
            if room <= 0:
                continue
            mask = choose_sentences(row, sentence_ids[b, :m], forced, room, reduce)
            boosted[b, h, :m] = row.masked_fill(mask, float("inf"))
    return keep_index(boosted, counts)


# ----------------------------------------------------------------------------------------------
# scores at the end of prefill
# ----------------------------------------------------------------------------------------------
def _group(x: torch.Tensor, hkv: int, how: str) -> torch.Tensor:
    """[B, Hq, S] -> [B, Hkv, S] over each GQA group."""
    B, Hq, S = x.shape
    x = x.view(B, hkv, Hq // hkv, S)
    return x.mean(2) if how == "mean" else x.sum(2)


def _window_queries(q: torch.Tensor, n: list[int], w: int) -> torch.Tensor:
    dev = q.device
    idx = torch.tensor([m - w for m in n], device=dev)[:, None] + torch.arange(w, device=dev)[None]
    return torch.gather(q, 2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))


def snapkv_scores(pol: CachePolicy, q, keys, n: list[int], scale: float) -> torch.Tensor:
    """[B, Hkv, S]: prefix scores; the observation window +inf (always kept), padding -inf."""
    dev = q.device
    w = max(1, min(pol.window, min(n) - 1))
    kv_len = torch.tensor(n, device=dev)
    s = token_scores(_window_queries(q, n, w), keys, kv_len - w, kv_len, scale, softmax=True, heads="none")
    s = _group(s.masked_fill(s == float("-inf"), 0.0), keys.shape[1], "mean")        # [B, Hkv, S]
    j = torch.arange(keys.shape[2], device=dev)[None, None]
    prefix = j < (kv_len - w)[:, None, None]
    s = s.masked_fill(~prefix, 0.0)
    if pol.pool_kernel > 1:
        B, H, S = s.shape
        s = F.avg_pool1d(s.reshape(B * H, 1, S), pol.pool_kernel, 1, pol.pool_kernel // 2).view(B, H, S)
    s = s.masked_fill(~prefix, float("inf"))
    return s.masked_fill(j >= kv_len[:, None, None], float("-inf"))


def attention_received(q, keys, n: list[int], scale: float, chunk: int = 256) -> torch.Tensor:
    """H2O's accumulated attention: for every key, the softmax attention it receives from every
    (causal) prompt query, summed over queries and over each GQA group -> [B, Hkv, S]. Computed in
    query chunks (and per sequence when the batch is ragged) so no T x T matrix is held."""
    B, Hq, T, D = q.shape
    S = keys.shape[2]
    out = torch.zeros(B, keys.shape[1], S, dtype=torch.float32, device=q.device)
    rows = [slice(None)] if len(set(n)) == 1 else [slice(b, b + 1) for b in range(B)]
    for r in rows:
        m = n[0] if r == slice(None) else n[r.start]
        kv_len = torch.full((q[r].shape[0],), m, device=q.device)
        for c in range(0, m, chunk):
            qc = q[r][:, :, c:min(m, c + chunk)]
            s = token_scores(qc, keys[r], torch.full_like(kv_len, c), kv_len, scale, softmax=True, heads="none")
            out[r] += _group(s.masked_fill(s == float("-inf"), 0.0), keys.shape[1], "sum")
    return out


# ----------------------------------------------------------------------------------------------
# evicting policies
# ----------------------------------------------------------------------------------------------
def evict_after_prefill(pol: CachePolicy, cache, layer: int, q, scale: float,
                        sentence_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Shrink ``layer`` to its budget right after the prompt was written (and attended to); returns
    the kept slots [B, Hkv, K] (None when the budget covers the prompt). ``sentence_ids [B, S]``: the
    sentence of each cached prompt token (needed with ``granularity="sentence"``)."""
    n = list(cache.lengths(layer))
    dev = q.device
    budget = [pol.tokens(m) for m in n]
    meta = cache.meta[layer]
    if pol.decode_evict:
        meta["seen"] = torch.tensor(n, device=dev)
        meta["budget"] = torch.tensor(budget, device=dev)
        meta["recent"] = torch.tensor([min(_amount(pol.recent, m), b) for m, b in zip(n, budget)], device=dev)
    keys, _ = cache.view(layer, max(n))
    H, S = keys.shape[1], keys.shape[2]
    j = torch.arange(S, device=dev)[None, None]
    kv_len = torch.tensor(n, device=dev)[:, None, None]
    kept = [min(b, m) for b, m in zip(budget, n)]
    if pol.decode_evict:
        meta["age"] = torch.arange(S, device=dev).expand(len(n), H, S).contiguous()
    if pol.method == "h2o":          # decode-time eviction needs the scores even when nothing goes now
        meta["score"] = attention_received(q, keys, n, scale)
    if kept == n:
        return None
    if pol.method == "snapkv":
        scores = snapkv_scores(pol, q, keys, n, scale)
    elif pol.method == "streamingllm":
        recent = kv_len - torch.tensor([max(0, b - pol.sinks) for b in budget], device=dev)[:, None, None]
        scores = torch.where((j < pol.sinks) | (j >= recent), 1.0, 0.0).expand(len(n), H, S).clone()
    elif pol.method == "h2o":
        scores = meta["score"].masked_fill(j >= kv_len - meta["recent"][:, None, None], float("inf"))
    else:
        raise ValueError(f"unknown evicting policy {pol.method!r}")
    scores = scores.masked_fill(j >= kv_len, float("-inf"))
    if pol.granularity == "sentence":
        if sentence_ids is None:
            raise ValueError(f"{pol.method} with granularity='sentence' needs the prompt's sentence ids")
        index = sentence_keep_index(scores, sentence_ids[:, :S], kept, pol.sentence_reduce, n)
    else:
        index = keep_index(scores, kept)                                            # [B, Hkv, K]
    headroom = max(budget) - index.shape[-1] if pol.decode_evict else None
    cache.compact(layer, index, kept, headroom=headroom)
    cap = cache.capacity(layer)
    if pol.decode_evict:
        age = torch.zeros(len(n), H, cap, dtype=torch.long, device=dev)
        age[:, :, :index.shape[-1]] = index
        meta["age"] = age
    if "score" in meta:
        score = torch.zeros(len(n), H, cap, dtype=torch.float32, device=dev)
        score[:, :, :index.shape[-1]] = torch.gather(meta["score"], 2, index)
        meta["score"] = score
    return index


def _grow(meta: dict, name: str, cap: int) -> torch.Tensor:
    t = meta[name]
    if t.shape[-1] < cap:
        t = torch.cat([t, t.new_zeros(*t.shape[:-1], cap - t.shape[-1])], dim=-1)
        meta[name] = t
    return t


def evict_decode(pol: CachePolicy, cache, layer: int, q, k, v, scale: float, softcap, n_valid) -> torch.Tensor:
    """One new token per sequence into a layer kept at its budget (StreamingLLM, H2O)."""
    meta = cache.meta[layer]
    dev = q.device
    B, H = k.shape[0], k.shape[1]
    L = cache.lengths_tensor(layer)
    if "seen" not in meta:           # a one-token prompt: nothing was written by a prefill
        meta["seen"] = L.clone()
        meta["budget"] = torch.full((B,), pol.tokens(1), device=dev)
        meta["age"] = torch.zeros(B, H, cache.capacity(layer), dtype=torch.long, device=dev)
        meta["recent"] = torch.full((B,), min(_amount(pol.recent, 1), pol.tokens(1)), device=dev)
        if pol.method == "h2o":
            meta["score"] = torch.zeros(B, H, cache.capacity(layer), device=dev)
    cap = cache.capacity(layer)
    age = _grow(meta, "age", cap)
    seen = meta["seen"]
    full = L >= meta["budget"]                                                      # [B]
    slot = L[:, None].expand(B, H)
    if bool(full.any()):
        j = torch.arange(cap, device=dev)[None, None]
        valid = j < L[:, None, None]
        protected = (age >= (seen - meta["recent"])[:, None, None]) | ~valid
        if pol.method == "streamingllm":
            prio = age.float().masked_fill(age < pol.sinks, float("inf"))
        else:
            prio = _grow(meta, "score", cap).clone()
        victim = prio.masked_fill(protected, float("inf")).argmin(-1)               # [B, Hkv]
        slot = torch.where(full[:, None], victim, slot)
    cache.write_slots(layer, slot, k, v)
    age.scatter_(2, slot[:, :, None], seen[:, None, None].expand(B, H, 1))
    if "score" in meta:
        _grow(meta, "score", cap).scatter_(2, slot[:, :, None], 0.0)
    meta["seen"] = seen + torch.tensor(n_valid, device=dev)
    cache.advance(layer, [0 if f else c for f, c in zip(full.tolist(), n_valid)])
    kv_len = cache.lengths_tensor(layer)
    keys, values = cache.view(layer, int(kv_len.max()))
    out = attention(q, keys, values, kv_len - 1, kv_len, scale, None, softcap)
    if pol.method == "h2o":
        p = token_scores(q, keys, kv_len - 1, kv_len, scale, softmax=True, heads="none")
        p = _group(p.masked_fill(p == float("-inf"), 0.0), H, "sum")
        meta["score"][:, :, :p.shape[-1]] += p
    return out


# ----------------------------------------------------------------------------------------------
# sparse reads
# ----------------------------------------------------------------------------------------------
def quest_update_pages(pol: CachePolicy, cache, layer: int, old: list[int]) -> None:
    """Refresh the page min/max of the pages that the last write touched."""
    meta = cache.meta[layer]
    ps = pol.page_size
    n_pages = -(-cache.capacity(layer) // ps)
    if "kmin" not in meta or meta["kmin"].shape[2] != n_pages:
        B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
        meta["kmin"] = torch.zeros(B, H, n_pages, D, dtype=torch.float32, device=cache.device)
        meta["kmax"] = torch.zeros_like(meta["kmin"])
        old = [0] * len(old)
    new = cache.lengths(layer)
    if all(n - o == 1 for n, o in zip(new, old)) and len(set(new)) > 1:
        # a decode step of a ragged batch: one page per sequence, wherever each one is
        _update_one_page(meta, cache, layer, ps)
        return
    first, last = min(old) // ps, -(-max(new) // ps)
    keys, _ = cache.view(layer, min(cache.capacity(layer), last * ps))
    kmin, kmax = page_minmax(keys, cache.lengths_tensor(layer), ps, first, last)
    meta["kmin"][:, :, first:last] = kmin
    meta["kmax"][:, :, first:last] = kmax


def _update_one_page(meta: dict, cache, layer: int, ps: int) -> None:
    dev = cache.device
    B = cache.batch
    kv_len = cache.lengths_tensor(layer)
    page = (kv_len - 1) // ps                                                        # [B]
    slots = page[:, None] * ps + torch.arange(ps, device=dev)                        # [B, ps]
    keys = gather_kv(cache.k[layer], slots.clamp(max=cache.capacity(layer) - 1)).float()  # [B, H, ps, D]
    ok = (slots < kv_len[:, None])[:, None, :, None]
    b = torch.arange(B, device=dev)
    meta["kmin"][b, :, page] = keys.masked_fill(~ok, float("inf")).amin(2)
    meta["kmax"][b, :, page] = keys.masked_fill(~ok, float("-inf")).amax(2)


def quest_index(pol: CachePolicy, cache, layer: int, q: torch.Tensor, budget: int) -> torch.Tensor:
    """Token slots of the top pages per KV head (the newest page always) -> [B, Hkv, n_pages * page_size]."""
    meta = cache.meta[layer]
    ps = pol.page_size
    kv_len = cache.lengths_tensor(layer)
    last = -(-max(cache.lengths(layer)) // ps)
    scores = page_scores(q[:, :, 0], meta["kmin"][:, :, :last], meta["kmax"][:, :, :last], kv_len, ps)
    newest = ((kv_len - 1) // ps)[:, None, None].expand(-1, scores.shape[1], 1)
    scores = scores.scatter(2, newest, float("inf"))
    n_sel = min(last, max(1, budget // ps))
    pages = scores.topk(n_sel, dim=-1).indices                                      # [B, Hkv, n]
    slots = pages[..., None] * ps + torch.arange(ps, device=q.device)
    return slots.flatten(2)


def delta_select(pol: CachePolicy, q, keys, values, kv_len: torch.Tensor, scale: float, softcap,
                 budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A DELTA "select" layer's decode step: its own full attention output and the token set for the
    layers above it (``delta_index``), from one pass over its keys -> (output [B, Hq, 1, D], index [B, K])."""
    out, p = decode_attention_scores(q, keys, values, kv_len, scale, softcap)
    return out, delta_index(pol, p, kv_len, budget)


def delta_index(pol: CachePolicy, p: torch.Tensor, kv_len: torch.Tensor, budget: int) -> torch.Tensor:
    """DELTA's token set: the ``budget`` slots with the highest attention ``p [B, S]`` from the new query
    (summed over all heads), plus the ``recent`` newest -> [B, K] in slot order."""
    j = torch.arange(p.shape[1], device=p.device)[None]
    p = p.masked_fill(j >= (kv_len - pol.recent)[:, None], float("inf"))
    p = p.masked_fill(j >= kv_len[:, None], float("-inf"))
    K = min(p.shape[1], budget + pol.recent)
    return p.topk(K, dim=-1).indices.sort(dim=-1).values        # slot order: the gathers read forward


# ----------------------------------------------------------------------------------------------
# SentenceKV: sentence summaries resident, token KV optionally offloaded to host memory
# ----------------------------------------------------------------------------------------------
def mask_to_index(mask: torch.Tensor) -> torch.Tensor:
    """The set slots of each row in slot order: mask [B, H, S] bool -> [B, H, K] long, K = the largest
    row count, shorter rows padded with -1 (padding for ``sparse_attention``)."""
    B, H, S = mask.shape
    K = int(mask.sum(-1).max()) if mask.numel() else 0
    pos = torch.where(mask, mask.long().cumsum(-1) - 1, K)
    out = torch.full((B, H, K + 1), -1, dtype=torch.long, device=mask.device)
    out.scatter_(2, pos, torch.arange(S, device=mask.device).expand(B, H, S))
    return out[..., :K]


def _pinned_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy for offloading (pinned, so the per-step copies can be asynchronous); a tensor that
    already lives on the host stays where it is."""
    if t.device.type == "cpu":
        return t
    return t.to("cpu").pin_memory()


def sentencekv_after_prefill(pol: CachePolicy, cache, layer: int, sentence_ids: torch.Tensor) -> None:
    """Summarise the prompt just written into ``layer``: per sentence and KV head the mean key; mark
    the resident tokens (the first ``sinks`` and last ``recent`` of each prompt); with ``offload``, move
    the prompt KV to host memory and shrink the device buffers to the resident tokens."""
    n = list(cache.lengths(layer))
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    S = max(n)
    dev = cache.device
    keys, values = cache.view(layer, S)
    kv_len = torch.tensor(n, device=dev)
    j = torch.arange(S, device=dev)[None]
    valid = j < kv_len[:, None]                                                      # [B, S]
    sid = sentence_ids[:, :S].to(dev)
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
    meta = cache.meta[layer]
    meta["centroid"] = (sums / count.clamp(min=1)[:, None, :, None])[:, :, :n_sent]   # [B, H, NS, D]
    meta["size"] = size[:, :n_sent]                                                  # selectable tokens per sentence
    meta["sid"] = sid
    meta["selectable"] = selectable
    meta["prompt"] = kv_len
    # the budget for whole sentences, per sequence: the total minus the resident prompt tokens
    meta["room"] = torch.tensor([max(0, pol.tokens(m) - r) for m, r in zip(n, resident.sum(1).tolist())],
                                device=dev)
    if not pol.offload:
        return
    host = cache.host[layer]
    host["k"], host["v"] = _pinned_host(keys), _pinned_host(values)
    index = mask_to_index(resident[:, None])[:, 0]                                   # [B, R], -1 padded
    kept = resident.sum(1).tolist()
    index = torch.where(index < 0, index[:, :1], index)
    cache.compact(layer, index, kept)


def sentencekv_index(cache, layer: int, q: torch.Tensor) -> torch.Tensor:
    """The prompt slots of the best whole sentences per KV head within the room -> [B, Hkv, K] (-1 padded).
    q [B, Hq, 1, D]; sentences are scored by (sum of the GQA group's queries) · (mean key)."""
    meta = cache.meta[layer]
    cent = meta["centroid"]
    B, H, NS, D = cent.shape
    qg = q[:, :, 0].float().view(B, H, -1, D).sum(2)                                  # [B, H, D]
    score = torch.einsum("bhd,bhnd->bhn", qg, cent)
    size = meta["size"][:, None].expand(B, H, NS)
    score = score.masked_fill(size == 0, float("-inf"))
    order = score.argsort(dim=-1, descending=True)
    fits = torch.gather(size, 2, order).cumsum(-1) <= meta["room"][:, None, None]
    fits &= torch.gather(score, 2, order) > float("-inf")
    chosen = torch.zeros(B, H, NS, dtype=torch.bool, device=q.device).scatter_(2, order, fits)
    S = meta["sid"].shape[1]
    tokens = torch.gather(chosen, 2, meta["sid"][:, None].expand(B, H, S)) & meta["selectable"][:, None]
    return mask_to_index(tokens)


def sentencekv_decode(pol: CachePolicy, cache, layer: int, q, k, v, scale: float, softcap,
                      n_valid) -> tuple[torch.Tensor, list[int], list[int], int]:
    """One new token per sequence: write it (it stays resident), read the chosen sentences plus the
    resident tokens. Returns (output [B, Hq, 1, D], keys read, keys cached per sequence, bytes copied
    host -> device)."""
    meta = cache.meta[layer]
    cache.write(layer, k, v)
    cache.advance(layer, n_valid)
    lengths = cache.lengths(layer)
    kv_len = cache.lengths_tensor(layer)
    L = max(lengths)
    keys, values = cache.view(layer, L)
    index = sentencekv_index(cache, layer, q)                                        # prompt slots, [B, H, K]
    picked = (index >= 0).sum(-1)                                                    # [B, H]
    dev = q.device
    if pol.offload:
        host = cache.host[layer]
        rows = index.clamp(min=0).to(host["k"].device)
        # the chosen rows of the host store, copied to the device for this step only
        gk = gather_kv(host["k"], rows).to(dev, non_blocking=True)
        gv = gather_kv(host["v"], rows).to(dev, non_blocking=True)
        K = index.shape[-1]
        j = torch.arange(L, device=dev)[None, None].expand(*index.shape[:2], L)
        resident = torch.where(j < kv_len[:, None, None], K + j, -1)                 # every device slot
        gathered = torch.where(index >= 0, torch.arange(K, device=dev), -1)          # rows of gk / gv
        out = sparse_attention(q[:, :, 0], torch.cat([gk, keys], 2), torch.cat([gv, values], 2),
                               torch.cat([gathered, resident], -1), torch.full_like(kv_len, K + L), scale, softcap)
        # the rows copied out of the host store (host -> device on a GPU; within host memory on a CPU cache)
        moved = int(picked.sum()) * cache.head_dim * 2 * gk.element_size()
        read = [round(x) for x in (picked.float().mean(1) + kv_len).tolist()]
        cached = [m + l - r for m, l, r in zip(meta["prompt"].tolist(), lengths, _resident_counts(meta))]
        return out[:, :, None], read, cached, moved
    # on-device cache: the chosen sentences plus every non-selectable slot (sinks, recent, generated)
    sel = meta["selectable"]
    j = torch.arange(L, device=dev)[None]
    always = (j < kv_len[:, None]) & ~F.pad(sel, (0, L - sel.shape[1]))
    mask = torch.zeros(*index.shape[:2], L + 1, dtype=torch.bool, device=dev)
    mask.scatter_(2, torch.where(index < 0, L, index), True)
    mask = mask[..., :L] | always[:, None]
    read_index = mask_to_index(mask)
    out = sparse_attention(q[:, :, 0], keys, values, read_index, kv_len, scale, softcap)
    read = [round(x) for x in (read_index >= 0).sum(-1).float().mean(1).tolist()]
    return out[:, :, None], read, list(lengths), 0


def _resident_counts(meta) -> list[int]:
    """Prompt tokens that stayed on the device per sequence (the first sinks and the last recent)."""
    valid = torch.arange(meta["sid"].shape[1], device=meta["sid"].device)[None] < meta["prompt"][:, None]
    return (valid & ~meta["selectable"]).sum(1).tolist()
