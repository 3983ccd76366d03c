"""Runtime: runs any Program; never imports a pass.

What lives here: the KV cache (``cache``), the per-call context the lowered graph sees (``context``),
the one stage executor (``executor``), prefill / decode / generate (``engine``), what a call measured
and returns (``stats``), the KV policies, one class per method (``policies/``), the decoding modes
that run fewer layers per token (``decoding/``), token selection on the host (``selection``),
sentences (``sentences``), sampling, and the HF-shaped compiled model (``hf``). May import:
``program``, ``kernels``. Never: ``passes``, ``recipes``, ``calibrate``, ``capture``.
"""
from .cache import CacheFullError, KVCache
from .context import Ctx, gather_tokens
from .decoding import EarlyExitDecoder, NGramDrafts, SpeculativeDecoder
from .engine import decode_step, extend, generate, prefill
from .executor import Executor, Rerun
from .hf import CausalLMOutput, CompiledModel
from .model_guard import ModelChangedError
from .sampling import SamplingConfig, sample
from .stats import DecodeStats, Generation, Stats

__all__ = ["KVCache", "CacheFullError", "Ctx", "Executor", "Rerun", "Generation", "Stats", "extend", "prefill",
           "decode_step", "generate", "gather_tokens", "CompiledModel", "CausalLMOutput", "SamplingConfig",
           "sample", "DecodeStats", "EarlyExitDecoder", "SpeculativeDecoder", "NGramDrafts", "ModelChangedError"]
