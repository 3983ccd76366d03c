"""Exit confidence: the LM head fused with an online softmax, for early-exit branches.

Semantics (kernel and reference): ``h [N, H]`` (normed hidden states), ``weight [V, H]`` (the LM head).
With logits ``z = h · weightᵀ`` (soft-capped ``softcap * tanh(z / softcap)`` when ``softcap``), returns
``(top1 [N] long, prob [N] float32, margin [N] float32)``: the argmax token (the first on ties), its
softmax probability, and that probability minus the second-highest one.

Why a kernel of its own: an exit branch only has to decide whether to stop and which token to emit.
Materialising [N, V] logits and then a softmax reads and writes V floats per row twice more; the
kernel keeps a running max, sum of exponentials and the top two logits per vocabulary split, writes
five numbers per (row, split), and a tiny combine step merges the splits.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, autotune_configs, launch, tl, triton, use_triton
from .linear import linear


def _check(h: torch.Tensor, weight: torch.Tensor) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"exit_confidence: h must be [N, H] and weight [V, H]; got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise ValueError("exit_confidence: needs a vocabulary of at least 2 tokens")
    if h.device != weight.device:
        raise ValueError(f"exit_confidence: h is on {h.device}, weight on {weight.device}")


def exit_confidence_ref(h: torch.Tensor, weight: torch.Tensor, softcap: float | None = None):
    """Reference: full logits in fp32, softmax, top-2."""
    _check(h, weight)
    z = (h.float() @ weight.float().T) if h.dtype != weight.dtype else linear(h, weight).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    p = torch.softmax(z, -1)
    top1 = z.argmax(-1)
    p1 = p.gather(1, top1[:, None])[:, 0]
    p2 = p.scatter(1, top1[:, None], -1.0).amax(-1)
    return top1, p1, p1 - p2


if HAS_TRITON:

    def _configs() -> list:
        return autotune_configs([triton.Config({"BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w)
                                 for bv in (64, 32, 128) for bh in (64, 128) for w in (4, 8)
                                 if bv * bh <= 8192])

    @triton.autotune(configs=_configs(), key=["H", "SPLIT"])
    @triton.jit
    def _exit_confidence_kernel(
        X, W, PART, stride_xn, stride_xh, stride_wv, stride_wh, V, H, SPLIT, NSPLIT, softcap,
        SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        n = tl.program_id(0)
        s = tl.program_id(1)
        NEG: tl.constexpr = float("-inf")
        m = NEG
        l = 0.0
        t1 = NEG
        t2 = NEG
        i1 = 0
        v0 = s * SPLIT
        for start in range(v0, tl.minimum(v0 + SPLIT, V), BLOCK_V):
            rows = start + tl.arange(0, BLOCK_V)
            rmask = rows < V
            acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                cmask = cols < H
                x = tl.load(X + n * stride_xn + cols * stride_xh, mask=cmask, other=0.0).to(tl.float32)
                w = tl.load(W + rows[:, None] * stride_wv + cols[None, :] * stride_wh,
                            mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
            if SOFTCAP:
                e = tl.exp(2.0 * acc / softcap)
                acc = softcap * (1.0 - 2.0 / (e + 1.0))                  # softcap * tanh(acc / softcap)
            z = tl.where(rmask, acc, NEG)
            c1 = tl.max(z, axis=0)
            ci = tl.min(tl.where(z == c1, rows, V), axis=0)              # first index of the chunk max
            c2 = tl.max(tl.where(rows == ci, NEG, z), axis=0)
            m_new = tl.maximum(m, c1)
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            t2 = tl.maximum(tl.maximum(tl.minimum(t1, c1), t2), c2)
            i1 = tl.where(c1 > t1, ci, i1)
            t1 = tl.maximum(t1, c1)
        base = PART + (n * NSPLIT + s) * 5
        tl.store(base + 0, m)
        tl.store(base + 1, l)
        tl.store(base + 2, t1)
        tl.store(base + 3, t2)
        tl.store(base + 4, i1.to(tl.float32))


def _combine(part: torch.Tensor):
    """part [N, S, 5] = (max, sum exp, top1 logit, top2 logit, top1 index) per split -> top1, prob, margin."""
    m, l, t1, t2, idx = part.unbind(-1)
    M = m.amax(1, keepdim=True)
    L = (l * torch.exp(m - M)).sum(1)
    best = t1.argmax(1, keepdim=True)                       # the first split on ties = the lowest index
    top1_logit = t1.gather(1, best)[:, 0]
    others = t1.scatter(1, best, float("-inf")).amax(1)
    second = torch.maximum(others, t2.gather(1, best)[:, 0])
    Mx = M[:, 0]
    p1 = torch.exp(top1_logit - Mx) / L
    p2 = torch.exp(second - Mx) / L
    return idx.gather(1, best)[:, 0].long(), p1, p1 - p2


def exit_confidence_triton(h: torch.Tensor, weight: torch.Tensor, softcap: float | None = None):
    _check(h, weight)
    N, H = h.shape
    V = weight.shape[0]
    # enough vocabulary splits to fill the GPU at decode (N = 1); each split is a multiple of 128 rows
    n_split = max(1, min(256, triton.cdiv(V, 1024)))
    split = triton.cdiv(triton.cdiv(V, n_split), 128) * 128
    n_split = triton.cdiv(V, split)
    part = torch.empty(N, n_split, 5, dtype=torch.float32, device=h.device)
    _exit_confidence_kernel[(N, n_split)](
        h, weight, part, h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), V, H, split, n_split,
        float(softcap or 1.0), SOFTCAP=softcap is not None)
    return _combine(part)


def exit_confidence(h: torch.Tensor, weight: torch.Tensor, softcap: float | None = None):
    """(top1, prob, margin) of the softmax over ``h · weightᵀ``; see the module docstring."""
    if use_triton(h):
        return launch("exit_confidence", exit_confidence_triton, h, weight, softcap)
    return exit_confidence_ref(h, weight, softcap)


__all__ = ["exit_confidence", "exit_confidence_ref", "exit_confidence_triton"]
