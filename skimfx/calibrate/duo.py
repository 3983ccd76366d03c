"""DuoAttention's head patterns (``calibrate_duo``): which KV heads need the whole context.

DuoAttention (Xiao et al., 2024) learns a gate per head by optimising, on synthetic passkey data, how far
the model's outputs move when a head's attention is replaced by sink + recent attention. This is a
cheaper, training-free measurement of the same thing: on real text (``reference_texts``: license texts and
Python's documentation, shipped with the system) each layer runs densely, and for every KV head the
attention output of its query heads is recomputed with the head restricted to the first ``sinks`` and the
``recent`` newest keys; the head's score is the mean relative change ``||o_full - o_stream||^2 /
||o_full||^2`` over the queries that the restriction affects (those past ``sinks + recent``), averaged over
its GQA group. A head that attends beyond its window scores high (a retrieval head); one whose output the
window already reproduces scores near 0 (a streaming head). Heads are scored one layer at a time under the
dense model (the other heads and layers unrestricted), as DuoAttention's gates are per head.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..runtime.cache import KVCache
from ..runtime.context import Ctx
from ..runtime.executor import Executor
from .common import FieldsFile, _compiled, _tokenize_upto
from .texts import reference_texts


@dataclass
class DuoCalibration(FieldsFile):
    """Per (layer, KV head) scores of how much a head needs keys outside its ``sinks`` + ``recent`` window
    (``scores [L, Hkv]``, NaN for sliding-window layers, which DuoAttention leaves alone), measured on
    ``tokens`` tokens of text in ``seconds``."""

    REQUIRED = ("scores", "sinks", "recent")
    MADE_BY = "calibrate_duo"

    scores: torch.Tensor
    sinks: int
    recent: int
    tokens: int = 0
    seconds: float = 0.0

    def recipe(self, streaming: float = 0.5, **kw):
        """A ``DuoAttention`` recipe from these scores (the ``streaming`` fraction of heads streams), with the
        calibration's ``sinks`` and ``recent`` unless given."""
        from ..recipes.kv import DuoAttention

        kw = {"sinks": self.sinks, "recent": self.recent, **kw}
        return DuoAttention(calibration=self, streaming=streaming, **kw)

    def report(self) -> str:
        lines = [f"DuoAttention head scores ({self.tokens} tokens, {self.seconds:.0f} s, window {self.sinks} sinks + "
                 f"{self.recent} recent): layer: per KV head"]
        for l, row in enumerate(self.scores.tolist()):
            lines.append(f"  {l:3d}: " + " ".join("   -  " if s != s else f"{s:.4f}" for s in row))
        return "\n".join(lines)


def streaming_change(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
                     softcap: float | None, sinks: int, recent: int) -> tuple[torch.Tensor, int]:
    """(sum over the affected queries of the relative change of each KV head's output [Hkv], their count):
    one sequence's layer, q [1, Hq, T, D], k/v [1, Hkv, T, D] (the whole prompt), ``out`` the dense output."""
    _, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None]
    window = (j <= i) & ((j < sinks) | (j > i - recent))
    s = torch.einsum("hgtd,hsd->hgts", q[0].float().view(Hkv, G, T, D), k[0].float()) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~window, float("-inf")), dim=-1)
    o_stream = torch.einsum("hgts,hsd->hgtd", p, v[0].float())
    o_full = out[0].float().view(Hkv, G, T, D)
    rel = (o_full - o_stream).pow(2).sum(-1) / o_full.pow(2).sum(-1).clamp_min(1e-12)   # [Hkv, G, T]
    affected = rel[:, :, sinks + recent:]
    return affected.mean(1).sum(-1), affected.shape[-1]


class _Measure(Ctx):
    """A dense prefill context that measures every full-attention layer's heads as they run."""

    def __init__(self, cache, n, program, sinks: int, recent: int, totals: torch.Tensor, counts: list[int]):
        super().__init__(cache, n, program)
        self.sinks, self.recent, self.totals, self.counts = sinks, recent, totals, counts

    def attend(self, layer, q, k, v, *, scale, window, softcap):
        out = super().attend(layer, q, k, v, scale=scale, window=window, softcap=softcap)
        if window is None:
            change, m = streaming_change(q, k, v, out, scale, softcap, self.sinks, self.recent)
            self.totals[layer] += change.cpu()
            self.counts[layer] += m
        return out


def calibrate_duo(model, texts: list | None = None, *, tokenizer=None, tokens: int = 4096, length: int = 1024,
                  sinks: int = 64, recent: int = 256) -> DuoCalibration:
    """Score every KV head for DuoAttention on ``tokens`` tokens of ``texts`` (strings or token-id lists;
    default ``reference_texts()``), cut into pieces of ``length`` tokens (longer than ``sinks + recent``, so
    that the window leaves keys out). ``model``: a HF model (with ``tokenizer`` for text) or a compiled one."""
    if not isinstance(sinks, int) or sinks < 0 or not isinstance(recent, int) or recent < 1:
        raise ValueError(f"sinks must be an integer >= 0 and recent >= 1, got {sinks!r}, {recent!r}")
    if length <= sinks + recent:
        raise ValueError(f"length ({length}) must exceed sinks + recent ({sinks + recent}): shorter pieces lose no "
                         "keys to the window, so they measure nothing")
    texts = reference_texts() if texts is None else texts
    text = any(isinstance(t, str) for t in texts)
    cm, tok = _compiled(model, tokenizer, "calibrate_duo", need_tokenizer=text)
    program, info = cm.program, cm.info
    docs = _tokenize_upto(tok, texts, tokens) if text else [list(t) for t in texts]
    pieces = [d[i:i + length] for d in docs for i in range(0, len(d), length)]
    pieces = [p for p in pieces if len(p) > sinks + recent]
    if not pieces:
        raise ValueError(f"no piece of the texts is longer than sinks + recent ({sinks + recent} tokens); give longer "
                         "texts or more tokens")
    L, H = info.num_layers, info.num_kv_heads
    totals = torch.zeros(L, H, dtype=torch.float64)
    counts = [0] * L
    t0 = time.perf_counter()
    ex = Executor(program)
    dev = info.device
    with torch.inference_mode():
        for ids in pieces:
            T = len(ids)
            ctx = _Measure(KVCache.for_program(program, 1, T), [T], program, sinks, recent, totals, counts)
            ctx.cache.policies = {}                      # the dense model, whatever policies the program has
            env = ex.embed(ctx, torch.tensor([ids], device=dev), torch.arange(T, device=dev)[None])
            ex.run_layers(ctx, env, 0, L)
    scores = torch.full((L, H), float("nan"))
    for l in range(L):
        if counts[l]:
            scores[l] = (totals[l] / counts[l]).float()
    return DuoCalibration(scores, sinks, recent, sum(map(len, pieces)), time.perf_counter() - t0)


__all__ = ["DuoCalibration", "calibrate_duo", "streaming_change"]
