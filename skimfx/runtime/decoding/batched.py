"""Batched self-speculation: the n-gram drafts of a whole batch verified in one pass.

Decoding a batch prompt by prompt pays the per-step overhead (the host work of a forward, the weights read
once per pass) B times per token. Here every sequence proposes its own drafts (Lookahead-style: the tokens
that followed the latest earlier occurrence of its last n tokens), and one forward verifies the batch:
sequence b feeds its last token plus its k_b drafts, so draft lengths are ragged (``Ctx.n_valid``), and the
rows are packed side by side (``runtime/packing.py``), so the pass computes no padding. Each row keeps the
drafts up to its first mismatch plus the model's own next token, and ``KVCache.rollback`` forgets each row's
rejected drafts on its own (the KV policies restore their state per row). A finished sequence stays in the
batch with no tokens (``n_valid = 0``) until all finish.

Lossless: row b's tokens are the greedy tokens that ``b`` alone produces (up to the floating-point
differences of a batched matmul; the tests compare tokens).

Draft length: every row drafts up to a common width K. Adaptive, K maximises the batch's expected tokens
per second: the sum over rows of the expected emitted tokens (each row's acceptance by n-gram order,
``Acceptance``) over the measured time of a pass over as many packed tokens as width K feeds (``StepCosts``
by token count, plain batched steps included)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ...program import Program
from ..cache import KVCache
from ..context import Ctx
from ..executor import Executor
from ..packing import PackedRows
from ..sampling import SamplingConfig
from ..stats import DecodeStats, Generation, Stats
from ..steps import plan_capacity, prefill
from .drafts import NGramDrafts, accepted_count, side_corpus
from .loop import check_cache_room
from .schedule import Acceptance, StepCosts, StepTimer


class _Row:
    """One sequence of the batch: its history, its n-gram index and acceptance by n-gram order."""

    def __init__(self, history: list[int], ngram: tuple[int, int], prior: float, corpus: list[int] | None):
        self.history = history
        self.ngram = NGramDrafts(*ngram, corpus=corpus)
        self.acceptance = {n: Acceptance(prior) for n in range(ngram[0], ngram[1] + 1)}
        self.proposal: list[int] = []
        self.order = 0
        self.done = False


def choose_width(rows: list[_Row], costs: StepCosts, k_max: int) -> int:
    """The common draft width K with the best expected tokens per second for the batch. A pass costs what
    its packed token count costs (``costs``: measured by token count, plain steps included), so a row
    with a short proposal or none adds only the tokens it feeds."""
    live = [r for r in rows if not r.done]
    k_max = min(k_max, max((len(r.proposal) for r in live), default=0))
    best, width = 0.0, 0
    for K in range(k_max + 1):
        fed = [min(K, len(r.proposal)) for r in live]
        # a row emits its accepted drafts plus the model's own token (1 for a row without drafts)
        tokens = sum(r.acceptance[r.order].expected(k) if k else 1.0 for r, k in zip(live, fed))
        rate = tokens / costs(sum(fed) + len(live))
        if rate > best:
            best, width = rate, K
    return width


def generate_batched(config, program: Program, prompts: list[list[int]], max_new_tokens: int,
                     sampling: SamplingConfig, stop_tokens, max_cache_len: int | None,
                     callback: Callable[[int, int], None] | None) -> Generation:
    """Greedy self-speculation with n-gram drafts over the whole batch at once (``config``: a
    ``SpeculativeConfig`` whose only source is "lookahead")."""
    if not sampling.greedy:
        raise ValueError("self-speculation decodes greedily (lossless verification compares argmax tokens); use "
                         "temperature=0")
    lens = check_cache_room(prompts, max_new_tokens, max_cache_len)
    B = len(prompts)
    stats = Stats(prompt_tokens=lens)
    ds = DecodeStats()
    ex = Executor(program)
    dev = program.info.device
    prior = dict(config.prior)["lookahead"]
    costs, widest = StepCosts(), 0                      # step time by packed token count; widest K verified
    with torch.inference_mode():
        capacity = plan_capacity(program, max(lens), max_new_tokens + config.draft_tokens + 1)
        cache = KVCache.for_program(program, B, capacity)
        t0 = time.perf_counter()
        logits = prefill(program, cache, prompts, record=stats.selected, record_kv=stats.kv_kept)
        first = logits.argmax(-1).tolist()
        stats.ttft_s = time.perf_counter() - t0
        stats.kv_prefill_bytes = cache.nbytes()
        t1 = time.perf_counter()
        rows = [_Row(list(p) + [t], config.ngram, prior, side_corpus(config, p)) for p, t in zip(prompts, first)]
        out = [[t] for t in first]
        for b, t in enumerate(first):
            if callback is not None:
                callback(b, t)
            rows[b].done = t in stop_tokens or max_new_tokens <= 1
        while not all(r.done for r in rows):
            for b, r in enumerate(rows):
                room = max_new_tokens - len(out[b]) - 1          # drafts past the last wanted token are waste
                r.proposal = [] if r.done else r.ngram.propose(r.history, min(config.draft_tokens, room))
                r.order = r.ngram.order if r.proposal else 0
            if not config.adaptive:
                K = config.draft_tokens
            elif not costs.seconds:
                K = 0                                           # time one plain batched step first
            else:                                               # widths grow by doubling, as in speculative.py
                K = choose_width(rows, costs, min(config.draft_tokens, 2 * widest or config.draft_tokens))
            drafts = [[] if r.done else r.proposal[:K] for r in rows]
            ids = [[] if r.done else [r.history[-1]] + d for r, d in zip(rows, drafts)]
            n_valid = [len(i) for i in ids]
            timer = StepTimer()
            preds = _verify(ex, program, cache, ids, n_valid, dev)
            width = max(len(d) for d in drafts)
            costs.add(sum(n_valid), timer.seconds())
            widest = max(widest, width)
            if width == 0:
                ds.plain_steps += 1
            else:
                ds.verify_steps["lookahead"] = ds.verify_steps.get("lookahead", 0) + 1
            keep = []
            for b, (r, d) in enumerate(zip(rows, drafts)):
                if r.done:
                    keep.append(0)
                    continue
                n = accepted_count(preds[b], d)
                keep.append(n + 1)
                if d:
                    r.acceptance[r.order].observe(len(d), n)
                    r.ngram.observe(n)
                    ds.drafted["lookahead"] = ds.drafted.get("lookahead", 0) + len(d)
                    ds.accepted["lookahead"] = ds.accepted.get("lookahead", 0) + n
                for t in d[:n] + [preds[b][n]]:
                    if len(out[b]) >= max_new_tokens:
                        break
                    out[b].append(t)
                    r.history.append(t)
                    if callback is not None:
                        callback(b, t)
                    if t in stop_tokens:
                        break
                r.done = out[b][-1] in stop_tokens or len(out[b]) >= max_new_tokens
            cache.rollback(keep)
            cache.end_speculation()
            cache.positions = [p + k for p, k in zip(cache.positions, keep)]
        stats.decode_s = time.perf_counter() - t1
    stats.decode_tokens = sum(len(s) - 1 for s in out)
    stats.kv_bytes = cache.nbytes()
    ds.layer_tokens += ex.layer_tokens
    ds.tokens = stats.decode_tokens
    stats.decoding = ds
    reasons = ["stop" if s[-1] in stop_tokens else "length" for s in out]
    return Generation(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts])


def _verify(ex: Executor, program: Program, cache: KVCache, ids: list[list[int]], n_valid: list[int], dev):
    """One pass over each row's last token and drafts under ``begin_speculation``; returns each row's greedy
    predictions after each of its tokens (an empty list for a finished row, which feeds nothing).

    The rows are packed (``PackedRows``): the linears see only the batch's real tokens, not the rows padded
    to the longest draft (on a CPU a pass costs about its token count once past a few rows)."""
    cache.begin_speculation()
    packed = PackedRows(n_valid, dev)
    ctx = Ctx(cache, n_valid, program, packed=packed)
    env = ex.embed(ctx, packed.pack_ids(ids), packed.positions(cache.positions))
    ex.run_layers(ctx, env, 0, ex.num_layers)
    return [p.tolist() for p in packed.split(ex.logits(ctx, env).argmax(-1))]


__all__ = ["generate_batched", "choose_width"]
