"""Every skimfx kernel as a torch op: ``torch.ops.skimfx.<name>``.

Why: other serving stacks call ops, not Python modules, and ``torch.compile`` treats a registered
op with a fake (shape-only) implementation as one opaque node instead of tracing into a Triton
launch. Each op here is a ``torch.library.custom_op`` whose implementation is the dispatching
wrapper of its module (Triton on CUDA, the torch reference on CPU) and whose fake implementation
gives the output shapes and dtypes.

Eager calls from skimfx's own graphs go to the Python wrappers directly: the op layer costs tens of
microseconds per call on CPU, which a decode step of a small model would feel. Under
``torch.compile`` on CUDA the wrappers route to these ops (``_triton.launch``), so a compiled stage
keeps the Triton kernels as single nodes.

    import skimfx.kernels  # registers the ops
    y = torch.ops.skimfx.rms_norm(x, w, 1e-6, 0.0)
"""
from __future__ import annotations

import torch

from .activation import glu
from .attention import attention
from .compact import gather_kv
from .exit_confidence import exit_confidence
from .kv_pages import page_minmax, page_scores
from .linear import linear
from .norm import add_rms_norm, rms_norm
from .rope import rope
from .sparse_attention import sparse_attention
from .token_scores import decode_attention_scores, token_scores

NAMESPACE = "skimfx"


def _op(name: str, mutates_args=()):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)


@_op("attention")
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: torch.Tensor, kv_len: torch.Tensor,
               scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    return attention(q, k, v, q_start, kv_len, scale, window, softcap)


@_attention.register_fake
def _(q, k, v, q_start, kv_len, scale, window=None, softcap=None):
    return torch.empty_like(q)


@_op("sparse_attention")
def _sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, kv_len: torch.Tensor,
                      scale: float, softcap: float | None = None) -> torch.Tensor:
    return sparse_attention(q, k, v, index, kv_len, scale, softcap)


@_sparse_attention.register_fake
def _(q, k, v, index, kv_len, scale, softcap=None):
    return torch.empty_like(q)


@_op("token_scores")
def _token_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, kv_len: torch.Tensor, scale: float,
                  softmax: bool = False, heads: str = "sum", pool: str | None = None,
                  pool_kernel: int = 5) -> torch.Tensor:
    return token_scores(q, k, q_pos, kv_len, scale, softmax=softmax, heads=heads, pool=pool, pool_kernel=pool_kernel)


@_token_scores.register_fake
def _(q, k, q_pos, kv_len, scale, softmax=False, heads="sum", pool=None, pool_kernel=5):
    B, Hq = q.shape[:2]
    S = k.shape[2]
    shape = (B, Hq, S) if heads == "none" else (B, S)
    return q.new_empty(shape, dtype=torch.float32)


@_op("gather_kv")
def _gather_kv(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return gather_kv(src, index)


@_gather_kv.register_fake
def _(src, index):
    B, H, _, D = src.shape
    return src.new_empty(B, H, index.shape[-1], D)


@_op("page_minmax")
def _page_minmax(k: torch.Tensor, kv_len: torch.Tensor, page_size: int, first_page: int = 0,
                 last_page: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return page_minmax(k, kv_len, page_size, first_page, last_page)


@_page_minmax.register_fake
def _(k, kv_len, page_size, first_page=0, last_page=None):
    B, H, S, D = k.shape
    last = -(-S // page_size) if last_page is None else last_page
    shape = (B, H, last - first_page, D)
    return k.new_empty(shape, dtype=torch.float32), k.new_empty(shape, dtype=torch.float32)


@_op("page_scores")
def _page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, kv_len: torch.Tensor,
                 page_size: int) -> torch.Tensor:
    return page_scores(q, kmin, kmax, kv_len, page_size)


@_page_scores.register_fake
def _(q, kmin, kmax, kv_len, page_size):
    return q.new_empty(kmin.shape[:3], dtype=torch.float32)


@_op("rms_norm")
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return rms_norm(x, weight, eps, offset)


@_rms_norm.register_fake
def _(x, weight, eps, offset=0.0):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_op("add_rms_norm")
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm(x, residual, weight, eps, offset)


@_add_rms_norm.register_fake
def _(x, residual, weight, eps, offset=0.0):
    like = dict(memory_format=torch.contiguous_format)
    return torch.empty_like(x, **like), torch.empty_like(x, **like)


@_op("glu")
def _glu(gate: torch.Tensor, up: torch.Tensor, activation_name: str) -> torch.Tensor:
    return glu(gate, up, activation_name)


@_glu.register_fake
def _(gate, up, activation_name):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@_op("rope")
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope(q, k, cos, sin)


@_rope.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@_op("exit_confidence")
def _exit_confidence(h: torch.Tensor, weight: torch.Tensor,
                     softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return exit_confidence(h, weight, softcap)


@_exit_confidence.register_fake
def _(h, weight, softcap=None):
    n = h.shape[0]
    return (h.new_empty(n, dtype=torch.long), h.new_empty(n, dtype=torch.float32),
            h.new_empty(n, dtype=torch.float32))


@_op("decode_attention_scores")
def _decode_attention_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor, scale: float,
                             softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_attention_scores(q, k, v, kv_len, scale, softcap)


@_decode_attention_scores.register_fake
def _(q, k, v, kv_len, scale, softcap=None):
    return torch.empty_like(q), q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


@_op("linear")
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return linear(x, weight, bias)


@_linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


OPS = ("attention", "sparse_attention", "token_scores", "gather_kv", "page_minmax", "page_scores", "rms_norm",
       "add_rms_norm", "glu", "rope", "exit_confidence", "decode_attention_scores", "linear")


__all__ = ["OPS", "NAMESPACE"]
