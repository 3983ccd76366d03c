"""kv_policy: give layers a KV cache policy (evict: SnapKV, StreamingLLM, H2O; sparse read: Quest, DELTA,
SentenceKV).

Why: at decode, every step reads the whole KV cache of every layer; at long context that read, not
the weights, is what grows. Most of the cache receives almost no attention, so a layer can keep
(evict) or read (sparse) a small budget of it.

What it does: records ``program.policies[layer] = CachePolicy(...)`` for each given layer (one
rewrite per layer). The layer graphs do not change: their lowered attention already calls
``ctx.attend(layer, ...)``, and the runtime applies the layer's policy there (writes, compaction,
page metadata, the sparse read). The pass checks what it can prove from the Program:
- the layer exists and is lowered; sliding-window layers are refused (their window already bounds the
  read, and window masking needs slot = position, which eviction breaks);
- a DELTA "reuse" layer has its "select" layer below it, and no token-pruning stage between them
  changes which tokens the two layers hold (the reuse layer reads the select layer's slot numbers);
- the Program's decoding mode, when it has one, can run over the policies (``decoding_conflict``: early exit
  over a policy that cannot cache a token without a query at its layer).
Requires ``lower_attention`` and ``split_layers``; can run before or after ``prune_tokens`` and
``decode_with``.
"""
from __future__ import annotations

from ..program import CachePolicy, EarlyExitConfig, Program, SpeculativeConfig


class PolicyError(ValueError):
    """A cache policy does not fit the model or the other passes."""


def decoding_conflict(program: Program) -> str | None:
    """Why ``program.decoding`` cannot run over ``program.policies``, or None when it can.

    - Self-speculation runs over every policy: a verification gives each draft token what its own decode
      step would read (token by token where decode evicts), and a rollback restores the policy's state.
    - Early exit writes the k/v of a token that exited below a layer without a query at that layer: each
      policy above the lowest exit caches such a token through its own write path (``fill_conflict`` says
      which cannot).
    """
    config, policies = program.decoding, program.policies
    if config is None or not policies:
        return None
    if isinstance(config, EarlyExitConfig):
        lowest = min(layer for layer, _ in config.thresholds)
        for layer, pol in sorted(policies.items()):
            why = pol.fill_conflict() if layer > lowest else None
            if why is not None:
                return (f"layer {layer} lies above the lowest exit ({lowest}), so it caches tokens that exited below "
                        f"it: {why}")
        return None
    if isinstance(config, SpeculativeConfig):
        return None
    return f"{config} needs the full KV cache of every layer"


def check_policies(program: Program) -> None:
    """The invariants between policies and token selections (called by kv_policy and prune_tokens)."""
    pols = program.policies
    for layer in sorted(pols):
        pol = pols[layer]
        sel_layer = pol.reads_selection_of(layer, pols)
        if sel_layer is None:
            if pol.reads_selection:
                raise PolicyError(f"layer {layer}: a {pol.method} layer that reads another layer's selection needs "
                                  "a selecting layer below it")
            continue
        for r, sel in program.selections.items():
            if sel.mode == "continue" and sel_layer <= r < layer and not sel.truncate_earlier_kv:
                raise PolicyError(
                    f"DELTA: token pruning after layer {r} lies between select layer {sel_layer} and reuse layer "
                    f"{layer}, so they hold different tokens; put a select layer after layer {r}, use "
                    "truncate_earlier_kv=true, or list the pruning recipe before delta (its default layout then "
                    "adds a select layer above the pruning)")


def kv_policy(program: Program, policies: dict[int, CachePolicy]) -> Program:
    if program.stages is None or not program.lowered:
        raise PolicyError("kv_policy needs a lowered, split Program (run lower_attention and split_layers first)")
    L = program.info.num_layers
    if not policies:
        raise PolicyError("no layers given a cache policy")
    for layer, pol in sorted(policies.items()):
        if not 0 <= layer < L:
            raise PolicyError(f"layer {layer} is out of range: valid layers are 0..{L - 1}")
        if not isinstance(pol, CachePolicy) or not pol.method or pol.kind not in ("evict", "sparse"):
            raise PolicyError(f"layer {layer}: {pol!r} is not a CachePolicy with a method name and a kind "
                              "('evict' or 'sparse')")
        if program.attention[layer].window is not None:
            raise PolicyError(f"layer {layer} is a sliding-window layer (window {program.attention[layer].window}); "
                              "cache policies apply to full-attention layers only")
        if layer in program.policies:
            raise PolicyError(f"layer {layer} already has a cache policy ({program.policies[layer].method}); "
                              "give each layer one policy")
        program.policies[layer] = pol
    check_policies(program)
    why = decoding_conflict(program)
    if why is not None:
        raise PolicyError(f"{program.decoding} cannot run over this cache policy: {why}")
    program.history.append(("kv_policy", len(policies)))
    return program
