"""Exit calibration: adapters that map an intermediate layer's state towards the final layer's, and
the confidence thresholds that reach a target agreement with the final layer on held-out text.

    cal = skimfx.calibrate_exits(model, texts, layers=(16, 24), method="ridge", tokenizer=tok)
    cal.save("exits.safetensors")
    cm = skimfx.compile(model, skimfx.EarlyExit(layers=(16, 24), calibration="exits.safetensors", target_agreement=0.95))

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

from ..kernels.linear import linear
from ..runtime.executor import Executor
from .common import CalibrationFileError, _compiled, _load, _save, _start, _tokenize_upto


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


_FIELDS = ("method", "layers", "curves", "raw_agreement", "agreement", "tokens", "seconds", "adapters")


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

    def recipe(self, layers: tuple[int, ...] | int | None = None, target_agreement: float | None = 0.95,
               threshold: tuple[float, ...] | float | None = None):
        """An ``EarlyExit`` recipe with this calibration's adapters: exits at ``layers`` (default: every
        calibrated layer), thresholds picked for ``target_agreement`` on the held-out text, or the
        confidence ``threshold`` given (then ``target_agreement`` is ignored)."""
        from ..recipes import EarlyExit

        layers = self.layers if layers is None else layers
        if threshold is not None:
            return EarlyExit(layers=layers, threshold=threshold, calibration=self)
        return EarlyExit(layers=layers, calibration=self, target_agreement=target_agreement)

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
        """One dict of plain data and tensors (each adapter as its size, rank and state dict); ``load``
        reads it back without unpickling anything else."""
        _save({"method": self.method, "layers": tuple(self.layers), "curves": self.curves,
               "raw_agreement": self.raw_agreement, "agreement": self.agreement, "tokens": tuple(self.tokens),
               "seconds": float(self.seconds),
               "adapters": {l: None if a is None else {"hidden": a.hidden, "rank": a.rank,
                                                       "state": dict(a.state_dict())}
                            for l, a in self.adapters.items()}}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ExitCalibration":
        """The calibration saved at ``path`` by ``save`` (a safetensors file: tensors + JSON, nothing executable):
        one not written by ``save`` (e.g. a pickle) is refused (``CalibrationFileError``)."""
        d = _load(path, "ExitCalibration", "calibrate_exits", _FIELDS)
        adapters = {}
        try:
            for l, a in d["adapters"].items():
                if a is None:
                    adapters[l] = None
                    continue
                m = ExitAdapter(a["hidden"], a["rank"])
                m.load_state_dict(a["state"])
                adapters[l] = m.requires_grad_(False)
            return cls(d["method"], tuple(d["layers"]), adapters, d["curves"], d["raw_agreement"], d["agreement"],
                       tuple(d["tokens"]), d["seconds"])
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise CalibrationFileError(f"{str(path)!r} is not a valid ExitCalibration file ({type(e).__name__}: "
                                       f"{e}): make one with skimfx.calibrate_exits(...) and save it with "
                                       ".save(path)") from None


def _states(cm, docs: list[list[int]], layers: list[int], chunk: int):
    """Hidden states at ``layers`` and the final layer (teacher-forced over the documents)."""
    program = cm.program
    L = program.info.num_layers
    want = sorted(set(layers) | {L - 1})
    out: dict[int, list[torch.Tensor]] = {l: [] for l in want}
    ex = Executor(program)
    with torch.inference_mode():
        for ids in docs:
            for s in range(0, len(ids) - 1, chunk):
                piece = ids[s:s + chunk]
                if len(piece) < 2:
                    continue
                ctx, env = _start(ex, piece)
                done = 0
                for l in want:
                    ex.run_layers(ctx, env, done, l + 1)
                    done = l + 1
                    out[l].append(ex.hidden(env, l)[0].float().clone())
    return {l: torch.cat(v) for l, v in out.items()}


def _head(cm):
    """hidden state -> logits through the model's own epilogue (final norm + LM head)."""
    ex = Executor(cm.program)
    last = cm.program.hidden_output(ex.num_layers - 1)
    return lambda h: ex.logits(None, {last: h[None]})[0]


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


__all__ = ["ExitAdapter", "ExitCalibration", "calibrate_exits"]
