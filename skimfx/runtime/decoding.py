"""Decoding modes that run fewer layers per token: lossy early exit (CALM) and lossless
self-speculation (LayerSkip-style exit drafts, Lookahead-style n-gram drafts).

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
  layer-E states, as LayerSkip does) and "lookahead" (the tokens that followed the latest earlier
  occurrence of the last n tokens in the prompt or the text so far). The number of drafts adapts to
  acceptance, and a source whose measured time per token is worse than plain decoding is switched
  off for a while and retried later.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..program import Program
from .cache import KVCache
from .engine import Ctx, Generation, Stats, extend, plan_capacity, prefill


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

    def run_layers(self, ctx: Ctx, env: dict, lo: int, hi: int, T: int) -> dict:
        for st in self.layers[lo:hi]:
            env.update(zip(st.outputs, st.module(ctx, *[env[n] for n in st.inputs])))
        self.layer_tokens += (hi - lo) * T
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
    ``max_n`` down to ``min_n``) in the prompt and the text so far."""

    def __init__(self, min_n: int = 2, max_n: int = 4):
        self.min_n, self.max_n = min_n, max_n
        self.index: dict[tuple[int, ...], int] = {}          # n-gram -> end position of its latest occurrence
        self.upto = 0                                        # n-grams ending before this position are indexed

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
                return tokens[j + 1:j + 1 + k]
        return []


class _Clock:
    """Seconds per emitted token, exponentially averaged."""

    def __init__(self):
        self.value: float | None = None
        self.n = 0

    def add(self, seconds: float, tokens: int) -> None:
        x = seconds / max(1, tokens)
        self.value = x if self.value is None else 0.7 * self.value + 0.3 * x
        self.n += 1


@dataclass(frozen=True)
class SpeculativeDecoding:
    """Draft with ``sources`` (tried in order: "lookahead", "exit"), verify with the full model."""

    sources: tuple[str, ...]
    draft_tokens: int = 8
    exit_layer: int | None = None
    adaptive: bool = True
    min_gain: float = 1.0            # a source is switched off while its time per token exceeds plain decode's / this
    retry_after: int = 32            # steps before a switched-off source is tried again (doubles each time it fails)
    ngram: tuple[int, int] = (2, 4)

    def __str__(self) -> str:
        src = " then ".join(s + (f" (layer {self.exit_layer})" if s == "exit" else "") for s in self.sources)
        return (f"self-speculative (lossless): drafts from {src}, up to {self.draft_tokens} tokens"
                + (", adaptive" if self.adaptive else ""))

    def generate(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback):
        return _decode_loop(self, program, prompts, max_new_tokens, sampling, stop_tokens, max_cache_len, callback)

    def start(self, run: _Runner, history: list[int]) -> _State:
        # n-gram drafts are free to make and cheap to verify: start long; exit drafts cost layers: start short
        k0 = {"lookahead": self.draft_tokens, "exit": min(2, self.draft_tokens)}
        return _State(history, {"ngram": NGramDrafts(*self.ngram), "k": {s: k0[s] for s in self.sources},
                                "clock": {s: _Clock() for s in self.sources}, "plain": _Clock(),
                                "off": {s: 0 for s in self.sources}, "backoff": {s: self.retry_after for s in self.sources},
                                "steps": 0})

    # -- one step ---------------------------------------------------------------------------------
    def step(self, run: _Runner, state: _State, tok: int, ds: DecodeStats) -> list[int]:
        x = state.extra
        x["steps"] += 1
        plain = x["plain"]
        for src in self.sources:
            if x["off"][src] > 0:
                x["off"][src] -= 1
                continue
            if plain.value is None and self.min_gain > 0:
                break                                            # measure plain decoding once first
            t0 = time.perf_counter()
            if src == "lookahead":
                drafts = x["ngram"].propose(state.history, x["k"][src])
                if not drafts:
                    continue
                new, n = self._verify_full(run, tok, drafts)
            else:
                new, n, drafts = self._exit_draft_and_verify(run, tok, x["k"][src])
            dt = time.perf_counter() - t0
            ds.drafted[src] = ds.drafted.get(src, 0) + len(drafts)
            ds.accepted[src] = ds.accepted.get(src, 0) + n
            ds.verify_steps[src] = ds.verify_steps.get(src, 0) + 1
            clock = x["clock"][src]
            clock.add(dt, len(new))
            if self.adaptive:
                # all accepted: draft twice as many next time; a miss: as many as were accepted, plus one
                k = x["k"][src]
                x["k"][src] = min(self.draft_tokens, 2 * k) if n == len(drafts) else max(1, n + 1)
                # a rejected n-gram draft costs one wider verification pass (k falls to 1 after misses); an
                # exit draft costs exit_layer + 1 layers per drafted token, so only that source is timed
                if src == "exit" and plain.value is not None and clock.n >= 1 and \
                        clock.value * self.min_gain > plain.value:
                    # slower than plain decoding: off for a while, twice as long after each failed retry
                    x["off"][src] = x["backoff"][src]
                    x["backoff"][src] *= 2
                    x["clock"][src] = _Clock()
                elif clock.n >= 4:               # it pays: forget earlier failures
                    x["backoff"][src] = self.retry_after
            return new
        t0 = time.perf_counter()
        new = self._plain(run, tok)
        plain.add(time.perf_counter() - t0, 1)
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


__all__ = ["EarlyExitDecoding", "SpeculativeDecoding", "NGramDrafts", "DecodeStats"]
