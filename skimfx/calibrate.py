"""Exit calibration: adapters that map an intermediate layer's state towards the final layer's, and
the confidence thresholds that reach a target agreement with the final layer on held-out text.

    cal = skimfx.calibrate_exits(model, texts, layers=(16, 24), method="ridge", tokenizer=tok)
    cal.save("exits.pt")
    cm = skimfx.compile(model, skimfx.EarlyExit(layers=(16, 24), calibration="exits.pt", target_agreement=0.95))

Methods (the model's weights never change; an adapter is applied on the exit branch only):
- "none": the model's own final norm + LM head on the layer's output (thresholds only).
- "ridge": closed form, ``h_final ≈ [h_E, 1] W`` by ridge regression over the training tokens.
- "distill": the ridge map plus a low-rank correction ``(h A) B`` (and the bias) trained with the KL
  divergence from the final layer's next-token distribution to the exit's (the model and the ridge
  map frozen), ~150 Adam steps.

Texts are split by document into train and held-out; the thresholds and the reported agreement come
from the held-out part only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .kernels.linear import linear


class ExitAdapter(torch.nn.Module):
    """Maps a layer's hidden state to a stand-in for the last layer's: ``h Wᵀ + b`` (ridge), plus a
    rank-``rank`` correction ``(h A) B`` trained by distillation when ``rank`` is set."""

    def __init__(self, hidden: int, rank: int | None = None):
        super().__init__()
        self.hidden, self.rank = hidden, rank
        self.weight = torch.nn.Parameter(torch.eye(hidden))
        self.bias = torch.nn.Parameter(torch.zeros(hidden))
        if rank is None:
            self.A = self.B = None
        else:
            self.A = torch.nn.Parameter(torch.randn(hidden, rank) / math.sqrt(hidden))
            self.B = torch.nn.Parameter(torch.zeros(rank, hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = linear(h, self.weight, self.bias)      # decode-shaped rows stream the weight on CPU
        return out if self.A is None else out + (h @ self.A) @ self.B

    def extra_repr(self) -> str:
        return f"{self.hidden}, {'linear' if self.rank is None else f'linear + rank {self.rank}'}"

    def __str__(self) -> str:
        return "a linear adapter" if self.rank is None else f"a linear + rank-{self.rank} adapter"


@dataclass
class ExitCalibration:
    """Per exit layer: the adapter (or None), and the held-out curve of agreement with the final
    layer among the tokens whose exit confidence is at least each threshold."""

    method: str
    layers: tuple[int, ...]
    adapters: dict[int, ExitAdapter | None]
    curves: dict[int, tuple[torch.Tensor, torch.Tensor]]    # layer -> (confidence desc, cumulative agreement)
    raw_agreement: dict[int, float] = field(default_factory=dict)       # held out, no adapter, every token
    agreement: dict[int, float] = field(default_factory=dict)           # held out, with the adapter
    tokens: tuple[int, int] = (0, 0)                                     # train, held-out tokens
    seconds: float = 0.0

    def threshold(self, layer: int, target: float) -> float:
        """The lowest confidence threshold at which the held-out tokens that exit agree with the final
        layer at rate >= ``target`` (inf when none does: the layer never exits)."""
        conf, cum = self.curves[layer]
        ok = torch.nonzero(cum >= target).flatten()
        if len(ok) == 0:
            return math.inf
        return float(conf[int(ok.max())])

    def coverage(self, layer: int, threshold: float) -> float:
        conf, _ = self.curves[layer]
        return float((conf >= threshold).float().mean()) if len(conf) else 0.0

    def report(self, target: float = 0.95) -> str:
        lines = [f"exit calibration ({self.method}; {self.tokens[0]} train / {self.tokens[1]} held-out tokens, "
                 f"{self.seconds:.0f} s)", "| layer | agreement raw | agreement adapted | threshold for "
                 f"{target:.0%} | tokens that exit |", "|---:|---:|---:|---:|---:|"]
        for l in self.layers:
            t = self.threshold(l, target)
            lines.append(f"| {l} | {self.raw_agreement[l]:.1%} | {self.agreement[l]:.1%} | {t:.3f} | "
                         f"{self.coverage(l, t):.1%} |")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        torch.save({"method": self.method, "layers": self.layers, "curves": self.curves,
                    "raw_agreement": self.raw_agreement, "agreement": self.agreement, "tokens": self.tokens,
                    "seconds": self.seconds,
                    "adapters": {l: None if a is None else {"hidden": a.hidden, "rank": a.rank,
                                                            "state": a.state_dict()}
                                 for l, a in self.adapters.items()}}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ExitCalibration":
        d = torch.load(path, weights_only=False)
        adapters = {}
        for l, a in d["adapters"].items():
            if a is None:
                adapters[l] = None
                continue
            m = ExitAdapter(a["hidden"], a["rank"])
            m.load_state_dict(a["state"])
            adapters[l] = m.requires_grad_(False)
        return cls(d["method"], tuple(d["layers"]), adapters, d["curves"], d["raw_agreement"], d["agreement"],
                   tuple(d["tokens"]), d["seconds"])


def _states(cm, docs: list[list[int]], layers: list[int], chunk: int):
    """Hidden states at ``layers`` and the final layer (teacher-forced over the documents)."""
    from .runtime.cache import KVCache
    from .runtime.decoding import _Runner

    program = cm.program
    L = program.info.num_layers
    want = sorted(set(layers) | {L - 1})
    out: dict[int, list[torch.Tensor]] = {l: [] for l in want}
    with torch.inference_mode():
        for ids in docs:
            for s in range(0, len(ids) - 1, chunk):
                piece = ids[s:s + chunk]
                if len(piece) < 2:
                    continue
                run = _Runner(program, KVCache.for_program(program, 1, len(piece)))
                ctx = run.ctx(len(piece))
                env = run.embed(ctx, piece, 0)
                done = 0
                for l in want:
                    run.run_layers(ctx, env, done, l + 1, len(piece))
                    done = l + 1
                    out[l].append(run.hidden(env, l)[0].float().clone())
    return {l: torch.cat(v) for l, v in out.items()}


def _head(cm):
    """hidden state -> logits through the model's own epilogue (final norm + LM head)."""
    epi = cm.program.stage("epilogue")
    return lambda h: epi.module(None, h[None])[0][0]


def _fit_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> ExitAdapter:
    H = x.shape[1]
    X = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    G = X.T @ X
    G += ridge * G.diagonal().mean() * torch.eye(H + 1, dtype=G.dtype)
    W = torch.linalg.solve(G, X.T @ y.double())                                    # [H + 1, H]
    a = ExitAdapter(H)
    with torch.no_grad():
        a.weight.copy_(W[:H].T.float())
        a.bias.copy_(W[H].float())
    return a.requires_grad_(False)


def _fit_distill(x: torch.Tensor, y: torch.Tensor, target_logits, head, rank: int, ridge: float, steps: int,
                 batch: int, lr: float, seed: int) -> ExitAdapter:
    """Start from the ridge map (kept fixed) and train a low-rank correction and the bias with KL to
    the last layer's next-token distribution."""
    g = torch.Generator().manual_seed(seed)
    a = ExitAdapter(x.shape[1], rank)
    with torch.no_grad():
        base = _fit_ridge(x, y, ridge)
        a.weight.copy_(base.weight)
        a.bias.copy_(base.bias)
    a.weight.requires_grad_(False)
    opt = torch.optim.Adam([a.A, a.B, a.bias], lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        with torch.no_grad():
            p = torch.log_softmax(target_logits(idx), -1)
        q = torch.log_softmax(head(a(x[idx])).float(), -1)
        loss = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return a.requires_grad_(False)


def calibrate_exits(model, texts: list[str], layers: tuple[int, ...] | list[int], method: str = "ridge", *,
                    tokenizer=None, held_out: float = 0.25, max_tokens: int = 16384, chunk: int = 512,
                    ridge: float = 1e-3, rank: int = 64, steps: int = 150, batch: int = 64, lr: float = 1e-3,
                    seed: int = 0) -> ExitCalibration:
    """Fit exit adapters for ``layers`` on ``texts`` (documents; the last ``held_out`` fraction of them is
    held out) and measure the agreement curves. ``model``: a HF model (compiled dense here) or a
    ``CompiledModel``. ``max_tokens`` caps the training tokens."""
    if method not in ("none", "ridge", "distill"):
        raise ValueError(f"method must be 'none', 'ridge' or 'distill', got {method!r}")
    cm, tok = _compiled(model, tokenizer, "calibrate_exits")
    L = cm.info.num_layers
    layers = tuple(sorted(set(layers)))
    if not layers or any(not 0 <= l < L - 1 for l in layers):
        raise ValueError(f"exit layers must be in 0..{L - 2}, got {list(layers)}")
    if not 0.0 < held_out < 1.0 or len(texts) < 2:
        raise ValueError("give at least two texts and held_out in (0, 1): thresholds come from held-out documents")
    t0 = time.perf_counter()
    every = max(2, round(1 / held_out))                   # every k-th document is held out (a mix of sources)
    test = _tokenize_upto(tok, texts[every - 1::every], max(chunk, max_tokens // 3))
    train = _tokenize_upto(tok, [t for i, t in enumerate(texts) if i % every != every - 1], max_tokens)
    head = _head(cm)
    s_train = _states(cm, train, list(layers), chunk)
    s_test = _states(cm, test, list(layers), chunk)
    final = L - 1
    with torch.no_grad():
        y_test = _confidence(head, s_test[final])[0]
    adapters, curves, raw, agree = {}, {}, {}, {}
    for l in layers:
        if method == "ridge":
            adapters[l] = _fit_ridge(s_train[l], s_train[final], ridge)
        elif method == "distill":
            h_final = s_train[final]
            adapters[l] = _fit_distill(s_train[l], h_final, lambda idx: head(h_final[idx]).float(), head, rank,
                                       ridge, steps, batch, lr, seed)
        else:
            adapters[l] = None
        with torch.no_grad():
            top, prob = _confidence(head, s_test[l])                 # the model's own head on the layer's state
            raw[l] = float((top == y_test).float().mean())
            if adapters[l] is not None:
                top, prob = _confidence(head, adapters[l](s_test[l]))
        hit = (top == y_test).float()
        agree[l] = float(hit.mean())
        order = prob.argsort(descending=True)
        cum = hit[order].cumsum(0) / torch.arange(1, len(hit) + 1)
        curves[l] = (prob[order], cum)
    return ExitCalibration(method, layers, adapters, curves, raw, agree,
                           (sum(map(len, train)), sum(map(len, test))), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Draft&Verify: which layers a draft pass may skip
# ----------------------------------------------------------------------------------------------
@dataclass
class SkipCalibration:
    """The layers a self-speculative draft pass skips (Draft&Verify), chosen on real text.

    ``order`` ranks the layers by the top-1 agreement with the full model when that layer alone is
    skipped (``ablation``), best first; ``agreement[s]`` is the agreement when the first ``s`` of
    ``order`` are skipped together (``agreement[0] == 1``). ``skip`` is the prefix of ``order`` that
    maximises the modelled speed-up ``expected[s]``: with per-token agreement ``a`` and ``k`` drafts, a
    verification keeps ``(1 - a^(k+1)) / (1 - a)`` tokens and costs ``k (L - s) / L`` forwards of
    drafting plus ``1 + verify_cost k`` forwards of verification."""

    num_layers: int
    order: tuple[int, ...]
    ablation: dict[int, float]
    agreement: tuple[float, ...]
    expected: tuple[float, ...]
    skip: tuple[int, ...]
    draft_tokens: int
    verify_cost: float
    tokens: int = 0
    seconds: float = 0.0

    def report(self) -> str:
        lines = [f"layer-skip calibration ({self.tokens} tokens, {self.seconds:.0f} s; verification cost "
                 f"1 + {self.verify_cost:g} per draft): skip {list(self.skip)}",
                 "| layers skipped | last added | agreement with full | modelled speed-up |", "|---:|---:|---:|---:|"]
        for s, (a, e) in enumerate(zip(self.agreement, self.expected)):
            lines.append(f"| {s} | {self.order[s - 1] if s else '-'} | {a:.1%} | {e:.2f}x |")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: str | Path) -> "SkipCalibration":
        return cls(**torch.load(path, weights_only=False))


def _skip_speedup(a: float, s: int, L: int, k_max: int, verify_cost: float) -> float:
    """Modelled tokens per forward-equivalent at the best k, for per-token agreement ``a`` and ``s``
    skipped layers."""
    return max((k + 1 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)) / (k * (L - s) / L + 1 + verify_cost * k)
               for k in range(1, k_max + 1))


def calibrate_skip(model, texts: list[str], *, tokenizer=None, max_tokens: int = 512, chunk: int = 256,
                   max_skip: int | None = None, draft_tokens: int = 8, verify_cost: float = 0.1,
                   min_agreement: float = 0.3) -> SkipCalibration:
    """Choose the layers a Draft&Verify draft pass skips.

    Teacher-forced over ``max_tokens`` tokens of ``texts``: first each layer skipped alone (the run
    resumes from the cached state below it, so this costs about half a forward per layer), then the
    growing prefixes of that ranking skipped together, until the agreement with the full model's top-1
    falls under ``min_agreement`` or ``max_skip`` layers (default: half) are skipped. The chosen set
    maximises the modelled speed-up (see ``SkipCalibration``); ``verify_cost`` is the cost of one more
    token in a verification pass relative to a one-token forward (small when decoding is bound by
    reading the weights)."""
    from .runtime.cache import KVCache
    from .runtime.decoding import _Runner

    cm, tok = _compiled(model, tokenizer, "calibrate_skip")
    if not texts:
        raise ValueError("calibrate_skip needs at least one text")
    L = cm.info.num_layers
    max_skip = L // 2 if max_skip is None else max_skip
    if not 1 <= max_skip <= L - 1:
        raise ValueError(f"max_skip must be in 1..{L - 1}, got {max_skip}")
    if draft_tokens < 1 or verify_cost < 0:
        raise ValueError(f"draft_tokens must be >= 1 and verify_cost >= 0, got {draft_tokens}, {verify_cost}")
    t0 = time.perf_counter()
    program = cm.program
    pieces = [d[s:s + chunk] for d in _tokenize_upto(tok, texts, max_tokens) for s in range(0, len(d), chunk)]
    pieces = [p for p in pieces if len(p) >= 2]
    if not pieces:
        raise ValueError("the texts have fewer than two tokens")

    def run(piece, skip: tuple[int, ...], states: list | None = None):
        """Top-1 tokens with ``skip`` skipped, and the input of every layer. With ``states`` (the full
        run's layer inputs) the run starts at the first skipped layer: nothing below it changes."""
        r = _Runner(program, KVCache.for_program(program, 1, len(piece)))
        ctx = r.ctx(len(piece))
        env = r.embed(ctx, piece, 0)
        first = min(skip) if states is not None else 0
        if states is not None:
            env[r.layers[first].inputs[0]] = states[first]
        ins = []
        for l in range(first, L):
            ins.append(env[r.layers[l].inputs[0]])
            r.run_layers(ctx, env, l, l + 1, len(piece), skip=skip)
        return r.logits(ctx, env).argmax(-1), ins

    with torch.inference_mode():
        full, states = [], []
        for p in pieces:
            top, ins = run(p, ())
            full.append(top)
            states.append(ins)
        n = sum(len(t) for t in full)

        def agreement(skip: tuple[int, ...]) -> float:
            hit = 0
            for p, ref, ins in zip(pieces, full, states):
                hit += int((run(p, skip, ins)[0] == ref).sum())
            return hit / n

        ablation = {l: agreement((l,)) for l in range(L)}
        order = tuple(sorted(range(L), key=lambda l: (-ablation[l], -l)))
        agree = [1.0]
        for s in range(1, max_skip + 1):
            agree.append(agreement(order[:s]))
            if agree[-1] < min_agreement:
                break
    # s = 0 is plain decoding (1.0); a set is chosen only when its drafting is modelled to beat that
    expected = [1.0] + [_skip_speedup(a, s, L, draft_tokens, verify_cost) for s, a in enumerate(agree) if s]
    best = max(range(len(agree)), key=lambda s: (expected[s], -s))
    return SkipCalibration(L, order, ablation, tuple(agree), tuple(expected), tuple(sorted(order[:best])),
                           draft_tokens, verify_cost, n, time.perf_counter() - t0)


@dataclass
class DeltaCalibration:
    """Where DELTA's select layers go, chosen by the output error on prompts like the ones to serve.

    ``full_layers`` dense layers, then ``selection_layers`` (the first is ``full_layers``); each layer
    above a select layer reads that layer's tokens. The search moves one select layer at a time to the
    position that lowers the mean KL divergence of the next-token distribution from the dense model's
    (teacher-forced on the dense model's own continuation), until no move helps. ``tried`` maps every
    placement evaluated to its KL; ``default_kl`` is ``Delta``'s default placement's."""

    num_layers: int
    budget: int | float
    recent: int
    full_layers: int
    selection_layers: tuple[int, ...]
    kl: float
    top1: float
    default_layers: tuple[int, ...]
    default_kl: float
    default_top1: float
    tried: dict
    tokens: int = 0
    seconds: float = 0.0

    def recipe(self, budget: int | float | None = None, **kw):
        """A ``Delta`` recipe with this placement (``budget`` defaults to the calibration budget)."""
        from .recipes import Delta

        return Delta(budget=self.budget if budget is None else budget, full_layers=self.full_layers,
                     selection_layers=self.selection_layers, recent=self.recent, **kw)

    def report(self) -> str:
        return "\n".join([
            f"DELTA placement calibration ({self.tokens} tokens, {len(self.tried)} placements, {self.seconds:.0f} s, "
            f"budget {self.budget})",
            f"chosen: full_layers={self.full_layers}, selection_layers={list(self.selection_layers)}: KL {self.kl:.4f}, "
            f"top-1 {self.top1:.1%}",
            f"default: full_layers={self.default_layers[0]}, selection_layers={list(self.default_layers[1:])}: "
            f"KL {self.default_kl:.4f}, top-1 {self.default_top1:.1%}"])

    def save(self, path: str | Path) -> None:
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: str | Path) -> "DeltaCalibration":
        return cls(**torch.load(path, weights_only=False))


def calibrate_delta(model, prompts: list, *, tokenizer=None, budget: int | float = 0.1, full_layers: int = 2,
                    selections: int = 3, recent: int = 32, steps: int = 16, max_rounds: int = 3) -> DeltaCalibration:
    """Place DELTA's ``selections`` select layers above ``full_layers`` dense ones for a model and a
    kind of prompt (``prompts``: token-id lists or strings; long ones, as DELTA will serve).

    Each prompt is prefilled once (dense, as DELTA prefills) and the dense model continues it by
    ``steps`` greedy tokens; a placement is scored by the mean KL(dense || DELTA) of the next-token
    distributions over those steps, fed the same tokens. Coordinate descent from ``Delta``'s default:
    each round moves every select layer above the first to its best position between its neighbours;
    it stops when a round changes nothing or after ``max_rounds``. The same number of layers reads
    the whole cache whatever the placement, so the cost per step does not change; only the quality."""
    import copy

    from .eval.agreement import logit_agreement
    from .recipes import Delta
    from .runtime.cache import KVCache
    from .runtime.engine import decode_step, prefill

    text = any(isinstance(p, str) for p in prompts)
    cm, tok = _compiled(model, tokenizer, "calibrate_delta", need_tokenizer=text)
    default = Delta(budget=budget, full_layers=full_layers, recent=recent)       # checks budget / recent / full_layers
    L = cm.info.num_layers
    if not prompts:
        raise ValueError("calibrate_delta needs at least one prompt")
    if not 1 <= selections <= L - 1 - full_layers:
        raise ValueError(f"selections must be in 1..{L - 1 - full_layers} for a {L}-layer model with "
                         f"full_layers={full_layers}, got {selections}")
    if steps < 1 or max_rounds < 0:
        raise ValueError(f"steps must be >= 1 and max_rounds >= 0, got {steps}, {max_rounds}")
    if any(w is not None for w in cm.info.sliding_window):
        raise ValueError("calibrate_delta places select layers among full-attention layers only; this model "
                         "has sliding-window layers (give Delta's selection_layers by hand)")
    ids = [tok(p, add_special_tokens=False).input_ids if isinstance(p, str) else list(p) for p in prompts]
    if min(map(len, ids)) < 2:
        raise ValueError("every prompt needs at least two tokens")
    t0 = time.perf_counter()
    dense = cm.program
    runs = []                                   # (cache after prefill, continuation, dense logits [steps, V])
    with torch.inference_mode():
        for p in ids:
            cache = KVCache.for_program(dense, 1, len(p) + steps)
            tok_ = prefill(dense, cache, [p]).argmax(-1)
            after = copy.deepcopy(cache)
            cont, ref = [], []
            for _ in range(steps):
                cont.append(tok_)
                logits = decode_step(dense, cache, tok_)
                ref.append(logits[0].float())
                tok_ = logits.argmax(-1)
            runs.append((after, cont, torch.stack(ref)))

    from .passes.kv_policy import kv_policy

    tried: dict[tuple[int, ...], tuple[float, float]] = {}

    def score(sel: tuple[int, ...]) -> float:
        if sel not in tried:
            # the dense program with DELTA's policies added by the pass itself (the graphs are shared)
            program = copy.copy(dense)
            program.policies, program.history = {}, list(dense.history)
            kv_policy(program, Delta(budget=budget, full_layers=full_layers, selection_layers=sel,
                                     recent=recent).policies(cm.info))
            kls, top1 = [], []
            with torch.inference_mode():
                for after, cont, ref in runs:
                    cache = copy.deepcopy(after)
                    got = torch.stack([decode_step(program, cache, t)[0].float() for t in cont])
                    a = logit_agreement(ref, got)
                    kls.append(a["kl"])
                    top1.append(a["top1"])
            tried[sel] = (sum(kls) / len(kls), sum(top1) / len(top1))
        return tried[sel][0]

    d_sel = default.policies(cm.info)
    d_sel = tuple(l for l, pol in sorted(d_sel.items()) if pol.role == "select")
    if len(d_sel) != selections:      # the default has three; otherwise start evenly spaced (reported as the default)
        step = (L - 1 - full_layers) / selections
        d_sel = tuple(full_layers + round(i * step) for i in range(selections))
    sel = d_sel
    score(sel)
    for _ in range(max_rounds):
        before = sel
        for j in range(1, len(sel)):
            lo = sel[j - 1] + 1
            hi = sel[j + 1] if j + 1 < len(sel) else L - 1
            sel = min((sel[:j] + (pos,) + sel[j + 1:] for pos in range(lo, hi)), key=lambda c: (score(c), c != sel))
        if sel == before:
            break
    kl, top1 = tried[sel]
    return DeltaCalibration(L, budget, recent, full_layers, sel, kl, top1, (full_layers,) + d_sel, *tried[d_sel],
                            {k: v[0] for k, v in tried.items()}, sum(len(p) + steps for p in ids),
                            time.perf_counter() - t0)


def _compiled(model, tokenizer, caller: str, need_tokenizer: bool = True):
    """(CompiledModel, tokenizer): ``model`` compiled dense unless it already is compiled; the tokenizer
    must be known when ``need_tokenizer`` (the caller has text to tokenize)."""
    from . import compile as _compile
    from .runtime.hf import CompiledModel

    cm = model if isinstance(model, CompiledModel) else _compile(model, tokenizer=tokenizer)
    tok = tokenizer or cm.tokenizer
    if tok is None and need_tokenizer:
        raise ValueError(f"{caller} tokenizes the texts: pass tokenizer=tok")
    return cm, tok


def _tokenize_upto(tok, texts: list[str], n: int) -> list[list[int]]:
    """Token ids of the documents in order until ``n`` tokens (the last one cut)."""
    out, total = [], 0
    for t in texts:
        if total >= n:
            break
        ids = tok(t[:8 * (n - total)], add_special_tokens=False).input_ids[:n - total]
        out.append(ids)
        total += len(ids)
    return out


def _confidence(head, h: torch.Tensor, rows: int = 1024):
    """(top-1, probability) of the exit branch over hidden states (the model's own norm and head)."""
    tops, probs = [], []
    for i in range(0, len(h), rows):
        z = head(h[i:i + rows]).float()
        p = torch.softmax(z, -1)
        pm, top = p.max(-1)
        tops.append(top)
        probs.append(pm)
    return torch.cat(tops), torch.cat(probs)


def reference_texts() -> list[str]:
    """Real English text that ships with the system: the license texts under /usr/share/common-licenses
    and Python's own LICENSE, then docstrings of standard-library modules (Python's documentation)."""
    import importlib
    import inspect
    import sysconfig

    texts = []
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        for p in sorted(lic.iterdir()):
            if p.is_file() and p.stat().st_size > 2000:
                texts.append(p.read_text(errors="ignore"))
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if py_license.exists():
        texts.append(py_license.read_text(errors="ignore"))
    for name in ("argparse", "collections", "json", "logging", "pathlib", "re", "subprocess", "typing", "unittest",
                 "dataclasses", "asyncio", "functools", "itertools", "csv", "sqlite3"):
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""] + [inspect.getdoc(getattr(mod, a)) or "" for a in sorted(dir(mod))
                                              if not a.startswith("_") and callable(getattr(mod, a, None))]
        text = "\n\n".join(d for d in docs if len(d) > 80)
        if text:
            texts.append(text)
    return texts


__all__ = ["calibrate_exits", "ExitCalibration", "ExitAdapter", "calibrate_skip", "SkipCalibration", "calibrate_delta",
           "DeltaCalibration", "reference_texts"]
