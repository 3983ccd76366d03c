"""Decoding modes that run fewer layers per token: lossy early exit (CALM) and lossless
self-speculation (LayerSkip-style exit drafts, Draft&Verify-style layer-skipping drafts, Lookahead-style
n-gram drafts).

Both run on the stages of a Program that went through the ``early_exit`` pass (for exit drafts and
early exit) and decode greedily, one sequence at a time (a batch of prompts is decoded prompt by
prompt; the prefill, with any pruning, is the ordinary one).

- ``EarlyExitDecoding``: after each exit layer E, the exit branch returns the top-1 token and its
  probability; when it reaches E's threshold the token is emitted, the layers above E get the k/v
  of the exited hidden state (``program.kv_fill``), and the step ends. Lossy: thresholds trade
  agreement with dense for speed (``calibrate_exits`` picks them for a target agreement).
- ``SpeculativeDecoding``: draft k tokens cheaply, run the full model once on the last token plus the
  k drafts, keep the drafts up to the first one the full model would not have chosen, plus the full
  model's own next token; roll the cache back past the rejected drafts. Greedy verification makes
  the output the dense greedy output. Draft sources: "exit" (the first E+1 layers and the exit
  branch; their k/v are kept and the verification runs only layers E+1.. on the drafted tokens'
  layer-E states, as LayerSkip does), "skip" (the model without a calibrated set of layers,
  ``calibrate_skip``, as Draft&Verify does; the verification runs every layer) and "lookahead" (the
  tokens that followed the latest earlier occurrence of the last n tokens in the prompt or the text
  so far). The number of drafts is chosen each step for the best expected tokens per second from the
  measured step times and the acceptance so far; a source that does not beat plain decoding is passed
  over and retried later.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..program import Program
from .cache import KVCache
from .engine import Ctx, Generation, Stats, plan_capacity, prefill


# ----------------------------------------------------------------------------------------------
# running stages one at a time
# ----------------------------------------------------------------------------------------------
class _Runner:
    """One sequence's cache and the stages, for decoding steps that stop, skip or resume layers."""

    def __init__(self, program: Program, cache: KVCache):
        self.program = program
        self.cache = cache
        self.prologue = program.stages[0]
        self.layers = program.layer_stages
        self.epilogue = program.stages[-1]
        self.L = len(self.layers)
        self.layer_tokens = 0                       # layers x tokens computed during decode

    @property
    def pos(self) -> int:
        return self.cache.positions[0]

    def ctx(self, T: int) -> Ctx:
        return Ctx(self.cache, [T], self.program)

    def embed(self, ctx: Ctx, ids: list[int], start: int) -> dict:
        dev = self.program.info.device
        x = torch.tensor([ids], device=dev)
        pos = torch.arange(start, start + len(ids), device=dev)[None]
        env = {"input_ids": x, "position_ids": pos}
        env.update(zip(self.prologue.outputs, self.prologue.module(ctx, *[env[n] for n in self.prologue.inputs])))
        return env

    def run_layers(self, ctx: Ctx, env: dict, lo: int, hi: int, T: int, skip: tuple[int, ...] = ()) -> dict:
        """Layers lo..hi-1 on ``env``; a layer in ``skip`` passes its input hidden state through (and caches
        nothing)."""
        for l in range(lo, hi):
            st = self.layers[l]
            if l in skip:
                env[st.outputs[0]] = env[st.inputs[0]]
                continue
            env.update(zip(st.outputs, st.module(ctx, *[env[n] for n in st.inputs])))
            self.layer_tokens += T
        return env

    def hidden(self, env: dict, layer: int) -> torch.Tensor:
        return env[self.layers[layer].outputs[0]]

    def exit(self, ctx: Ctx, env: dict, layer: int):
        st = self.program.exits[layer]
        tok, prob, _ = st.module(ctx, *[env[n] for n in st.inputs])
        return int(tok[-1]), float(prob[-1])

    def logits(self, ctx: Ctx, env: dict) -> torch.Tensor:
        (out,) = self.epilogue.module(ctx, *[env[n] for n in self.epilogue.inputs])
        return out[0]                                                                # [T, V]

    def fill_kv(self, env: dict, layer: int) -> None:
        """CALM state propagation: layers above ``layer`` cache k/v computed from its output."""
        h = self.hidden(env, layer)
        for m in range(layer + 1, self.L):
            st = self.program.kv_fill[m]
            args = [h if i == 0 else env[n] for i, n in enumerate(st.inputs)]
            k, v = st.module(None, *args)
            self.cache.write(m, k, v)
            self.cache.advance(m, [k.shape[2]])

    def lengths(self) -> list[int]:
        return [self.cache.lengths(l)[0] for l in range(self.L)]

    def rollback(self, base: list[int], keep: int) -> None:
        for l, b in enumerate(base):
            self.cache.truncate(l, [b + keep])


# ----------------------------------------------------------------------------------------------
# the generation loop shared by the modes
# ----------------------------------------------------------------------------------------------
@dataclass
class DecodeStats:
    """What a decoding mode did, summed over the prompts of a call."""

    tokens: int = 0
    layer_tokens: int = 0                                    # layers x tokens computed in decode
    exits: dict[int, int] = field(default_factory=dict)      # exit layer -> tokens emitted there
    drafted: dict[str, int] = field(default_factory=dict)    # draft source -> drafted tokens
    accepted: dict[str, int] = field(default_factory=dict)   # draft source -> accepted drafts
    verify_steps: dict[str, int] = field(default_factory=dict)
    plain_steps: int = 0

    def acceptance(self, source: str) -> float:
        return self.accepted.get(source, 0) / self.drafted[source] if self.drafted.get(source) else float("nan")


def _decode_loop(mode, program: Program, prompts: list[list[int]], max_new_tokens: int, sampling, stop_tokens,
                 max_cache_len, callback) -> Generation:
    if not sampling.greedy:
        raise ValueError(f"{type(mode).__name__} decodes greedily (lossless verification and calibrated exits "
                         "compare argmax tokens); use temperature=0")
    lens = [len(p) for p in prompts]
    if max_cache_len is not None and max(lens) + max_new_tokens > max_cache_len:
        raise ValueError(f"the longest prompt has {max(lens)} tokens and max_new_tokens={max_new_tokens}: "
                         f"{max(lens) + max_new_tokens} > max_cache_len={max_cache_len}; shorten the prompt or ask "
                         "for fewer tokens")
    stats = Stats(prompt_tokens=lens)
    ds = DecodeStats()
    out, reasons = [], []
    extra = getattr(mode, "draft_tokens", 0) + 1          # speculative steps write past the last kept token
    with torch.inference_mode():
        for b, prompt in enumerate(prompts):
            cache = KVCache.for_program(program, 1, plan_capacity(program, len(prompt), max_new_tokens + extra))
            t0 = time.perf_counter()
            logits = prefill(program, cache, [prompt], record=stats.selected, record_kv=stats.kv_kept)
            tok = int(logits[0].argmax())
            stats.ttft_s += time.perf_counter() - t0
            run = _Runner(program, cache)
            seq, reason = [tok], "length"
            if callback is not None:
                callback(b, tok)
            t1 = time.perf_counter()
            state = mode.start(run, list(prompt) + [tok])
            while tok not in stop_tokens and len(seq) < max_new_tokens:
                new = mode.step(run, state, tok, ds)
                for t in new:
                    if len(seq) >= max_new_tokens:
                        break
                    seq.append(t)
                    state.history.append(t)
                    if callback is not None:
                        callback(b, t)
                    if t in stop_tokens:
                        break
                tok = seq[-1]
            if tok in stop_tokens:
                reason = "stop"
            stats.decode_s += time.perf_counter() - t1
            stats.decode_tokens += len(seq) - 1
            ds.layer_tokens += run.layer_tokens
            stats.kv_bytes = max(stats.kv_bytes, cache.nbytes())
            out.append(seq)
            reasons.append(reason)
    ds.tokens = stats.decode_tokens
    stats.decoding = ds
    return Generation(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts])


@dataclass
class _State:
    history: list[int]                                       # prompt + emitted tokens
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# lossy early exit (CALM)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EarlyExitDecoding:
    """Exit at the first exit layer whose top-1 probability reaches its threshold."""

    thresholds: tuple[tuple[int, float], ...]                # (layer, threshold), ascending layers

    def __str__(self) -> str:
        return "early exit (lossy): " + ", ".join(f"layer {l} if p >= {t:.3g}" for l, t in self.thresholds)

    def generate(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback):
        return _decode_loop(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback)

    def start(self, run: _Runner, history: list[int]) -> _State:
        return _State(history)

    def step(self, run: _Runner, state: _State, tok: int, ds: DecodeStats) -> list[int]:
        ctx = run.ctx(1)
        env = run.embed(ctx, [tok], run.pos)
        done = 0
        for layer, thr in self.thresholds:
            run.run_layers(ctx, env, done, layer + 1, 1)
            done = layer + 1
            top, prob = run.exit(ctx, env, layer)
            if prob >= thr:
                run.fill_kv(env, layer)
                run.cache.positions = [run.pos + 1]
                ds.exits[layer] = ds.exits.get(layer, 0) + 1
                return [top]
        run.run_layers(ctx, env, done, run.L, 1)
        run.cache.positions = [run.pos + 1]
        ds.exits[run.L - 1] = ds.exits.get(run.L - 1, 0) + 1
        return [int(run.logits(ctx, env)[-1].argmax())]


# ----------------------------------------------------------------------------------------------
# lossless self-speculation
# ----------------------------------------------------------------------------------------------
class NGramDrafts:
    """Lookahead drafts: the tokens after the latest earlier occurrence of the last n tokens (n from
    ``max_n`` down to ``min_n``) in the prompt and the text so far. ``order`` is the n of the last
    proposal (longer matches are better drafts; the schedule keeps their acceptance apart)."""

    def __init__(self, min_n: int = 2, max_n: int = 4):
        self.min_n, self.max_n = min_n, max_n
        self.index: dict[tuple[int, ...], int] = {}          # n-gram -> end position of its latest occurrence
        self.upto = 0                                        # n-grams ending before this position are indexed
        self.order = 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        end = len(tokens) - 1                                # index every n-gram that ends before the last token
        for j in range(self.upto, end):
            for n in range(self.min_n, self.max_n + 1):
                if j - n + 1 >= 0:
                    self.index[tuple(tokens[j - n + 1:j + 1])] = j
        self.upto = max(self.upto, end)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) < n:
                continue
            j = self.index.get(tuple(tokens[-n:]))
            if j is not None:
                self.order = n
                return tokens[j + 1:j + 1 + k]
        self.order = 0
        return []


class _Costs:
    """Measured time of a whole draft-and-verify step by the number of drafts k (exponentially averaged).

    How the cost grows with k is the machine's business: on a GPU a wider verification is almost free,
    on a few CPU cores a pass over 2 tokens can cost twice a pass over 1 while 9 tokens cost little
    more than 2, so it is measured, not modelled. An unmeasured k is interpolated linearly between the
    measured ones, a plain step standing for k = 0, and extrapolated along the line through the two
    largest (a model draft costs its layers once per token)."""

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def add(self, k: int, seconds: float) -> None:
        old = self.seconds.get(k)
        self.seconds[k] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def __call__(self, k: int, plain: float) -> float:
        if k in self.seconds:
            return self.seconds[k]
        lo = max((j for j in self.seconds if j < k), default=0)
        hi = min((j for j in self.seconds if j > k), default=None)
        c_lo = self.seconds.get(lo, plain)
        if hi is None:                                       # above every measured k
            lo2 = max((j for j in self.seconds if j < lo), default=0)
            c_lo2 = self.seconds.get(lo2, plain)
            return c_lo + max(0.0, c_lo - c_lo2) * (k - lo) / (lo - lo2) if lo > 0 else c_lo
        return c_lo + (self.seconds[hi] - c_lo) * (k - lo) / (hi - lo)


class _Acceptance:
    """The probability that a draft token is accepted given that its predecessors were: a geometric
    model with decayed counts and a prior. A step with k drafts then emits ``(1 - p^(k+1)) / (1 - p)``
    tokens on average."""

    def __init__(self, prior: float, decay: float = 0.9):
        self.hits, self.misses = 2.0 * prior, 2.0 * (1 - prior)
        self.decay = decay
        self.idle = 0                                         # steps passed over since this kind last drafted
        self.patience: int | None = None                      # idle steps before a retry (doubles while it fails)

    def observe(self, k: int, accepted: int) -> None:
        self.hits = self.decay * self.hits + accepted
        self.misses = self.decay * self.misses + (accepted < k)
        self.idle = 0

    def best(self, k_max: int, cost: _Costs, plain: float, first: int) -> tuple[int, float]:
        """(k, expected tokens per second) at the best k, given a plain step's time. Drafts grow at most
        to twice the longest measured one (``first`` before any is measured): exploring a long draft
        that turns out slow costs one step, and doubling bounds that step."""
        p = min(self.hits / (self.hits + self.misses), 0.999)
        k_max = min(k_max, 2 * max(cost.seconds, default=first // 2))
        rates = [((1 - p ** (k + 1)) / (1 - p) / cost(k, plain), k) for k in range(1, k_max + 1)]
        rate, k = max(rates)
        return k, rate


@dataclass(frozen=True)
class SpeculativeDecoding:
    """Draft with ``sources`` (tried in order: "lookahead", "exit", "skip"), verify with the full model.

    Adaptive (the default): each step, each source in turn is used with the number of drafts that
    maximises its expected tokens per second (measured step times ``_Costs``, acceptance so far
    ``_Acceptance``); a source whose best rate is below plain decoding's is passed over, and tried
    again after ``retry_after`` idle steps (twice as many after each retry that still does not pay) so
    that its acceptance estimate can recover. Not adaptive: every step drafts ``draft_tokens`` tokens
    from the first source that has a draft."""

    sources: tuple[str, ...]
    draft_tokens: int = 8
    exit_layer: int | None = None
    adaptive: bool = True
    min_gain: float = 1.0            # a source drafts when its expected rate exceeds plain decoding's x this
    retry_after: int = 16            # idle steps before a passed-over source drafts again
    ngram: tuple[int, int] = (2, 4)
    skip_layers: tuple[int, ...] = ()   # the layers a "skip" draft pass leaves out (Draft&Verify)
    prior: tuple[tuple[str, float], ...] = (("lookahead", 0.7), ("exit", 0.5), ("skip", 0.5))

    def __str__(self) -> str:
        where = {"exit": f" (layer {self.exit_layer})", "skip": f" (skipping layers {list(self.skip_layers)})"}
        src = " then ".join(s + where.get(s, "") for s in self.sources)
        return (f"self-speculative (lossless): drafts from {src}, up to {self.draft_tokens} tokens"
                + (", adaptive" if self.adaptive else ""))

    def generate(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback):
        return _decode_loop(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback)

    def start(self, run: _Runner, history: list[int]) -> _State:
        prior = dict(self.prior)
        # acceptance by source, and for n-gram drafts by match length (a 2-gram match is a weaker hint than
        # a 4-gram one); step costs by source (they depend on the verification's width, not on the match)
        acc = {s: _Acceptance(prior[s]) for s in self.sources if s != "lookahead"}
        acc |= {("lookahead", n): _Acceptance(prior["lookahead"]) for n in range(self.ngram[0], self.ngram[1] + 1)}
        return _State(history, {"ngram": NGramDrafts(*self.ngram), "plain": None, "acceptance": acc,
                                "cost": {s: _Costs() for s in self.sources}})

    # -- one step ---------------------------------------------------------------------------------
    def step(self, run: _Runner, state: _State, tok: int, ds: DecodeStats) -> list[int]:
        x = state.extra
        for src in self.sources:
            if self.adaptive and x["plain"] is None:
                break                                            # time one plain step first
            t0 = time.perf_counter()
            drafts = x["ngram"].propose(state.history, self.draft_tokens) if src == "lookahead" else None
            if drafts == []:
                continue                                         # no earlier occurrence of the suffix
            acc: _Acceptance = x["acceptance"][src if drafts is None else (src, x["ngram"].order)]
            k = self.draft_tokens if drafts is None else len(drafts)
            if self.adaptive:
                # n-gram drafts cost little to make: start long; model drafts cost layers: start short
                first = self.draft_tokens if src == "lookahead" else 2
                k, rate = acc.best(k, x["cost"][src], x["plain"], first)
                patience = acc.patience or self.retry_after
                if rate * x["plain"] < self.min_gain:
                    if acc.idle < patience:
                        acc.idle += 1
                        continue                                 # not worth it now
                    acc.patience = 2 * patience                  # a retry; the next one waits twice as long
                else:
                    acc.patience = None
            if src == "lookahead":
                drafts = drafts[:k]
                new, n = self._verify_full(run, tok, drafts)
            elif src == "exit":
                new, n, drafts = self._exit_draft_and_verify(run, tok, k)
            else:
                new, n, drafts = self._skip_draft_and_verify(run, tok, k)
            acc.observe(len(drafts), n)
            x["cost"][src].add(len(drafts), time.perf_counter() - t0)
            ds.drafted[src] = ds.drafted.get(src, 0) + len(drafts)
            ds.accepted[src] = ds.accepted.get(src, 0) + n
            ds.verify_steps[src] = ds.verify_steps.get(src, 0) + 1
            return new
        t0 = time.perf_counter()
        new = self._plain(run, tok)
        dt = time.perf_counter() - t0
        x["plain"] = dt if x["plain"] is None else 0.7 * x["plain"] + 0.3 * dt
        ds.plain_steps += 1
        return new

    def _plain(self, run: _Runner, tok: int) -> list[int]:
        ctx = run.ctx(1)
        env = run.embed(ctx, [tok], run.pos)
        run.run_layers(ctx, env, 0, run.L, 1)
        run.cache.positions = [run.pos + 1]
        return [int(run.logits(ctx, env)[-1].argmax())]

    @staticmethod
    def _accept(run: _Runner, base: list[int], pos: int, drafts: list[int], logits: torch.Tensor):
        """Keep the drafts the full model agrees with, plus its own next token; roll the rest back."""
        preds = logits.argmax(-1).tolist()                                           # [k + 1]
        n = 0
        while n < len(drafts) and preds[n] == drafts[n]:
            n += 1
        run.rollback(base, n + 1)
        run.cache.positions = [pos + n + 1]
        return drafts[:n] + [preds[n]], n

    def _verify_full(self, run: _Runner, tok: int, drafts: list[int]):
        base, pos = run.lengths(), run.pos
        T = len(drafts) + 1
        ctx = run.ctx(T)
        env = run.embed(ctx, [tok] + drafts, pos)
        run.run_layers(ctx, env, 0, run.L, T)
        return self._accept(run, base, pos, drafts, run.logits(ctx, env))

    def _exit_draft_and_verify(self, run: _Runner, tok: int, k: int):
        E = self.exit_layer
        base, pos = run.lengths(), run.pos
        hs, drafts, x = [], [], tok
        for i in range(k + 1):                       # k drafts, then the last draft's layer-E state
            ctx = run.ctx(1)
            env = run.embed(ctx, [x], pos + i)
            run.run_layers(ctx, env, 0, E + 1, 1)
            hs.append(run.hidden(env, E))
            if i == k:
                break
            x, _ = run.exit(ctx, env, E)
            drafts.append(x)
        T = k + 1
        ctx = run.ctx(T)
        env = run.embed(ctx, [tok] + drafts, pos)                                   # positions (cos / sin)
        env[run.layers[E].outputs[0]] = torch.cat(hs, dim=1)
        run.run_layers(ctx, env, E + 1, run.L, T)
        new, n = self._accept(run, base, pos, drafts, run.logits(ctx, env))
        return new, n, drafts


    def _skip_draft_and_verify(self, run: _Runner, tok: int, k: int):
        """Draft&Verify: k drafts from the model without ``skip_layers`` (the kept layers cache the drafts'
        k/v, overwritten by the verification), then one full pass over the last token and the drafts."""
        base, pos = run.lengths(), run.pos
        drafts, x = [], tok
        for i in range(k):
            ctx = run.ctx(1)
            env = run.embed(ctx, [x], pos + i)
            run.run_layers(ctx, env, 0, run.L, 1, skip=self.skip_layers)
            x = int(run.logits(ctx, env)[-1].argmax())
            drafts.append(x)
        run.rollback(base, 0)
        new, n = self._verify_full(run, tok, drafts)
        return new, n, drafts


__all__ = ["EarlyExitDecoding", "SpeculativeDecoding", "NGramDrafts", "DecodeStats"]
