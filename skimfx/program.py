"""The IR that passes write and the runtime reads.

A ``Program`` starts as one ``torch.fx.GraphModule`` captured from a Hugging Face model (see
``capture.py``). Passes rewrite it: ``lower_attention`` replaces every SDPA with a call to
``cached_attention`` (below), ``split_layers`` cuts the graph into stages (prologue | layer 0 … L-1 |
epilogue) and records the values that cross stage boundaries, with their token axis.

The runtime executes the stages in order with an explicit ``ctx`` argument (KV cache, positions,
stats). Nothing in this module runs a model or knows a cache: ``cached_attention`` only forwards to
``ctx.attend``, which the runtime implements.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx


# ----------------------------------------------------------------------------------------------
# The lowered attention op
# ----------------------------------------------------------------------------------------------
# Both calls hand control to the runtime's ``ctx`` (cache writes, eviction, selection). They are plain
# functions, so ``torch.compile`` traces into the ctx it is given: the eager runtime's ``Ctx`` marks its
# methods ``torch.compiler.disable`` (a compiled stage is two graphs with the attention call between),
# while the captured decode step's ctx is a pure tensor function that traces whole.
def cached_attention(ctx: Any, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """Attention of the new tokens against layer ``layer``'s KV cache.

    q: [B, Hq, T, D] (after RoPE / qk-norm), k, v: [B, Hkv, T, D] un-repeated (GQA), for the T new
    tokens. ``ctx.attend`` appends k/v to the cache and returns [B, Hq, T, D]: causal attention over
    everything the cache holds for each sequence, restricted to the last ``window`` positions when
    the layer is a sliding-window layer, with ``softcap * tanh(s / softcap)`` applied to the scores
    when ``softcap`` is set.
    """
    return ctx.attend(layer, q, k, v, scale=scale, window=window, softcap=softcap)


def gather_tokens(x: torch.Tensor, axis: int | None, index: torch.Tensor) -> torch.Tensor:
    """Select tokens ``index [B, K]`` along ``axis`` of ``x`` (batch on dim 0); no-op without an axis.

    The runtime applies it to every token-axis value after a selection; ``fold_selection`` inserts it
    into a layer's graph (the values its attention's output meets after the selection)."""
    if axis is None:
        return x
    B, K = index.shape
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    view = [B] + [1] * (x.dim() - 1)
    view[axis] = K
    shape = list(x.shape)
    shape[axis] = K
    return torch.gather(x, axis, index.view(view).expand(shape))


def select_tokens(ctx: Any, layer: int, q: torch.Tensor) -> torch.Tensor:
    """Token selection after layer ``layer`` (inserted by ``prune_tokens``).

    q: [B, Hq, T, D], the layer's attention queries; the keys are in ``ctx``'s cache. Returns the
    kept token indices [B, K] (sorted); the runtime gathers every token-axis value that later stages
    read with them. During decode (one token) the runtime skips selection stages.
    """
    return ctx.select(layer, q)


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What the passes and the runtime need to know about the captured model."""

    arch: str                      # HF model_type, e.g. "llama", "gemma3_text"
    num_layers: int
    num_heads: int                 # query heads
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int             # the model's context length (max_position_embeddings)
    sliding_window: tuple[int | None, ...]  # per layer; None = full attention
    attn_softcap: float | None     # attention logit softcapping (config), None for most models
    dtype: torch.dtype
    device: torch.device

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LayerAttention:
    """Settings of one lowered attention call, read off the graph."""

    layer: int
    scale: float
    window: int | None
    softcap: float | None


@dataclass(frozen=True)
class BoundaryValue:
    """A value that crosses a stage boundary.

    ``token_axis`` is the dimension that indexes tokens (found from the symbolic shape), or None
    when the value has no token axis (a weight-derived constant, for instance). Pruning gathers
    along it; early exit reroutes by name.
    """

    name: str
    producer: str                  # stage name, or "input"
    token_axis: int | None
    shape: str                     # the symbolic shape, for printing
    dtype: torch.dtype | None


@dataclass(frozen=True)
class Selection:
    """One prefill token-selection point (GemFilter / PromptDistill).

    After layer ``layer``, score the prompt tokens with the last ``window`` queries of that layer
    (``softmax``, head aggregation ``heads``, pooling ``pool`` of ``pool_kernel``; ``scale`` None =
    the layer's attention scale, else this factor on q·k), keep the ``keep`` best (always the last ``keep_last``), sorted.
    ``mode``: "rerun" (GemFilter: run the whole model again on the kept token ids with fresh
    positions) or "continue" (PromptDistill: later layers see only the kept tokens, original
    positions). ``truncate_earlier_kv`` compacts the KV of layers <= ``layer`` to the kept tokens.
    ``granularity`` "sentence" keeps whole sentences (scored by the ``sentence_reduce`` of their
    tokens' scores; sentences of at most ``max_sentence`` tokens) instead of single tokens.
    ``keep``: tokens (int), or a fraction of each prompt's length (float in (0, 1)), at every stage of the
    prompt as it was given (``keep=0.25`` then ``0.1``: a quarter of the prompt, then a tenth).
    """

    layer: int
    keep: int | float
    mode: str = "continue"
    window: int = 1
    softmax: bool = False
    heads: str = "mean"
    pool: str | None = "avg"
    pool_kernel: int = 5
    scale: float | None = None
    keep_last: int = 8
    truncate_earlier_kv: bool = False
    method: str = ""
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64

    def tokens(self, prompt_len: int) -> int:
        """Tokens kept of a prompt of ``prompt_len`` tokens (before any pruning)."""
        if isinstance(self.keep, float):
            return min(prompt_len, max(1, round(self.keep * prompt_len)))
        return self.keep

    def describe_keep(self) -> str:
        return f"{self.keep:.0%}" if isinstance(self.keep, float) else str(self.keep)


@dataclass(frozen=True)
class CachePolicy:
    """The parameters of one layer's KV cache policy (written by ``kv_policy``, executed by the runtime).

    Plain, validated data: each method subclasses this next to its recipe (``recipes/kv.py``) with its
    own fields, and the runtime runs it with the policy class registered under ``method``
    (``runtime/policies/``). ``kind`` is "evict" (the cache physically shrinks to ``budget`` tokens per
    KV head) or "sparse" (the full cache stays; each decode step reads ``budget`` tokens of it).
    ``budget``: tokens (int) or a fraction of the prompt (float in (0, 1)).
    """

    budget: int | float
    method: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def tokens(self, prompt_len: int) -> int:
        """The budget in tokens for a prompt (or cache) of ``prompt_len`` tokens."""
        if isinstance(self.budget, float):
            return max(1, int(round(self.budget * prompt_len)))
        return self.budget

    @property
    def sentence_granular(self) -> bool:
        """Whether the policy needs the prompt's sentences (``granularity="sentence"``)."""
        return getattr(self, "granularity", "token") == "sentence"

    @property
    def reads_selection(self) -> bool:
        """Whether this layer reads the token set another layer selects each step (DELTA's reuse layers)."""
        return False

    def reads_selection_of(self, layer: int, policies: dict[int, "CachePolicy"]) -> int | None:
        """The layer whose per-step selection this layer reads (DELTA's reuse layers), or None."""
        return None

    def fill_conflict(self) -> str | None:
        """Why this layer cannot cache a token that exited early below it (CALM's k/v propagation writes it
        with no query at this layer), or None when it can."""
        return None

    def details(self) -> list[str]:
        """Method-specific parts of ``describe`` (window, sinks, pages, ...)."""
        return []

    def describe(self) -> str:
        b = f"{self.budget:.0%}" if isinstance(self.budget, float) else str(self.budget)
        return ", ".join([f"{self.method}: {'keep' if self.kind == 'evict' else 'read'} {b}"] + self.details())


@dataclass(frozen=True)
class DecodeConfig:
    """How ``generate`` decodes when it does not run one full-model step per token (plain data; the
    runtime's ``decoding`` package turns it into a loop, looked up by ``mode``)."""

    mode: ClassVar[str] = ""


@dataclass(frozen=True)
class EarlyExitConfig(DecodeConfig):
    """CALM-style early exit (lossy): exit at the first (layer, threshold) whose top-1 probability
    reaches the threshold; ascending layers."""

    thresholds: tuple[tuple[int, float], ...]
    mode: ClassVar[str] = "early_exit"

    def __str__(self) -> str:
        return "early exit (lossy): " + ", ".join(f"layer {l} if p >= {t:.3g}" for l, t in self.thresholds)


@dataclass(frozen=True)
class SpeculativeConfig(DecodeConfig):
    """Lossless self-speculation: draft with ``sources`` (tried in order: "lookahead", "exit", "skip"),
    verify with the full model. ``adaptive``: the number of drafts follows measured step times and
    acceptance; a source whose expected rate is below plain decoding's x ``min_gain`` is passed over
    and retried after ``retry_after`` idle steps. ``ngram``: (min n, max n) of the n-gram drafts;
    ``skip_layers``: the layers a "skip" draft leaves out; ``prior``: the starting acceptance per source.
    ``batched``: several prompts with n-gram drafts only are verified together, one pass per step for the
    whole batch (ragged drafts, per-sequence rollback); otherwise prompt by prompt. ``reflow_with``: a tokenizer
    that re-tokenizes the prompt's text with its hard-wrapped lines joined, a second source of n-gram drafts
    (``runtime.decoding.drafts.join_wrapped_lines``); None: drafts from the prompt and the text so far only."""

    sources: tuple[str, ...]
    draft_tokens: int = 8
    exit_layer: int | None = None
    adaptive: bool = True
    min_gain: float = 1.0
    retry_after: int = 16
    ngram: tuple[int, int] = (2, 4)
    skip_layers: tuple[int, ...] = ()
    prior: tuple[tuple[str, float], ...] = (("lookahead", 0.7), ("exit", 0.5), ("skip", 0.5))
    batched: bool = True
    reflow_with: Any = field(default=None, compare=False)
    mode: ClassVar[str] = "speculative"

    def __str__(self) -> str:
        where = {"exit": f" (layer {self.exit_layer})", "skip": f" (skipping layers {list(self.skip_layers)})"}
        src = " then ".join(s + where.get(s, "") for s in self.sources)
        return (f"self-speculative (lossless): drafts from {src}, up to {self.draft_tokens} tokens"
                + (", adaptive" if self.adaptive else ""))


@dataclass(frozen=True)
class ShortMajorityConfig(DecodeConfig):
    """short-m@k (Hassid et al. 2025): sample ``k`` answers of each prompt in one batch that shares the
    prompt's prefill, stop when ``m`` have finished, return the majority answer among those ``m`` (ties: the
    shortest answer). ``m == k`` is plain majority voting over all k. ``answer(tokens) -> str | None`` reads
    the answer from a generation's tokens (``answer_name`` says which rule, for printing)."""

    k: int
    m: int
    answer: Any = None
    answer_name: str = ""
    mode: ClassVar[str] = "short_mk"

    def __str__(self) -> str:
        rule = "majority@" + str(self.k) if self.m == self.k else f"short-{self.m}@{self.k}"
        return (f"{rule}: {self.k} sampled answers sharing one prefill, the first {self.m} to finish vote "
                f"(answer: {self.answer_name or 'custom'}; ties: the shortest)")


@dataclass(frozen=True)
class HogwildConfig(DecodeConfig):
    """Hogwild! inference (Rodionov et al. 2025): ``workers`` generate in parallel over one shared KV cache,
    each seeing the prompt, the other workers' blocks and its own block last; ``headers[w]``: the token ids
    that open worker w's block."""

    workers: int
    headers: tuple[tuple[int, ...], ...] = ()
    mode: ClassVar[str] = "hogwild"

    def __str__(self) -> str:
        return (f"Hogwild!: {self.workers} workers over one shared KV cache (each sees the others' tokens; its own "
                "block last, keys re-rotated by RoPE)")


@dataclass
class Stage:
    """One executable piece of the Program: ``module(ctx, *inputs) -> tuple(outputs)``."""

    name: str                      # "prologue", "layer.7", "epilogue"
    kind: str                      # "prologue" | "layer" | "select" | "epilogue"
    layer: int | None
    module: fx.GraphModule
    inputs: list[str]              # boundary value names, in placeholder order (after ctx)
    outputs: list[str]
    # select stages only (``fold_selection``): the selection layer's graph with this selection run right
    # after the layer's attention, so the rest of the layer (output projection, MLP) runs on the kept
    # tokens; it reads the layer stage's inputs and returns the layer's outputs + the index (GemFilter:
    # the index alone). ``folded_gathered``: those outputs that it already returns gathered.
    folded: fx.GraphModule | None = None
    folded_gathered: tuple[str, ...] = ()


@dataclass
class Program:
    """The captured model and everything passes have decided about it."""

    graph_module: fx.GraphModule   # the whole graph (before split_layers; kept after it for show)
    info: ModelInfo
    input_names: tuple[str, ...] = ("input_ids", "position_ids")
    token_symbol: Any = None       # sympy symbol of the token axis
    attention: dict[int, LayerAttention] = field(default_factory=dict)
    stages: list[Stage] | None = None
    values: dict[str, BoundaryValue] = field(default_factory=dict)
    history: list[tuple[str, int]] = field(default_factory=list)  # (pass name, rewrites)
    selections: dict[int, Selection] = field(default_factory=dict)  # by layer, from prune_tokens
    policies: dict[int, CachePolicy] = field(default_factory=dict)  # by layer, from kv_policy (absent = full)
    sentence_ends: torch.Tensor | None = None   # [vocab] bool, for sentence-granular selection (from the tokenizer)
    exits: dict[int, Stage] = field(default_factory=dict)    # by layer, from early_exit: hidden -> (top1, p, margin)
    kv_fill: dict[int, Stage] = field(default_factory=dict)  # by layer, from early_exit: hidden -> (k, v)
    decoding: DecodeConfig | None = None   # how generate decodes (early exit, self-speculation); None = one token per step
    pack_weights: bool = False     # lower_linear(pack=True): multi-row CPU linears may keep re-laid-out weight copies

    @property
    def lowered(self) -> bool:
        return len(self.attention) == self.info.num_layers

    def stage(self, name: str) -> Stage:
        for s in self.stages or ():
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}")

    @property
    def layer_stages(self) -> list[Stage]:
        return [s for s in self.stages or () if s.kind == "layer"]

    def hidden_output(self, layer: int) -> str:
        """The name of the residual stream leaving layer ``layer``: the one output of its stage that the
        next layer (or the epilogue, after the last layer) reads."""
        layers = self.layer_stages
        nxt = layers[layer + 1] if layer + 1 < len(layers) else self.stage("epilogue")
        read = [n for n in layers[layer].outputs if n in nxt.inputs]
        if len(read) != 1:
            raise ValueError(f"layer {layer} passes {read} to the next stage, not one residual stream")
        return read[0]

    def hidden_input(self, layer: int) -> str:
        """The name of the residual stream entering layer ``layer`` (for layer 0: the prologue output
        shaped like the layers' residual stream)."""
        if layer > 0:
            return self.hidden_output(layer - 1)
        shape = self.values[self.hidden_output(0)].shape
        first = self.layer_stages[0]
        same = [n for n in first.inputs if n in self.values and self.values[n].shape == shape]
        if not same:
            raise ValueError(f"layer 0 reads {first.inputs}; none is shaped like the residual stream {shape}")
        return same[0]

    def __str__(self) -> str:
        i = self.info
        lines = [
            f"Program({i.arch}: {i.num_layers} layers, {i.num_heads} q / {i.num_kv_heads} kv heads, "
            f"head dim {i.head_dim}, hidden {i.hidden_size}, vocab {i.vocab_size}, "
            f"{i.dtype}, {i.device})",
            "passes: " + (", ".join(f"{n} ({c} rewrites)" for n, c in self.history) or "none"),
        ]
        if self.stages is None:
            n_nodes = sum(1 for n in self.graph_module.graph.nodes if n.op == "call_function")
            lines.append(f"one graph, {n_nodes} ops (not split into stages)")
        else:
            for s in self.stages:
                n_ops = sum(1 for n in s.module.graph.nodes if n.op == "call_function")
                head = f"  {s.name:<10} {n_ops:>4} ops"
                if s.kind == "select":
                    sel = self.selections[s.layer]
                    head += (f"   {sel.method or sel.mode}: keep {sel.describe_keep()} (last {sel.keep_last} always), "
                             f"{sel.window} quer{'y' if sel.window == 1 else 'ies'}, heads {sel.heads}, "
                             f"pool {sel.pool or 'none'}" + (", truncate earlier KV" if sel.truncate_earlier_kv else "")
                             + (f", whole sentences ({sel.sentence_reduce})" if sel.granularity == "sentence" else ""))
                elif s.layer is not None and s.layer in self.attention:
                    a = self.attention[s.layer]
                    win = f"window {a.window}" if a.window else "full"
                    cap = f", softcap {a.softcap}" if a.softcap else ""
                    head += f"   attention: scale {a.scale:g}, {win}{cap}"
                    if s.layer in self.policies:
                        head += f"; KV {self.policies[s.layer].describe()}"
                lines.append(head)
                lines.append("      in:  " + ", ".join(self._fmt_value(v) for v in s.inputs))
                lines.append("      out: " + ", ".join(self._fmt_value(v) for v in s.outputs))
                if s.layer in self.exits:
                    ex = self.exits[s.layer]
                    n_ops = sum(1 for n in ex.module.graph.nodes if n.op in ("call_function", "call_module"))
                    adapter = getattr(ex.module, "exit_adapter", None)
                    lines.append(f"  {ex.name:<10} {n_ops:>4} ops   exit branch: final norm"
                                 + (f" after {adapter}" if adapter is not None else "")
                                 + " + LM head -> (top-1, probability, margin)")
            if self.kv_fill:
                lines.append(f"  kv fill: layers {min(self.kv_fill)}-{max(self.kv_fill)} (k/v only, for the layers "
                             "an exited token skips)")
            if self.decoding is not None:
                lines.append(f"decoding: {self.decoding}")
        return "\n".join(lines)

    def _fmt_value(self, name: str) -> str:
        v = self.values.get(name)
        if v is None:
            return name
        axis = f" tok@{v.token_axis}" if v.token_axis is not None else ""
        return f"{name}{v.shape}{axis}"
