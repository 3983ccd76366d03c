"""Kernels: one op per module, each a Triton kernel, a validating wrapper and a torch reference.

Dispatch is by device: Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1`` for tests), the
torch reference on CPU. Kernels know nothing of graphs, caches or the runtime: this package imports
nothing else of skimfx (a leaf, like ``program``). Every op is also registered as
``torch.ops.skimfx.<op>`` (``library.py``). Host shortcuts that test tensor values (e.g. "no padding:
skip the mask") are skipped while ``torch.compile`` traces, so every reference traces without breaks.
"""
from ._triton import HAS_TRITON, use_triton
from .attention import attention, attention_flops, attention_mask, attention_ref, attention_triton
from .compact import gather_kv, gather_kv_ref, gather_kv_triton
from .kv_pages import page_minmax, page_minmax_ref, page_minmax_triton, page_scores, page_scores_ref, page_scores_triton
from .sparse_attention import (sparse_attention, sparse_attention_queries, sparse_attention_queries_ref, sparse_attention_ref,
                               sparse_attention_triton)
from .token_scores import decode_attention_scores, decode_attention_scores_ref, token_scores, token_scores_ref, token_scores_triton
from .norm import add_rms_norm, add_rms_norm_ref, add_rms_norm_triton, rms_norm, rms_norm_ref, rms_norm_triton
from .activation import glu, glu_ref, glu_triton
from .rope import rope, rope_ref, rope_triton
from .linear import linear
from .exit_confidence import exit_confidence, exit_confidence_ref, exit_confidence_triton
from . import library  # noqa: E402  registers torch.ops.skimfx.* (after the modules it wraps)

__all__ = ["HAS_TRITON", "use_triton", "attention", "attention_ref", "attention_triton", "attention_mask",
           "attention_flops", "decode_attention_scores", "decode_attention_scores_ref", "token_scores", "token_scores_ref", "token_scores_triton",
           "sparse_attention", "sparse_attention_ref", "sparse_attention_triton", "sparse_attention_queries",
           "sparse_attention_queries_ref", "gather_kv", "gather_kv_ref",
           "gather_kv_triton", "page_minmax", "page_minmax_ref", "page_minmax_triton", "page_scores",
           "page_scores_ref", "page_scores_triton", "rms_norm", "rms_norm_ref", "rms_norm_triton", "add_rms_norm",
           "add_rms_norm_ref", "add_rms_norm_triton", "glu", "glu_ref", "glu_triton", "rope", "rope_ref",
           "rope_triton", "exit_confidence", "exit_confidence_ref", "exit_confidence_triton", "linear", "library"]
