"""Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating
Attention from Future Queries Distribution"; the rule of kvpress's ExpectedAttentionPress).

A cached pair is worth the attention that the queries still to come will give it. Those queries are
modelled as Gaussian: mean ``mu`` and covariance ``Sigma`` of the prompt's queries before RoPE (per query
head, leaving out the first ``sinks`` queries), rotated to the next ``future`` positions by the average
RoPE matrix ``R = mean_p R(p)`` over positions n .. n + future - 1 (``mu' = R mu``,
``Sigma' = R Sigma R^T``). For a Gaussian query, E[exp(s q.k)] = exp(s mu'.k + s^2/2 k^T Sigma' k)
(s: the layer's attention scale; kvpress uses 1/sqrt(d), the same for models without a custom scale),
so each key scores the softmax of ``s mu'.k_j + s^2/2 k_j^T Sigma' k_j`` over the non-sink keys, averaged
over the query heads of its GQA group and multiplied by ``||v_j||`` (``vnorm``; kvpress's epsilon 0).
The first ``sinks`` keys are always kept; each KV head keeps its ``budget`` best.

The queries arrive after RoPE; the pre-RoPE ones are recovered with the inverse rotation at their
positions (``x = (y cos - rot(y) sin) / (cos^2 + sin^2)``, rotate-half RoPE; the division undoes a
RoPE attention scaling). The RoPE tables come from the Program's own prologue, run at the positions
needed, so every RoPE variant the model computes (scaling, NTK, YaRN) is the model's.
"""
from __future__ import annotations

import torch

from .base import register
from .evicting import EvictingPolicy


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope_tables(ctx, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, P, D] that layer ``layer`` of ``ctx.program`` applies at ``positions [B, P]``: the
    prologue run on those positions, and of the values it hands the layer the two [.., P, head_dim]
    tables that are not the residual stream; sin is the one that is 0 at position 0."""
    program = ctx.program
    prologue = program.stages[0]
    stage = program.layer_stages[layer]
    hidden = program.hidden_input(layer)
    D = program.info.head_dim
    ids = torch.zeros(positions.shape, dtype=torch.long, device=positions.device)
    probe = torch.cat([torch.zeros_like(positions[:, :1]), positions], dim=1)   # position 0 tells sin from cos
    given = {"input_ids": torch.cat([ids[:, :1], ids], 1), "position_ids": probe}
    env = dict(zip(prologue.outputs, prologue.module(ctx, *[given[n] for n in prologue.inputs])))
    tables = [env[n] for n in stage.inputs if n in env and n != hidden and env[n].dim() == 3
              and env[n].shape[-1] == D and env[n].is_floating_point()]
    if len(tables) != 2:
        raise ValueError(f"expected_attention: layer {layer} does not read exactly one RoPE cos/sin pair from the "
                         f"prologue (found {len(tables)} [.., T, {D}] tables); this model's RoPE is not supported")
    a, b = tables
    cos, sin = (b, a) if bool((a[:, 0] == 0).all()) else (a, b)
    if not bool((sin[:, 0] == 0).all()):
        raise ValueError(f"expected_attention: layer {layer}'s RoPE tables have no sine (none is 0 at position 0)")
    B = positions.shape[0]
    return cos[:, 1:].expand(B, -1, -1).float(), sin[:, 1:].expand(B, -1, -1).float()


def expected_attention_scores(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: list[int],
                              cos_q: torch.Tensor, sin_q: torch.Tensor, cos_f: torch.Tensor, sin_f: torch.Tensor,
                              scale: float, sinks: int, covariance: bool = True, vnorm: bool = True) -> torch.Tensor:
    """[B, Hkv, S] scores (sinks +inf, padding -inf). q [B, Hq, T, D] post-RoPE prompt queries at the
    positions of ``cos_q``/``sin_q`` [B, T, D]; keys/values [B, Hkv, S, D]; ``cos_f``/``sin_f`` [B, F, D]
    the future positions' tables."""
    B, Hq, T, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    dev = q.device
    y = q.float()
    pre = (y * cos_q[:, None] - rotate_half(y) * sin_q[:, None]) / (cos_q ** 2 + sin_q ** 2)[:, None]
    t = torch.arange(T, device=dev)[None]
    nt = torch.tensor(n, device=dev)[:, None]
    used = (t >= sinks) & (t < nt)
    used = torch.where(used.any(1, keepdim=True), used, t < nt)        # a prompt of sinks only: all its queries
    w = used.float()[:, None, :, None]                                   # [B, 1, T, 1]
    cnt = used.sum(1).float()[:, None, None]                             # [B, 1, 1]
    mu_pre = (pre * w).sum(2) / cnt                                      # [B, Hq, D]
    # the average rotation over the future positions: R(p) = diag(cos_p) + diag(sin_p) P, P x = rotate_half(x)
    eye = torch.eye(D, device=dev)
    P = rotate_half(eye).T                                               # P @ x == rotate_half(x)
    R = cos_f.mean(1)[:, :, None] * eye + sin_f.mean(1)[:, :, None] * P  # [B, D, D]
    mu = torch.einsum("bij,bhj->bhi", R, mu_pre)
    k = keys.float()
    G = Hq // Hkv
    logits = scale * torch.einsum("bhgd,bhsd->bhgs", mu.view(B, Hkv, G, D), k)
    if covariance:
        c = (pre - mu_pre[:, :, None]) * w
        cov = torch.einsum("bhti,bhtj->bhij", c, c) / cnt[..., None]
        cov = R[:, None] @ cov @ R[:, None].transpose(-1, -2)             # [B, Hq, D, D]
        quad = torch.einsum("bhgij,bhsi,bhsj->bhgs", cov.view(B, Hkv, G, D, D), k, k)
        logits = logits + 0.5 * scale ** 2 * quad
    j = torch.arange(S, device=dev)[None, None, None]
    ctx_keys = (j >= sinks) & (j < torch.tensor(n, device=dev)[:, None, None, None])
    p = torch.softmax(logits.masked_fill(~ctx_keys, float("-inf")), dim=-1).nan_to_num(0.0).mean(2)   # [B, Hkv, S]
    if vnorm:
        p = p * values.float().norm(dim=-1)
    j = j[:, 0]
    p = p.masked_fill(j < sinks, float("inf"))
    return p.masked_fill(j >= torch.tensor(n, device=dev)[:, None, None], float("-inf"))


@register
class ExpectedAttention(EvictingPolicy):
    name = "expected_attention"

    def prefill_scores(self, ctx, q, keys, n, budget, scale):
        below = [s for s in ctx.selected if s < self.layer]
        if below:
            raise ValueError(f"expected_attention (layer {self.layer}) reads the prompt's query positions and "
                             f"cannot follow prefill token pruning (selection after layer {below[0]})")
        p = self.params
        dev = q.device
        T = q.shape[2]
        start = torch.tensor(n, device=dev)[:, None]
        positions = torch.cat([torch.arange(T, device=dev)[None].expand(len(n), -1),
                               start + torch.arange(p.future, device=dev)[None]], dim=1)
        cos, sin = rope_tables(ctx, self.layer, positions)
        _, values = ctx.cache.view(self.layer, max(n))
        return expected_attention_scores(q, keys, values, n, cos[:, :T], sin[:, :T], cos[:, T:], sin[:, T:], scale,
                                         p.sinks, p.covariance, p.vnorm)
