"""short-m@k (Hassid et al. 2025, "Don't Overthink it: Preferring Shorter Thinking Chains"): sample k
answers of one prompt in parallel, stop as soon as m of them have finished, and return the majority
answer among those m; ties go to the answer whose chain is the shortest. ``m == k`` is plain majority
voting over all k answers (the baseline the paper compares with).

How it runs here. The prompt is prefilled once, into a one-sequence cache (with any token pruning the
Program does), and that cache is forked into a k-sequence cache: each layer's prompt k/v is written into
the k rows without running the model again (``fork_prefill``). The cache keeps one contiguous
``[B, Hkv, capacity, D]`` buffer per layer, so sharing the prompt rows between sequences without a copy
is not possible in this layout; the fork copies them once (memory), the prefill's compute is done once.
The k sequences then decode as one batch, each sampling its own tokens; a sequence finishes at a stop
token or at ``max_new_tokens``. When m sequences have finished the loop stops (the others are abandoned
mid-chain: that is where the method saves tokens). The m voters are the first m to finish, ordered by
length and then by batch row when several finish on the same step.

The vote: each voter's answer is read with the configured extractor (``ShortMajorityConfig.answer``);
voters whose answer cannot be read (None) do not vote. The most frequent answer wins; between answers
with equal counts, the one with the shortest chain wins (then the lower row). The returned tokens are
the winning answer's shortest chain. When no voter has a readable answer, the shortest voter is returned.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ...program import Program, ShortMajorityConfig
from ..cache import KVCache
from ..sampling import SamplingConfig, sample
from ..stats import Generation, Stats
from ..steps import decode_step, plan_capacity, prefill
from .loop import check_cache_room, register


@dataclass
class Vote:
    """What short-m@k did for one prompt: all k sampled chains as far as they ran, which ones voted, the
    answers read from them, and the chosen chain."""

    samples: list[list[int]]            # k chains (the ones abandoned at the stop are cut there)
    reasons: list[str]                  # per chain: "stop", "length" or "abandoned"
    voters: list[int]                   # the m rows that finished first (in finishing order)
    answers: list[str | None]           # the extracted answer of each of the k chains (None: unreadable)
    chosen: int                         # the row whose tokens are returned
    answer: str | None                  # the majority answer

    @property
    def tokens_generated(self) -> int:
        """Tokens sampled over all k chains (the cost the method reduces)."""
        return sum(map(len, self.samples))


@dataclass
class VotedGeneration(Generation):
    """A ``Generation`` whose tokens are each prompt's voted answer; ``votes[b]`` tells how it was chosen."""

    votes: list[Vote] = field(default_factory=list)

    @property
    def answers(self) -> list[str | None]:
        return [v.answer for v in self.votes]


def fork_prefill(program: Program, prompt: list[int], k: int, max_new_tokens: int,
                 stats: Stats | None = None) -> tuple[KVCache, torch.Tensor]:
    """Prefill ``prompt`` once and return (a ``k``-sequence cache holding its k/v in every row, the
    next-token logits ``[V]``). Layers keep their own prompt lengths (token pruning keeps fewer in later
    layers), and every row continues at the same RoPE position."""
    capacity = plan_capacity(program, len(prompt), max_new_tokens)
    one = KVCache.for_program(program, 1, capacity)
    logits = prefill(program, one, [prompt], record=stats.selected if stats else None,
                     record_kv=stats.kv_kept if stats else None)
    cache = KVCache.for_program(program, k, [one.capacity(l) for l in range(one.num_layers)])
    for layer in range(one.num_layers):
        n = one.lengths(layer)[0]
        keys, values = one.view(layer, n)
        cache.write(layer, keys.expand(k, -1, -1, -1), values.expand(k, -1, -1, -1))
        cache.advance(layer, [n] * k)
    cache.positions = one.positions * k
    return cache, logits[0]


def vote(chains: list[list[int]], voters: list[int], answers: list[str | None]) -> tuple[int, str | None]:
    """(chosen row, answer): the majority answer among ``voters``; ties by the shortest chain, then row."""
    counts = Counter(answers[i] for i in voters if answers[i] is not None)
    if not counts:
        return min(voters, key=lambda i: (len(chains[i]), i)), None
    best = max(counts.values())
    tied = [a for a, c in counts.items() if c == best]
    row = min((i for i in voters if answers[i] in tied), key=lambda i: (len(chains[i]), i))
    return row, answers[row]


@register(ShortMajorityConfig)
class ShortMajorityDecoder:
    """k sampled chains per prompt over one forked prefill; the first m to finish vote."""

    def __init__(self, config: ShortMajorityConfig):
        if not 1 <= config.m <= config.k:
            raise ValueError(f"short-m@k needs 1 <= m <= k, got m={config.m}, k={config.k}")
        if not callable(config.answer):
            raise ValueError("short-m@k needs an answer extractor (ShortMK(answer=...) completed with the tokenizer "
                             "by skimfx.compile(model, recipe, tokenizer=tok))")
        self.config = config

    def generate(self, program: Program, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 stop_tokens=frozenset(), max_cache_len: int | None = None, callback=None) -> VotedGeneration:
        cfg = self.config
        if sampling.greedy:
            raise ValueError(f"short-m@k samples {cfg.k} different chains and greedy decoding would make them equal: "
                             "pass temperature > 0 (e.g. temperature=0.7)")
        if program.policies:
            raise ValueError("short-m@k forks the prompt's cache into k sequences; the KV cache policies on layers "
                             f"{sorted(program.policies)} keep per-sequence state that is not forked: use it without "
                             "a KV policy recipe")
        if not stop_tokens and cfg.m < cfg.k:
            raise ValueError("short-m@k stops when m chains have finished, and a chain finishes at a stop token: "
                             "give stop tokens (the model's EOS by default)")
        lens = check_cache_room(prompts, max_new_tokens, max_cache_len)
        gen = torch.Generator(device=program.info.device)
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        stats = Stats(prompt_tokens=lens)
        out, reasons, votes = [], [], []
        with torch.inference_mode():
            for b, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                cache, logits = fork_prefill(program, prompt, cfg.k, max_new_tokens, stats)
                tok = sample(logits[None].expand(cfg.k, -1), sampling, gen)
                stats.ttft_s += time.perf_counter() - t0
                t1 = time.perf_counter()
                chains: list[list[int]] = [[] for _ in range(cfg.k)]
                why = ["abandoned"] * cfg.k
                finished: list[int] = []
                while True:
                    for row, t in enumerate(tok.tolist()):
                        if row in finished:
                            continue
                        chains[row].append(t)
                        if t in stop_tokens or len(chains[row]) >= max_new_tokens:
                            why[row] = "stop" if t in stop_tokens else "length"
                            finished.append(row)        # rows finishing on one step: in row order
                    if len(finished) >= cfg.m:
                        break
                    tok = sample(decode_step(program, cache, tok), sampling, gen)
                stats.decode_s += time.perf_counter() - t1
                voters = finished[:cfg.m]
                answers = [cfg.answer(c) for c in chains]
                chosen, answer = vote(chains, voters, answers)
                v = Vote(chains, why, voters, answers, chosen, answer)
                stats.decode_tokens += v.tokens_generated - cfg.k       # the first token of each came from prefill
                stats.kv_bytes = max(stats.kv_bytes, cache.nbytes())
                votes.append(v)
                out.append(list(chains[chosen]))
                reasons.append(why[chosen])
                if callback is not None:
                    for t in chains[chosen]:
                        callback(b, t)
        return VotedGeneration(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts],
                               votes=votes)


__all__ = ["ShortMajorityDecoder", "Vote", "VotedGeneration", "fork_prefill", "vote"]
