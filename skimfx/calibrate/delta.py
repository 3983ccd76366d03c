"""DELTA's select-layer placement (``calibrate_delta``): where the select layers go for a model and a
kind of prompt, chosen by the output error against the dense model."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ..runtime.cache import KVCache
from ..runtime.steps import decode_step, prefill
from .common import FieldsFile, _compiled, _logit_agreement



@dataclass
class DeltaCalibration(FieldsFile):
    """Where DELTA's select layers go, chosen by the output error on prompts like the ones to serve.

    ``full_layers`` dense layers, then ``selection_layers`` (the first is ``full_layers``); each layer
    above a select layer reads that layer's tokens. The search moves one select layer at a time to the
    position that lowers the mean KL divergence of the next-token distribution from the dense model's
    (teacher-forced on the dense model's own continuation), until no move helps. ``tried`` maps every
    placement evaluated to its KL; ``default_kl`` is ``Delta``'s default placement's."""

    REQUIRED = ("num_layers", "budget", "recent", "full_layers", "selection_layers", "kl", "top1", "default_layers",
           "default_kl", "default_top1", "tried")
    MADE_BY = "calibrate_delta"

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
        from ..recipes import Delta

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


def _with_policies(program, cache: KVCache) -> KVCache:
    """A cache for ``program`` (its KV policies, fresh) holding the k/v, lengths and positions of ``cache``
    (a dense prefill): DELTA prefills dense, then decodes with its policies."""
    out = KVCache.for_program(program, cache.batch, [cache.capacity(l) for l in range(cache.num_layers)])
    for l in range(cache.num_layers):
        n = cache.lengths(l)
        out.write(l, *cache.view(l, max(n)))
        out.advance(l, n)
    out.positions = list(cache.positions)
    return out


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
    from ..passes.kv_policy import kv_policy
    from ..recipes import Delta

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
                    cache = _with_policies(program, after)
                    got = torch.stack([decode_step(program, cache, t)[0].float() for t in cont])
                    a = _logit_agreement(ref, got)
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


__all__ = ["DeltaCalibration", "calibrate_delta"]
