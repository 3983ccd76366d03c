"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference").

Per page of ``page_size`` keys the channel-wise min/max (``kmin`` / ``kmax [B, Hkv, pages, D]``) is kept
current at every write (``kernels/kv_pages.py``); each decode step scores the pages by the bound
Σ_i max(q_i·min_i, q_i·max_i) and reads the top ``budget // page_size`` pages per KV head (the newest
page always).
"""
from __future__ import annotations

import torch

from ...kernels import gather_kv, page_minmax, page_scores, sparse_attention, sparse_attention_queries, use_triton
from .base import register
from .sparse import SparseReadPolicy


@register
class Quest(SparseReadPolicy):
    name = "quest"

    def __init__(self, params, layer: int):
        super().__init__(params, layer)
        self.kmin: torch.Tensor | None = None            # [B, Hkv, pages, D] per-page channel minimum
        self.kmax: torch.Tensor | None = None            # [B, Hkv, pages, D] per-page channel maximum

    def after_write(self, ctx, old: list[int]) -> None:
        """Refresh the page min/max of the pages that the last write touched."""
        cache, layer = ctx.cache, self.layer
        ps = self.params.page_size
        n_pages = -(-cache.capacity(layer) // ps)
        if self.kmin is None or self.kmin.shape[2] != n_pages:
            B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
            self.kmin = torch.zeros(B, H, n_pages, D, dtype=torch.float32, device=cache.device)
            self.kmax = torch.zeros_like(self.kmin)
            old = [0] * len(old)
        new = cache.lengths(layer)
        if all(n - o == 1 for n, o in zip(new, old)) and len(set(new)) > 1:
            # a decode step of a ragged batch: one page per sequence, wherever each one is
            self._update_one_page(cache, cache.lengths_tensor(layer))
            return
        first, last = min(old) // ps, -(-max(new) // ps)
        keys, _ = cache.view(layer, min(cache.capacity(layer), last * ps))
        kmin, kmax = page_minmax(keys, cache.lengths_tensor(layer), ps, first, last)
        self.kmin[:, :, first:last] = kmin
        self.kmax[:, :, first:last] = kmax

    def _update_one_page(self, cache, kv_len: torch.Tensor) -> None:
        """The page holding each sequence's newest token (its length ``kv_len [B]``) from the cache rows."""
        ps, layer = self.params.page_size, self.layer
        dev = cache.device
        page = (kv_len - 1) // ps                                                    # [B]
        slots = page[:, None] * ps + torch.arange(ps, device=dev)                    # [B, ps]
        keys = gather_kv(cache.k[layer], slots.clamp(max=cache.capacity(layer) - 1)).float()  # [B, H, ps, D]
        ok = (slots < kv_len[:, None])[:, None, :, None]
        b = torch.arange(cache.batch, device=dev)
        self.kmin[b, :, page] = keys.masked_fill(~ok, float("inf")).amin(2)
        self.kmax[b, :, page] = keys.masked_fill(~ok, float("-inf")).amax(2)

    def truncate(self, cache, old: list[int], new: list[int]) -> None:
        """Rejected drafts leave: the pages they touched get the bounds of the slots that stay (a page with
        none left is zero, as one never written)."""
        if self.kmin is None or old == new:
            return
        ps = self.params.page_size
        first, last = min(new) // ps, -(-max(old) // ps)
        keys, _ = cache.view(self.layer, min(cache.capacity(self.layer), last * ps))
        kmin, kmax = page_minmax(keys, torch.tensor(new, device=keys.device), ps, first, last)
        self.kmin[:, :, first:last] = kmin
        self.kmax[:, :, first:last] = kmax

    def read_index(self, ctx, q, keys, values, kv_len, scale, softcap, lengths=None):
        # a draft's query t is verified with the bounds of every page as they stand after the whole draft:
        # the pages before t's page are complete either way, its own page is always read, and pages past
        # it lie beyond kv_len, so the page choice is the one a decode step at t makes
        lengths = ctx.cache.lengths(self.layer) if lengths is None else lengths
        pages = self.pages(max(lengths))
        return (None if pages is None else self.top_pages(q, kv_len, *pages)), None

    def pages(self, longest: int) -> tuple[int, int] | None:
        """(pages scored, pages read) for a query after which the layer holds up to ``longest`` slots; None when
        the budget covers them all (a dense read)."""
        budget = self.params.tokens(longest)
        return None if longest <= budget else self.page_counts(longest, budget)

    def page_counts(self, longest: int, budget: int) -> tuple[int, int]:
        last = -(-longest // self.params.page_size)
        return last, min(last, max(1, budget // self.params.page_size))

    def page_index(self, q, kv_len: torch.Tensor, longest: int, budget: int) -> torch.Tensor:
        """Token slots of the top pages per KV head (the newest page always) -> [B, Hkv, n_pages * page_size]."""
        return self.top_pages(q, kv_len, *self.page_counts(longest, budget))

    def read_queries(self, ctx, q, lengths: list[list[int]], scale: float, softcap) -> torch.Tensor:
        """A verification's T queries in one call (on CPU): each query's page scores and top pages, then one
        sparse read with a slot set per query, the same choice and the same keys as T decode steps. One
        read per query (the base class) where a query reads densely, the queries would choose different
        page counts, or on CUDA (the Triton kernels score and read one query)."""
        pages = [self.pages(max(n)) for n in lengths]
        if None in pages or len({p[1] for p in pages}) > 1 or len(lengths) == 1 or use_triton(q):
            return super().read_queries(ctx, q, lengths, scale, softcap)
        cache, layer = ctx.cache, self.layer
        longest = max(max(n) for n in lengths)
        kv_len = torch.tensor(lengths, device=q.device).T                           # [B, T]
        slots = self.top_pages(q, kv_len, max(p[0] for p in pages), pages[0][1])  # [B, Hkv, T, K]
        for n in lengths:
            ctx.count(layer, [min(m, slots.shape[-1]) for m in n], n)
        keys, values = cache.view(layer, longest)
        return sparse_attention_queries(q, keys, values, slots, kv_len, scale, softcap)

    def top_pages(self, q, kv_len: torch.Tensor, pages: int, n_sel: int) -> torch.Tensor:
        """The slots of the ``n_sel`` best of the first ``pages`` pages per KV head (the newest page always)
        -> [B, Hkv, n_sel * page_size]; a page past a sequence's length scores -inf and its slots are -1.
        With T queries per sequence (q [B, Hq, T, D], kv_len [B, T]): a choice per query, [B, Hkv, T, K]."""
        ps = self.params.page_size
        multi = kv_len.dim() == 2
        scores = page_scores(q if multi else q[:, :, 0], self.kmin[:, :, :pages], self.kmax[:, :, :pages], kv_len, ps)
        newest = ((kv_len - 1) // ps)[:, None, ..., None].expand(*scores.shape[:-1], 1)
        scores = scores.scatter(-1, newest, float("inf"))
        top = scores.topk(n_sel, dim=-1)                                            # [B, Hkv, (T,) n]
        slots = top.indices[..., None] * ps + torch.arange(ps, device=q.device)
        return torch.where((top.values > float("-inf"))[..., None], slots, -1).flatten(-2)

    # -- the captured decode step -------------------------------------------------------------------
    supports_static = True

    def prepare_static(self, cache) -> None:
        ps = self.params.page_size
        budget = self.params.tokens(max(cache.lengths(self.layer)))
        n_pages = -(-cache.capacity(self.layer) // ps)
        self.static_pages = min(n_pages, max(1, budget // ps))     # pages read per step: a constant
        if self.kmin is None:                                     # nothing written yet
            B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
            self.kmin = torch.zeros(B, H, n_pages, D, dtype=torch.float32, device=cache.device)
            self.kmax = torch.zeros_like(self.kmin)

    def static_count(self, n: int, b: int) -> tuple[int, int]:
        return min(n, self.static_pages * self.params.page_size), n

    def static_decode(self, sctx, q, k, v, scale, softcap):
        """Write, refresh the newest token's page, read the top ``static_pages`` pages (fixed shapes; pages
        past a sequence's length score -inf and their slots are masked)."""
        cache = sctx.cache
        kv_len = sctx.write(self.layer, k, v)
        self._update_one_page(cache, kv_len)
        slots = self.top_pages(q, kv_len, self.kmin.shape[2], self.static_pages)
        keys, values = cache.k[self.layer], cache.v[self.layer]
        return sparse_attention(q[:, :, 0], keys, values, slots, kv_len, scale, softcap)[:, :, None]

