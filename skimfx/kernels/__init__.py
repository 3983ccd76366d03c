"""Kernels: one op per module, each a Triton kernel, a validating wrapper and a torch reference.

Dispatch is by device: Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1`` for tests), the
torch reference on CPU. Kernels know nothing of graphs, caches or the runtime.
"""
from ._triton import HAS_TRITON, use_triton
from .attention import attention, attention_flops, attention_mask, attention_ref, attention_triton
from .compact import gather_kv, gather_kv_ref, gather_kv_triton
from .kv_pages import page_minmax, page_minmax_ref, page_minmax_triton, page_scores, page_scores_ref, page_scores_triton
from .sparse_attention import sparse_attention, sparse_attention_ref, sparse_attention_triton
from .token_scores import token_scores, token_scores_ref, token_scores_triton, topk_tokens

__all__ = ["HAS_TRITON", "use_triton", "attention", "attention_ref", "attention_triton", "attention_mask",
           "attention_flops", "token_scores", "token_scores_ref", "token_scores_triton", "topk_tokens",
           "sparse_attention", "sparse_attention_ref", "sparse_attention_triton", "gather_kv", "gather_kv_ref",
           "gather_kv_triton", "page_minmax", "page_minmax_ref", "page_minmax_triton", "page_scores",
           "page_scores_ref", "page_scores_triton"]
