"""Lossless self-speculation: draft with the sources in order, verify with the full model (over the KV
cache policies, whose verification reads per token what decoding reads, and whose rollback restores their
state)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...program import SpeculativeConfig
from ..cache import KVCache
from ..executor import Executor
from ..stats import DecodeStats
from .batched import generate_batched
from .drafts import NGramDrafts, accepted_count, side_corpus
from .loop import DecodeState, decode_loop, next_token, register, step_env
from .schedule import Acceptance, StepCosts, StepTimer, average


@dataclass
class SpeculativeState(DecodeState):
    """One sequence's self-speculation state: the n-gram index, the timed plain step, and per source the
    acceptance and the step costs."""

    ngram: NGramDrafts = field(default_factory=NGramDrafts)
    plain: float | None = None          # a plain step's time (exponentially averaged); None until one is timed
    # acceptance by model source ("exit", "skip"), and for n-gram drafts by match length (a 2-gram match is a
    # weaker hint than a 4-gram one)
    acceptance: dict[str, Acceptance] = field(default_factory=dict)
    ngram_acceptance: dict[int, Acceptance] = field(default_factory=dict)
    # step costs by source (they depend on the verification's width, not on the match)
    costs: dict[str, StepCosts] = field(default_factory=dict)


@register(SpeculativeConfig)
class SpeculativeDecoder:
    """Draft with ``sources`` (tried in order: "lookahead", "exit", "skip"), verify with the full model.

    Adaptive (the default): each step, each source in turn is used with the number of drafts that
    maximises its expected tokens per second (measured step times ``StepCosts``, acceptance so far
    ``Acceptance``); a source whose best rate is below plain decoding's is passed over, and tried
    again after ``retry_after`` idle steps (twice as many after each retry that still does not pay) so
    that its acceptance estimate can recover. Not adaptive: every step drafts ``draft_tokens`` tokens
    from the first source that has a draft."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.sources = config.sources
        self.draft_tokens = config.draft_tokens
        self.exit_layer = config.exit_layer
        self.adaptive = config.adaptive
        self.min_gain = config.min_gain        # a source drafts when its expected rate exceeds plain decoding's x this
        self.retry_after = config.retry_after  # idle steps before a passed-over source drafts again
        self.ngram = config.ngram
        self.skip_layers = config.skip_layers  # the layers a "skip" draft pass leaves out (Draft&Verify)
        self.prior = dict(config.prior)
        self.extra_slots = config.draft_tokens + 1     # a step writes its drafts past the last kept token

    def __str__(self) -> str:
        return str(self.config)

    def generate(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback):
        """A batch of prompts with n-gram drafts only: verified together (``batched.generate_batched``);
        otherwise prompt by prompt (the shared loop)."""
        if self.config.batched and len(prompts) > 1 and self.sources == ("lookahead",):
            return generate_batched(self.config, program, prompts, max_new_tokens, sampling, stop_tokens,
                                    max_cache_len, callback)
        return decode_loop(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback)

    def start(self, ex: Executor, cache: KVCache, history: list[int]) -> SpeculativeState:
        prior = self.prior
        return SpeculativeState(
            history, ngram=NGramDrafts(*self.ngram, corpus=side_corpus(self.config, history[:-1])),
            acceptance={s: Acceptance(prior[s]) for s in self.sources if s != "lookahead"},
            ngram_acceptance={n: Acceptance(prior["lookahead"]) for n in range(self.ngram[0], self.ngram[1] + 1)},
            costs={s: StepCosts() for s in self.sources})

    # -- one step ---------------------------------------------------------------------------------
    def step(self, ex: Executor, cache: KVCache, state: SpeculativeState, tok: int, ds: DecodeStats) -> list[int]:
        for src in self.sources:
            if self.adaptive and state.plain is None:
                break                                            # time one plain step first
            timer = StepTimer()
            drafts = state.ngram.propose(state.history, self.draft_tokens) if src == "lookahead" else None
            if drafts == []:
                continue                                         # no earlier occurrence of the suffix
            acc = state.acceptance[src] if drafts is None else state.ngram_acceptance[state.ngram.order]
            k = self.draft_tokens if drafts is None else len(drafts)
            if self.adaptive:
                # n-gram drafts cost little to make: start long; model drafts cost layers: start short
                first = self.draft_tokens if src == "lookahead" else 2
                k, rate = acc.best(k, state.costs[src], state.plain, first)
                patience = acc.patience or self.retry_after
                if rate * state.plain < self.min_gain:
                    if acc.idle < patience:
                        acc.idle += 1
                        continue                                 # not worth it now
                    acc.patience = 2 * patience                  # a retry; the next one waits twice as long
                else:
                    acc.patience = None
            if src == "lookahead":
                drafts = drafts[:k]
                new, n = self._verify_full(ex, cache, tok, drafts)
            elif src == "exit":
                new, n, drafts = self._exit_draft_and_verify(ex, cache, tok, k)
            else:
                new, n, drafts = self._skip_draft_and_verify(ex, cache, tok, k)
            acc.observe(len(drafts), n)
            if src == "lookahead":
                state.ngram.observe(n)
            state.costs[src].add(len(drafts), timer.seconds())
            ds.drafted[src] = ds.drafted.get(src, 0) + len(drafts)
            ds.accepted[src] = ds.accepted.get(src, 0) + n
            ds.verify_steps[src] = ds.verify_steps.get(src, 0) + 1
            return new
        timer = StepTimer()
        new = self._plain(ex, cache, tok)
        state.plain = average(state.plain, timer.seconds())
        ds.plain_steps += 1
        return new

    @staticmethod
    def _plain(ex: Executor, cache: KVCache, tok: int) -> list[int]:
        pos = cache.positions[0]
        ctx, env = step_env(ex, cache, [tok], pos)
        ex.run_layers(ctx, env, 0, ex.num_layers)
        cache.positions = [pos + 1]
        return [next_token(ex, ctx, env)]

    @staticmethod
    def _accept(cache: KVCache, pos: int, drafts: list[int], logits: torch.Tensor):
        """Keep the drafts the full model agrees with, plus its own next token; roll the rest back."""
        preds = logits.argmax(-1).tolist()                                           # [k + 1]
        n = accepted_count(preds, drafts)
        cache.rollback([n + 1])
        cache.end_speculation()
        cache.positions = [pos + n + 1]
        return drafts[:n] + [preds[n]], n

    def _verify_full(self, ex: Executor, cache: KVCache, tok: int, drafts: list[int]):
        pos = cache.positions[0]
        cache.begin_speculation()
        ctx, env = step_env(ex, cache, [tok] + drafts, pos)
        ex.run_layers(ctx, env, 0, ex.num_layers)
        return self._accept(cache, pos, drafts, ex.logits(ctx, env)[0])

    def _exit_draft_and_verify(self, ex: Executor, cache: KVCache, tok: int, k: int):
        """LayerSkip: k drafts from the first E + 1 layers and the exit branch (their k/v are kept), then
        layers E + 1.. verify the last token and the drafts from their layer-E states."""
        E = self.exit_layer
        pos = cache.positions[0]
        cache.begin_speculation()
        hs, drafts, x = [], [], tok
        for i in range(k + 1):                       # k drafts, then the last draft's layer-E state
            ctx, env = step_env(ex, cache, [x], pos + i)
            ex.run_layers(ctx, env, 0, E + 1)
            hs.append(ex.hidden(env, E))
            if i == k:
                break
            top, _, _ = ex.exit(ctx, env, E)
            x = int(top[-1])
            drafts.append(x)
        ctx, env = step_env(ex, cache, [tok] + drafts, pos)                          # positions (cos / sin)
        ex.set_hidden(env, E, torch.cat(hs, dim=1))
        ex.run_layers(ctx, env, E + 1, ex.num_layers)
        new, n = self._accept(cache, pos, drafts, ex.logits(ctx, env)[0])
        return new, n, drafts

    def _skip_draft_and_verify(self, ex: Executor, cache: KVCache, tok: int, k: int):
        """Draft&Verify: k drafts from the model without ``skip_layers`` (the kept layers cache the drafts'
        k/v, overwritten by the verification), then one full pass over the last token and the drafts."""
        pos = cache.positions[0]
        cache.begin_speculation()
        drafts, x = [], tok
        for i in range(k):
            ctx, env = step_env(ex, cache, [x], pos + i)
            ex.run_layers(ctx, env, 0, ex.num_layers, skip=self.skip_layers)
            x = next_token(ex, ctx, env)
            drafts.append(x)
        cache.rollback([0])
        cache.end_speculation()
        new, n = self._verify_full(ex, cache, tok, drafts)
        return new, n, drafts


__all__ = ["SpeculativeDecoder", "SpeculativeState"]
