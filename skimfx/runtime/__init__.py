"""Runtime: KV cache, prefill / decode / generate, sampling, and the HF-shaped compiled model."""
from .cache import CacheFullError, KVCache
from .engine import Ctx, Generation, Stats, decode_step, extend, forward, gather_tokens, generate, prefill
from .hf import CausalLMOutput, CompiledModel
from .sampling import SamplingConfig, sample

__all__ = ["KVCache", "CacheFullError", "Ctx", "Generation", "Stats", "forward", "extend", "prefill",
           "decode_step", "generate", "gather_tokens", "CompiledModel", "CausalLMOutput", "SamplingConfig",
           "sample"]
