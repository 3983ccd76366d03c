"""KV cache policies, one class per method, registered by name (``POLICIES``).

Evicting (the cache physically shrinks): SnapKV / PyramidKV, StreamingLLM, H2O, TOVA, Knorm, KeyDiff,
KVzip (``evicting.py`` holds what they share; KVzip scores the prompt with probe forwards that
``runtime/probe.py`` runs). Sparse reads (the full cache stays, decode reads a subset): Quest, DELTA
(``sparse.py``); SentenceKV (sentence summaries resident, token KV optionally on the host).
The interface and the registry are in ``base.py``. May import: ``kernels``, ``program``, and the
runtime's ``selection``; a policy never imports another policy's module except the shared bases.
"""
# importing the method modules registers them
from . import delta, h2o, keydiff, knorm, kvzip, quest, sentencekv, snapkv, streamingllm, tova  # noqa: F401
from .base import POLICIES, KVPolicy, make_policies, register
from .evicting import EvictingPolicy
from .sparse import SparseReadPolicy

__all__ = ["POLICIES", "KVPolicy", "EvictingPolicy", "SparseReadPolicy", "make_policies", "register"]
