"""KV cache policies, one class per method, registered by name (``POLICIES``).

Evicting (the cache physically shrinks): SnapKV / PyramidKV, StreamingLLM, H2O, TOVA, Knorm, KeyDiff,
ExpectedAttention, KVzip (``evicting.py`` holds what they share; KVzip scores the prompt with probe
forwards that ``runtime/probe.py`` runs). Per-head budgets (KV heads of a layer keep different counts,
stored as head groups: ``headwise.py``): AdaKV over any evicting scorer, DuoAttention. Sparse reads (the full cache stays, decode reads a subset): Quest, DELTA
(``sparse.py``); SentenceKV (sentence summaries resident, token KV optionally on the host).
The interface and the registry are in ``base.py``. May import: ``kernels``, ``program``, and the
runtime's ``selection``; a policy never imports another policy's module except the shared bases.
"""
# importing the method modules registers them
from . import (adakv, delta, duo, expected_attention, h2o, keydiff, knorm, kvzip, quest, sentencekv,  # noqa: F401
               snapkv, streamingllm, tova)
from .base import POLICIES, KVPolicy, make_policies, register
from .evicting import EvictingPolicy
from .headwise import HeadwisePolicy
from .sparse import SparseReadPolicy

__all__ = ["POLICIES", "KVPolicy", "EvictingPolicy", "HeadwisePolicy", "SparseReadPolicy", "make_policies", "register"]
