"""Decoding modes that run fewer layers per token: lossy early exit (CALM) and lossless
self-speculation (LayerSkip-style exit drafts, Draft&Verify-style layer-skipping drafts, Lookahead-style
n-gram drafts).

A Program says how it decodes with plain data (``program.decoding``: an ``EarlyExitConfig`` or a
``SpeculativeConfig`` from ``skimfx.program``); ``generate`` looks the decoder class up by the config's
``mode`` in ``DECODERS`` and runs it in the shared loop. Both modes run on the stages of a Program that
went through the ``early_exit`` pass (for exit drafts and early exit), through the ``Executor``, and
decode greedily, one sequence at a time (a batch of prompts is decoded prompt by prompt; the prefill,
with any pruning, is the ordinary one).

- ``EarlyExitDecoder`` (mode "early_exit"): after each exit layer E, the exit branch returns the top-1
  token and its probability; when it reaches E's threshold the token is emitted, the layers above E
  get the k/v of the exited hidden state (``program.kv_fill``), and the step ends. Lossy: thresholds
  trade agreement with dense for speed (``calibrate_exits`` picks them for a target agreement).
- ``SpeculativeDecoder`` (mode "speculative"): draft k tokens cheaply, run the full model once on the
  last token plus the k drafts, keep the drafts up to the first one the full model would not have
  chosen, plus the full model's own next token; roll the cache back past the rejected drafts. Greedy
  verification makes the output the dense greedy output. Draft sources: "exit" (the first E+1 layers
  and the exit branch; their k/v are kept and the verification runs only layers E+1.. on the drafted
  tokens' layer-E states, as LayerSkip does), "skip" (the model without a calibrated set of layers,
  ``calibrate_skip``, as Draft&Verify does; the verification runs every layer) and "lookahead" (the
  tokens that followed the latest earlier occurrence of the last n tokens in the prompt or the text
  so far). The number of drafts is chosen each step for the best expected tokens per second from the
  measured step times and the acceptance so far; a source that does not beat plain decoding is passed
  over and retried later.

Over KV cache policies. Self-speculation brackets each draft-and-verify step with
``KVCache.begin_speculation`` / ``end_speculation``: in between, a multi-token pass is a verification in
which each layer's policy gives every draft token what its own decode step would read
(``KVPolicy.verify``; token by token, after a snapshot each, for a policy that evicts during decode), and
``KVCache.rollback`` lets each policy restore its state for the tokens that stay (``KVPolicy.rollback``),
so the output is the policy's own greedy output and a rejected draft never evicted anything. Early exit
writes an exited token's k/v into the layers above through their policies (``KVPolicy.fill``).

What lives here: the shared generation loop, the registry and ``generate`` (``loop``), CALM early exit
(``early_exit``), self-speculation (``speculative``), the n-gram drafts (``drafts``), and the draft-length
schedule: measured step costs and the acceptance model (``schedule``), and short-m@k voting over k sampled
chains that share one prefill (``majority``), and Hogwild! workers over one shared cache (``hogwild``). May import: the runtime modules
(``engine``, ``executor``, ``context``, ``cache``, ``stats``), ``program``, ``kernels``. Never:
``passes``, ``recipes``, ``calibrate``, ``capture``.
"""
from ..stats import DecodeStats
from .drafts import NGramDrafts
from .early_exit import EarlyExitDecoder
from .loop import DECODERS, DecodeState, Decoder, decode_loop, generate, register
from .majority import ShortMajorityDecoder, Vote, VotedGeneration, fork_prefill
from .hogwild import HogwildDecoder, HogwildGeneration
from .schedule import Acceptance, StepCosts
from .speculative import SpeculativeDecoder, SpeculativeState

__all__ = ["generate", "decode_loop", "DECODERS", "register", "Decoder", "DecodeState", "DecodeStats",
           "EarlyExitDecoder", "SpeculativeDecoder", "SpeculativeState", "NGramDrafts", "StepCosts", "Acceptance",
           "ShortMajorityDecoder", "Vote", "VotedGeneration", "fork_prefill", "HogwildDecoder", "HogwildGeneration"]
