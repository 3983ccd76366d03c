"""Draft&Verify: which layers a self-speculative draft pass may skip (``calibrate_skip``), chosen on
real text by the top-1 agreement with the full model and a model of the speed-up."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..runtime.executor import Executor
from .common import FieldsFile, _compiled, _start, _tokenize_upto



@dataclass
class SkipCalibration(FieldsFile):
    """The layers a self-speculative draft pass skips (Draft&Verify), chosen on real text.

    ``order`` ranks the layers by the top-1 agreement with the full model when that layer alone is
    skipped (``ablation``), best first; ``agreement[s]`` is the agreement when the first ``s`` of
    ``order`` are skipped together (``agreement[0] == 1``). ``skip`` is the prefix of ``order`` that
    maximises the modelled speed-up ``expected[s]``: with per-token agreement ``a`` and ``k`` drafts, a
    verification keeps ``(1 - a^(k+1)) / (1 - a)`` tokens and costs ``k (L - s) / L`` forwards of
    drafting plus ``1 + verify_cost k`` forwards of verification."""

    REQUIRED = ("num_layers", "order", "ablation", "agreement", "expected", "skip", "draft_tokens", "verify_cost")
    MADE_BY = "calibrate_skip"

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

    def recipe(self, draft_tokens: int = 8, **kw):
        """A ``SelfSpeculative`` recipe whose draft pass skips this calibration's chosen layers (``kw``:
        the recipe's other fields, e.g. ``adaptive=False``). ValueError (``RecipeError``) when the
        calibration chose no layers."""
        from ..recipes import RecipeError, SelfSpeculative

        if not self.skip:
            raise RecipeError("the SkipCalibration chose no layers: on its text no skipped set drafts well enough to "
                              f"pay (agreement after skipping 1, 2, .. layers: "
                              f"{', '.join(f'{a:.0%}' for a in self.agreement[1:])}); pass layer indices to force one "
                              "(SelfSpeculative(draft='skip', skip_layers=...))")
        return SelfSpeculative(draft="skip", skip_layers=self.skip, draft_tokens=draft_tokens, **kw)

    def report(self) -> str:
        lines = [f"layer-skip calibration ({self.tokens} tokens, {self.seconds:.0f} s; verification cost "
                 f"1 + {self.verify_cost:g} per draft): skip {list(self.skip)}",
                 "| layers skipped | last added | agreement with full | modelled speed-up |", "|---:|---:|---:|---:|"]
        for s, (a, e) in enumerate(zip(self.agreement, self.expected)):
            lines.append(f"| {s} | {self.order[s - 1] if s else '-'} | {a:.1%} | {e:.2f}x |")
        return "\n".join(lines)


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
    ex = Executor(cm.program)
    pieces = [d[s:s + chunk] for d in _tokenize_upto(tok, texts, max_tokens) for s in range(0, len(d), chunk)]
    pieces = [p for p in pieces if len(p) >= 2]
    if not pieces:
        raise ValueError("the texts have fewer than two tokens")

    def run(piece, skip: tuple[int, ...], states: list | None = None):
        """Top-1 tokens with ``skip`` skipped, and the input of every layer. With ``states`` (the full
        run's layer inputs) the run starts at the first skipped layer: nothing below it changes."""
        ctx, env = _start(ex, piece)
        first = min(skip) if states is not None else 0
        if states is not None:
            ex.set_layer_input(env, first, states[first])
        ins = []
        for l in range(first, L):
            ins.append(ex.layer_input(env, l))
            ex.run_layers(ctx, env, l, l + 1, skip=skip)
        return ex.logits(ctx, env)[0].argmax(-1), ins

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


__all__ = ["SkipCalibration", "calibrate_skip"]
