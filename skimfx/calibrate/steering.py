"""Steering calibration for Activation-Steered Compression (ASC; Azizi et al. 2025, "Activation Steering
for Chain-of-Thought Compression"): the steering vector and its strength.

    cal = skimfx.calibrate_steering(model, pairs, tokenizer=tok, layer=15, kl_bound=0.1)
    cal.save("asc.safetensors")
    cm = skimfx.compile(model, skimfx.Steer(steering="asc.safetensors"), tokenizer=tok)

``pairs``: (prompt, verbose answer, concise answer) triples, the same question answered at length and
briefly (the paper uses 100). For each pair, prompt + answer is run teacher-forced through the dense
model and the residual stream leaving ``layer`` is averaged over the answer's tokens; the vector is the
mean over pairs of (concise mean - verbose mean): ``v = E[h(concise)] - E[h(verbose)]``.

The strength: steering moves every next-token distribution, and the paper keeps that move bounded in KL
divergence from the unsteered model. Here the KL is measured rather than bounded analytically: on the
prompts and verbose answers of up to ``kl_pairs`` pairs (every position from the prompt's last token on),
``KL(p_unsteered || p_steered)`` averaged over positions, for alpha doubling from ``max_alpha / 64`` until the
bound is passed, then bisected; ``alpha`` is the largest one measured within ``kl_bound`` and ``curve``
holds every (alpha, KL) measured. ``max_alpha`` makes the shift ``alpha * |v|`` at most ``max_shift`` times
the mean norm of the residual stream at the layer: past that the stream is mostly ``v`` and the KL
saturates (the final norm removes the scale), so a bound that is never reached would otherwise give an
unbounded alpha; ``bound_reached`` says whether the KL bound or ``max_alpha`` chose alpha.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..runtime.cache import KVCache
from ..runtime.context import Ctx
from ..runtime.executor import Executor
from .common import FieldsFile, _compiled, _start


@dataclass
class SteeringCalibration(FieldsFile):
    """The ASC steering vector after ``layer`` ([hidden], concise minus verbose) and its strength ``alpha``,
    chosen so that the measured mean KL to the unsteered next-token distribution (``kl``) stays within
    ``kl_bound``; ``curve``: every (alpha, KL) measured; ``norm``: the mean norm of the residual stream at
    the layer (for scale)."""

    layer: int
    vector: torch.Tensor
    alpha: float
    kl_bound: float
    kl: float = 0.0
    curve: tuple = ()
    pairs: int = 0
    norm: float = 0.0
    seconds: float = 0.0
    bound_reached: bool = True

    REQUIRED = ("layer", "vector", "alpha", "kl_bound")
    MADE_BY = "calibrate_steering"

    def recipe(self, alpha: float | None = None):
        """A ``Steer`` recipe with this calibration (``alpha`` overrides the calibrated one)."""
        from ..recipes.generation import Steer

        return Steer(steering=self, alpha=alpha)

    def report(self) -> str:
        pts = ", ".join(f"{a:.3g}: {k:.4f}" for a, k in self.curve)
        return (f"steering after layer {self.layer} from {self.pairs} pairs: |v| = {float(self.vector.norm()):.3g} "
                f"(residual norm {self.norm:.3g}); alpha {self.alpha:.3g} at KL {self.kl:.4f} nats (bound "
                f"{self.kl_bound}{'' if self.bound_reached else ', not reached below max_alpha'}); KL by alpha: {pts}")


def _pair(p) -> tuple[str, str, str]:
    if isinstance(p, dict):
        try:
            return p["prompt"], p["verbose"], p["concise"]
        except KeyError:
            raise ValueError(f"a steering pair as a dict needs the keys prompt, verbose, concise; got {sorted(p)}") \
                from None
    if isinstance(p, (tuple, list)) and len(p) == 3 and all(isinstance(x, str) for x in p):
        return tuple(p)
    raise ValueError(f"each steering pair is (prompt, verbose answer, concise answer) as strings, got {p!r}")


def _prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tok(prompt).input_ids


def _answer_mean(ex: Executor, ids: list[int], start: int, layer: int) -> torch.Tensor:
    """The residual stream leaving ``layer`` averaged over tokens ``start``.. of ``ids`` [hidden]."""
    ctx, env = _start(ex, ids)
    ex.run_layers(ctx, env, 0, layer + 1)
    return ex.hidden(env, layer)[0, start:].float().mean(0)


def steered_logits(ex: Executor, ids: list[int], layer: int, shift: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced logits [T, V] of ``ids`` with ``shift`` ([hidden]) added to the residual stream after
    ``layer`` (None: unsteered)."""
    program = ex.program
    ctx, env = _start(ex, ids)
    ex.run_layers(ctx, env, 0, layer + 1)
    if shift is not None:
        ex.set_hidden(env, layer, ex.hidden(env, layer) + shift.to(program.info.dtype))
    ex.run_layers(ctx, env, layer + 1, ex.num_layers)
    return ex.logits(ctx, env)[0].float()


def _upper(ex: Executor, env: dict, layer: int, h: torch.Tensor, T: int) -> torch.Tensor:
    """Layers above ``layer`` and the head on the state ``h`` [1, T, hidden], with a fresh cache."""
    program = ex.program
    ctx = Ctx(KVCache.for_program(program, 1, T), [T], program)
    run = dict(env)
    ex.set_hidden(run, layer, h)
    ex.run_layers(ctx, run, layer + 1, ex.num_layers)
    return ex.logits(ctx, run)[0].float()


def calibrate_steering(model, pairs, *, layer: int | None = None, kl_bound: float = 0.1, tokenizer=None,
                       chat: bool = True, kl_pairs: int = 32, max_shift: float = 4.0,
                       bisections: int = 8) -> SteeringCalibration:
    """The ASC steering vector after ``layer`` (default: the middle layer) from ``pairs`` (prompt, verbose,
    concise), and the largest alpha whose mean next-token KL to the unsteered model stays within
    ``kl_bound`` nats. ``model``: a HF model (compiled dense here) or a ``CompiledModel``; prompts are wrapped
    in the chat template when the tokenizer has one and ``chat``."""
    cm, tok = _compiled(model, tokenizer, "calibrate_steering")
    L = cm.info.num_layers
    layer = L // 2 if layer is None else layer
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < L:
        raise ValueError(f"layer must be in 0..{L - 1} for this {L}-layer model, got {layer!r}")
    if not isinstance(kl_bound, (int, float)) or not kl_bound > 0:
        raise ValueError(f"kl_bound must be a positive number of nats, got {kl_bound!r}")
    if not isinstance(max_shift, (int, float)) or not max_shift > 0:
        raise ValueError(f"max_shift must be a positive multiple of the residual norm, got {max_shift!r}")
    pairs = [_pair(p) for p in pairs]
    if not pairs:
        raise ValueError("give at least one (prompt, verbose, concise) pair (the paper uses 100)")
    t0 = time.perf_counter()
    ex = Executor(cm.program)
    diffs, norms, texts = [], [], []
    with torch.inference_mode():
        for prompt, verbose, concise in pairs:
            p = _prompt_ids(tok, prompt, chat)
            long_ids = tok(verbose, add_special_tokens=False).input_ids
            short_ids = tok(concise, add_special_tokens=False).input_ids
            if not long_ids or not short_ids:
                raise ValueError(f"an empty answer in the pair for prompt {prompt[:60]!r}")
            h_long = _answer_mean(ex, p + long_ids, len(p), layer)
            h_short = _answer_mean(ex, p + short_ids, len(p), layer)
            diffs.append(h_short - h_long)
            norms.append(0.5 * float(h_long.norm() + h_short.norm()))
            texts.append((p + long_ids, len(p) - 1))
        v = torch.stack(diffs).mean(0)
        if not float(v.norm()) > 0:
            raise ValueError("the verbose and concise answers give the same mean activation: no steering direction")
        norm = sum(norms) / len(norms)
        max_alpha = max_shift * norm / float(v.norm())
        # the states below the layer do not depend on alpha: computed once per text
        base = []
        for ids, first in texts[:kl_pairs]:
            ctx, env = _start(ex, ids)
            ex.run_layers(ctx, env, 0, layer + 1)
            h = ex.hidden(env, layer).clone()
            ref = torch.log_softmax(_upper(ex, env, layer, h, len(ids))[first:], -1)
            base.append((env, h, ref, first, len(ids)))

        def kl_at(alpha: float) -> float:
            total, n = 0.0, 0
            shift = (alpha * v).to(cm.info.dtype)
            for env, h, ref, first, T in base:
                got = torch.log_softmax(_upper(ex, env, layer, h + shift, T)[first:], -1)
                total += float((ref.exp() * (ref - got)).sum(-1).sum())
                n += ref.shape[0]
            return total / n

        curve = []
        lo, lo_kl, hi = 0.0, 0.0, None
        for j in range(6, -1, -1):
            a = max_alpha / 2 ** j
            k = kl_at(a)
            curve.append((a, k))
            if k > kl_bound:
                hi = a
                break
            lo, lo_kl = a, k
        if hi is not None:
            for _ in range(bisections):
                mid = 0.5 * (lo + hi)
                k = kl_at(mid)
                curve.append((mid, k))
                if k <= kl_bound:
                    lo, lo_kl = mid, k
                else:
                    hi = mid
    return SteeringCalibration(layer=layer, vector=v.cpu(), alpha=lo, kl_bound=float(kl_bound), kl=lo_kl,
                               curve=tuple(sorted(curve)), pairs=len(pairs), norm=norm,
                               seconds=time.perf_counter() - t0, bound_reached=hi is not None)


__all__ = ["SteeringCalibration", "calibrate_steering", "steered_logits"]
