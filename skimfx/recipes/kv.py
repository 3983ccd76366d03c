"""KV cache policy recipes and the per-layer parameters they give the ``kv_policy`` pass.

Each method has two small classes here: its per-layer parameters (a ``CachePolicy`` subclass: plain,
validated data in the Program, executed by the runtime policy registered under the same ``method`` in
``runtime/policies/``) and its recipe (which layers, which budgets). Evicting: SnapKV / PyramidKV,
StreamingLLM, H2O, TOVA (SnapKV, H2O and TOVA also at sentence or ChunkKV chunk granularity), Knorm,
KeyDiff, KVzip. Sparse reads: Quest, DELTA, SentenceKV.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..passes.kv_policy import kv_policy
from ..program import CachePolicy, ModelInfo
from .base import Recipe, RecipeError, amount_ok, bind_pass, layers_ok, positive, sentence_fields, sentence_ok


# ----------------------------------------------------------------------------------------------
# per-layer parameters (the Program's ``policies[layer]``)
# ----------------------------------------------------------------------------------------------
def _sentence_details(p) -> list[str]:
    if p.granularity == "chunk":
        return [f"whole chunks of {p.chunk} ({p.sentence_reduce})"]
    return [f"whole sentences ({p.sentence_reduce})"] if p.granularity == "sentence" else []


@dataclass(frozen=True)
class SnapKVPolicy(CachePolicy):
    """SnapKV: ``window`` observation queries score the prompt (avg-pool ``pool_kernel``); the window is kept."""

    window: int = 32
    pool_kernel: int = 5
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    chunk: int = 10
    method = "snapkv"
    kind = "evict"

    def details(self):
        return ([f"window {self.window}"] + ([f"pool {self.pool_kernel}"] if self.pool_kernel > 1 else [])
                + _sentence_details(self))


@dataclass(frozen=True)
class StreamingLLMPolicy(CachePolicy):
    """StreamingLLM: the first ``sinks`` tokens and the newest; ``decode_evict`` keeps it at the budget."""

    sinks: int = 4
    decode_evict: bool = True
    method = "streamingllm"
    kind = "evict"

    def details(self):
        return ([f"{self.sinks} sinks"] if self.sinks else []) + (["evicts during decode"] if self.decode_evict else [])


@dataclass(frozen=True)
class H2OPolicy(CachePolicy):
    """H2O: accumulated attention per key; the heavy hitters plus ``recent`` newest; evicts during decode."""

    recent: int | float = 0
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    chunk: int = 10
    decode_evict = True
    method = "h2o"
    kind = "evict"

    def details(self):
        return [f"recent {self.recent}", "evicts during decode"] + _sentence_details(self)


@dataclass(frozen=True)
class TOVAPolicy(CachePolicy):
    """TOVA: the current query's attention (mean over all heads) ranks the tokens; with ``decode_evict``
    the lowest is dropped at every step once the layer holds its budget."""

    decode_evict: bool = True
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    chunk: int = 10
    method = "tova"
    kind = "evict"

    def details(self):
        return (["evicts during decode"] if self.decode_evict else []) + _sentence_details(self)

    def fill_conflict(self):
        if self.decode_evict:
            return ("TOVA evicts the token that the current query attends to least; a token that exited below this "
                    "layer has no query here to choose one (evict_during_decode=false compresses the prompt only)")
        return None


@dataclass(frozen=True)
class QuestPolicy(CachePolicy):
    """Quest: per page of ``page_size`` keys the channel min/max; decode reads the top pages."""

    page_size: int = 16
    method = "quest"
    kind = "sparse"

    def details(self):
        return [f"pages of {self.page_size}"]


@dataclass(frozen=True)
class DeltaPolicy(CachePolicy):
    """DELTA: a "select" layer reads everything and chooses the token set; "reuse" layers read that set
    (plus the ``recent`` newest)."""

    recent: int = 32
    role: str = "reuse"
    method = "delta"
    kind = "sparse"

    @property
    def reads_selection(self):
        return self.role == "reuse"

    def reads_selection_of(self, layer, policies):
        if self.role != "reuse":
            return None
        below = [l for l, p in policies.items() if l < layer and isinstance(p, DeltaPolicy) and p.role == "select"]
        return max(below) if below else None

    def details(self):
        return [f"recent {self.recent}", self.role]


@dataclass(frozen=True)
class SentenceKVPolicy(CachePolicy):
    """SentenceKV: sentence means resident (with ``sinks`` / ``recent`` tokens); decode reads whole sentences;
    ``offload`` keeps the prompt's token KV on the host."""

    sinks: int = 4
    recent: int = 16
    max_sentence: int = 64
    offload: bool = True
    granularity = "sentence"
    method = "sentencekv"
    kind = "sparse"

    def details(self):
        return ([f"{self.sinks} sinks"] if self.sinks else []) + [f"recent {self.recent}",
                "sentences by query-centroid similarity"] + (["prompt KV offloaded to host"] if self.offload else [])


# ----------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------
def _units_ok(r) -> None:
    """The KV selectors' ``granularity``: "token", "sentence" (``base.sentence_ok``) or "chunk" (ChunkKV,
    Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache Compression"): the prompt is cut into runs of
    ``chunk`` tokens and each KV head keeps whole chunks by the max (or mean, ``sentence_reduce``; ChunkKV
    uses the mean) of their tokens' scores, best first while they fit, topped up with the best single
    tokens to the budget. No tokenizer needed."""
    sentence_ok(r, ("token", "sentence", "chunk"))
    positive("chunk", r.chunk)


def _unit_fields(r) -> dict:
    return dict(sentence_fields(r), chunk=r.chunk)


def _policy_layers(info: ModelInfo, layers: tuple[int, ...] | None, skip: int = 0) -> list[int]:
    """The layers a policy applies to: the given ones, or every full-attention layer from ``skip`` on
    (sliding-window layers already read a bounded window)."""
    if layers is not None:
        return list(layers)
    return [l for l in range(skip, info.num_layers) if info.sliding_window[l] is None]


def pyramid_budgets(budget: int | float, n: int, floor: int | float, beta: int = 20) -> list:
    """PyramidKV (Cai et al., 2024) per-layer budgets: an arithmetic ramp from the lowest layer (largest)
    to the highest (smallest) whose mean is ``budget``; ``floor`` (the always-kept tokens) is added to
    every layer and the top layer keeps ``(budget - floor) / beta`` more."""
    if n == 1:
        return [budget]
    free = budget - floor
    lo = free / beta
    hi = 2 * free - lo
    out = [floor + hi - i * (hi - lo) / (n - 1) for i in range(n)]
    return [max(1, int(round(b))) for b in out] if isinstance(budget, int) else [min(0.999, b) for b in out]


@dataclass(frozen=True)
class KVRecipe(Recipe):
    """Shared by the cache-policy recipes: which layers, and PyramidKV budgets."""

    def _policies(self, info: ModelInfo, make, floor, skip: int = 0) -> dict[int, CachePolicy]:
        layers = _policy_layers(info, getattr(self, "layers", None), skip)
        budgets = (pyramid_budgets(self.budget_total, len(layers), floor) if getattr(self, "pyramid", False)
                   else [self.budget_total] * len(layers))
        return {l: make(b) for l, b in zip(layers, budgets)}

    def passes(self, info: ModelInfo) -> list:
        # the policies are made now (bad parameters fail at compile) and again at the pass if a recipe
        # before this one truncated the model (Truncate): "every layer" then means every layer that is left
        return [bind_pass(_recipe_kv_policy, "kv_policy", recipe=self, policies=self.policies(info), info=info)]


def _recipe_kv_policy(program, recipe: KVRecipe, policies: dict, info: ModelInfo):
    if program.info.num_layers != info.num_layers:
        policies = recipe.policies(program.info)
    return kv_policy(program, policies)


@dataclass(frozen=True)
class SnapKV(KVRecipe):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): after
    prefill, each KV head keeps the ``budget`` prompt tokens that the last ``window`` queries attend to
    most (softmax attention summed over the window, mean over the GQA group, avg-pool ``pool_kernel``),
    the window itself always. ``pyramid``: PyramidKV per-layer budgets with the same total.
    ``granularity="sentence"``: each KV head keeps whole prompt sentences by their tokens' scores (see
    ``base.sentence_ok``), topped up with the best single tokens so that every head keeps the budget;
    ``granularity="chunk"``: the same with runs of ``chunk`` tokens (ChunkKV, see ``_units_ok``)."""

    budget: int | float
    window: int = 32
    pool_kernel: int = 5
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    chunk: int = 10
    name = "snapkv"

    def __post_init__(self):
        amount_ok("budget", self.budget)
        _units_ok(self)
        positive("window", self.window)
        if isinstance(self.budget, int) and self.window >= self.budget:
            raise RecipeError(f"window ({self.window}) must be smaller than budget ({self.budget})")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise RecipeError(f"pool_kernel must be odd and >= 1, got {self.pool_kernel}")
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        floor = self.window if isinstance(self.budget, int) else 0.0
        return self._policies(info, lambda b: SnapKVPolicy(b, window=self.window, pool_kernel=self.pool_kernel,
                                                           **_unit_fields(self)),
                              floor)


@dataclass(frozen=True)
class StreamingLLM(KVRecipe):
    """StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"): keep
    the first ``sinks`` tokens and the ``recent`` newest; during decode the oldest non-sink token is
    evicted for each new one, so the cache stays at sinks + recent (``evict_during_decode=False``:
    compress the prompt only and let decode append, as kvpress's StreamingLLMPress does)."""

    recent: int | float
    sinks: int = 4
    evict_during_decode: bool = True
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    name = "streamingllm"

    def __post_init__(self):
        amount_ok("recent", self.recent)
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise RecipeError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.recent + self.sinks if isinstance(self.recent, int) else self.recent

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        floor = self.sinks if isinstance(self.recent, int) else 0.0
        return self._policies(info, lambda b: StreamingLLMPolicy(b, sinks=self.sinks,
                                                                 decode_evict=self.evict_during_decode), floor)


@dataclass(frozen=True)
class H2O(KVRecipe):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle"): every key's attention received from all
    queries so far is accumulated; each KV head keeps the ``heavy`` highest-scoring tokens plus the
    ``recent`` newest, after prefill and at every decode step (the lowest non-recent token is evicted
    for each new one). ``granularity="sentence"``: the prefill compression keeps whole prompt sentences
    by their tokens' accumulated scores (topped up with single tokens to the budget); ``"chunk"``: runs
    of ``chunk`` tokens instead (ChunkKV, see ``_units_ok``); decode-time eviction stays per token."""

    heavy: int | float
    recent: int | float
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    chunk: int = 10
    name = "h2o"

    def __post_init__(self):
        amount_ok("heavy", self.heavy)
        _units_ok(self)
        amount_ok("recent", self.recent)
        if type(self.heavy) is not type(self.recent):
            raise RecipeError(f"heavy and recent must both be token counts or both fractions, got "
                              f"{self.heavy!r} and {self.recent!r}")
        if isinstance(self.heavy, float) and self.heavy + self.recent >= 1.0:
            raise RecipeError(f"heavy + recent must be a fraction below 1, got {self.heavy + self.recent}")
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.heavy + self.recent

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        return self._policies(info, lambda b: H2OPolicy(b, recent=self.recent, **_unit_fields(self)), self.recent)


@dataclass(frozen=True)
class Quest(KVRecipe):
    """Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"):
    the full cache stays; per page of ``page_size`` keys the channel-wise min/max is kept up to date,
    and each decode step reads the top pages by the bound Σ_i max(q_i·min_i, q_i·max_i), about
    ``token_budget`` tokens (the newest page always). The first ``dense_layers`` layers read everything."""

    token_budget: int | float
    page_size: int = 16
    dense_layers: int = 2
    name = "quest"

    def __post_init__(self):
        amount_ok("token_budget", self.token_budget)
        positive("page_size", self.page_size)
        if isinstance(self.token_budget, int) and self.token_budget < self.page_size:
            raise RecipeError(f"token_budget ({self.token_budget}) must be at least one page ({self.page_size})")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise RecipeError(f"dense_layers must be an integer >= 0, got {self.dense_layers!r}")

    @property
    def budget_total(self):
        return self.token_budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        if self.dense_layers >= info.num_layers:
            raise RecipeError(f"dense_layers={self.dense_layers} leaves no layer of this {info.num_layers}-layer "
                              "model to read sparsely")
        return self._policies(info, lambda b: QuestPolicy(b, page_size=self.page_size),
                              0, skip=self.dense_layers)


@dataclass(frozen=True)
class Delta(KVRecipe):
    """DELTA (dynamic layer-aware token attention): layers below ``full_layers`` attend densely; each
    layer in ``selection_layers`` attends densely and re-selects the ``budget`` tokens with the highest
    attention from the new query summed over all heads; the layers above it (until the next selection
    layer) read only that set plus the ``recent`` newest tokens. The full cache stays. Default
    selection layers: ``full_layers``, L/3 and 2L/3 (for a 30-layer model: layers 0-1 full, selection at
    2, 10 and 20, so 5 of 30 layers read the whole cache), plus the first full-attention layer after each
    PromptDistill selection listed before this recipe (the layers above a pruning stage hold other tokens
    than those below it, so they need a set of their own)."""

    budget: int | float
    full_layers: int = 2
    selection_layers: tuple[int, ...] | int | None = None
    recent: int = 32
    name = "delta"

    def __post_init__(self):
        amount_ok("budget", self.budget)
        if not isinstance(self.full_layers, int) or self.full_layers < 0:
            raise RecipeError(f"full_layers must be an integer >= 0, got {self.full_layers!r}")
        positive("recent", self.recent)
        sl = layers_ok(self.selection_layers)
        if sl is not None:
            if list(sl) != sorted(set(sl)):
                raise RecipeError(f"selection_layers must be strictly increasing, got {list(sl)}")
            if sl[0] < self.full_layers:
                raise RecipeError(f"selection layers must be >= full_layers ({self.full_layers}), got {list(sl)}")
        object.__setattr__(self, "selection_layers", sl)

    def passes(self, info: ModelInfo) -> list:
        if self.selection_layers is not None:
            return super().passes(info)
        return [bind_pass(_delta_after_pruning, "kv_policy", recipe=self)]

    def policies(self, info: ModelInfo, pruned: tuple[int, ...] = ()) -> dict[int, CachePolicy]:
        """``pruned``: layers after which token pruning continues on fewer tokens (default layout only)."""
        L = info.num_layers
        sel = self.selection_layers or (self.full_layers, max(self.full_layers, L // 3),
                                        max(self.full_layers, 2 * L // 3))
        for r in pruned if self.selection_layers is None else ():
            above = [l for l in range(max(r + 1, self.full_layers), L - 1) if info.sliding_window[l] is None]
            if above and r + 1 > min(sel):
                sel = sel + (above[0],)
        sel = tuple(sorted(set(sel)))
        if sel[-1] >= L - 1:
            raise RecipeError(f"selection layer {sel[-1]} leaves no layer above it to read the selection "
                              f"(valid: {self.full_layers}..{L - 2} for this {L}-layer model)")
        out = {}
        for layer in range(sel[0], L):
            if info.sliding_window[layer] is not None:
                continue
            role = "select" if layer in sel else "reuse"
            out[layer] = DeltaPolicy(self.budget, recent=self.recent, role=role)
        return out


def _delta_after_pruning(program, recipe: Delta):
    """kv_policy with DELTA's default layout, given the pruning stages already in ``program``."""
    pruned = tuple(r for r, s in sorted(program.selections.items()) if s.mode == "continue" and not s.truncate_earlier_kv)
    return kv_policy(program, recipe.policies(program.info, pruned))


@dataclass(frozen=True)
class SentenceKV(KVRecipe):
    """SentenceKV (sentence-level semantic KV caching): after prefill, each prompt sentence is summarised
    per KV head by its mean key (kept on the device); with ``offload`` the prompt's token KV moves to
    host memory (pinned when the cache is on a GPU) and only the first ``sinks`` and the last ``recent``
    prompt tokens stay on the device. Each decode step scores the sentences by the new query (summed over
    the GQA group) against their mean keys and attends to the best whole sentences up to ``budget``
    prompt tokens in all (sinks and recent included), plus every generated token. ``offload=False``
    keeps the cache on the device and reads the same set sparsely. Needs the tokenizer at compile
    time; sentences are cut at ``max_sentence`` tokens."""

    budget: int | float
    offload: bool = True
    sinks: int = 4
    recent: int = 16
    max_sentence: int = 64
    layers: tuple[int, ...] | int | None = None
    name = "sentencekv"

    def __post_init__(self):
        amount_ok("budget", self.budget)
        for name in ("sinks", "recent"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RecipeError(f"{name} must be an integer >= 0, got {v!r}")
        if isinstance(self.budget, int) and self.budget <= self.sinks + self.recent:
            raise RecipeError(f"budget ({self.budget}) must exceed sinks + recent ({self.sinks + self.recent}): "
                              "the budget counts them")
        if not isinstance(self.offload, bool):
            raise RecipeError(f"offload must be true or false, got {self.offload!r}")
        if not isinstance(self.max_sentence, int) or self.max_sentence < 1:
            raise RecipeError(f"max_sentence must be a token count >= 1, got {self.max_sentence!r}")
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        return self._policies(info, lambda b: SentenceKVPolicy(b, sinks=self.sinks, recent=self.recent,
                                                               max_sentence=self.max_sentence, offload=self.offload),
                              0)


@dataclass(frozen=True)
class TOVA(KVRecipe):
    """TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): the tokens the current query attends
    to most (softmax attention averaged over all query heads, so every KV head keeps the same tokens)
    stay. After prefill the last prompt query keeps the ``budget`` best prompt tokens (the last one
    always, as kvpress's TOVAPress); with ``evict_during_decode`` each new token is attended to with the
    others and the lowest-scoring token is then dropped, so the layer stays at its budget (TOVA's rule).
    ``granularity="sentence"``: the prefill compression keeps whole sentences (see ``base.sentence_ok``),
    ``"chunk"``: runs of ``chunk`` tokens (ChunkKV, see ``_units_ok``); decode-time eviction stays per
    token. ``pyramid``: PyramidKV per-layer budgets."""

    budget: int | float
    evict_during_decode: bool = True
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    granularity: str = "token"
    sentence_reduce: str = "max"
    max_sentence: int = 64
    chunk: int = 10
    name = "tova"

    def __post_init__(self):
        amount_ok("budget", self.budget)
        _units_ok(self)
        if not isinstance(self.evict_during_decode, bool):
            raise RecipeError(f"evict_during_decode must be true or false, got {self.evict_during_decode!r}")
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        return self._policies(info, lambda b: TOVAPolicy(b, decode_evict=self.evict_during_decode,
                                                         **_unit_fields(self)), 1 if isinstance(self.budget, int)
                              else 0.0)


# ----------------------------------------------------------------------------------------------
# scorers of the cached keys alone: Knorm, KeyDiff
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnormPolicy(CachePolicy):
    """Knorm: each KV head keeps the prompt tokens whose keys have the lowest L2 norm."""

    method = "knorm"
    kind = "evict"

    def details(self):
        return ["lowest key norms"]


@dataclass(frozen=True)
class KeyRuleRecipe(KVRecipe):
    """A policy that keeps, per KV head, the ``budget`` prompt tokens a rule on the cached keys alone ranks
    best (no attention is computed); decode appends to the compacted cache. ``POLICY``: its parameters."""

    budget: int | float
    layers: tuple[int, ...] | int | None = None
    POLICY = None

    def __post_init__(self):
        amount_ok("budget", self.budget)
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        return self._policies(info, self.POLICY, 0)


@dataclass(frozen=True)
class Knorm(KeyRuleRecipe):
    """Knorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): a low key norm goes with high attention, so after prefill each KV head keeps the
    ``budget`` prompt tokens whose cached (post-RoPE) keys have the lowest L2 norm. No attention is
    computed; decode appends to the compacted cache."""

    name = "knorm"
    POLICY = KnormPolicy


@dataclass(frozen=True)
class KeyDiffPolicy(CachePolicy):
    """KeyDiff: each KV head keeps the prompt tokens whose keys are least similar to the mean key."""

    method = "keydiff"
    kind = "evict"

    def details(self):
        return ["keys least like their head's mean key"]


@dataclass(frozen=True)
class KeyDiff(KeyRuleRecipe):
    """KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
    Inference in Resource-Constrained Environments"): distinctive keys matter. Per KV head the anchor is
    the mean of the prompt's L2-normalised keys; after prefill each KV head keeps the ``budget`` prompt
    tokens whose keys have the lowest cosine similarity to it. The paper applies the rule block by block
    while a prompt streams into a fixed-size cache; here it runs once over the whole prompt (as
    kvpress's KeyDiffPress), and decode appends to the compacted cache."""

    name = "keydiff"
    POLICY = KeyDiffPolicy


# ----------------------------------------------------------------------------------------------
# KVzip: scores from a reconstruction of the prompt
# ----------------------------------------------------------------------------------------------
KVZIP_PROMPT = "\n\nRepeat the previous context exactly."
KVZIP_REPEAT = "\n\nRepeat the part of the previous context exactly, starting with"
KVZIP_SCOPES = ("chunk", "full", "local")


def kvzip_prompt_ids(tokenizer, text: str = KVZIP_PROMPT) -> tuple[int, ...]:
    """The token ids of KVzip's reconstruction instruction in ``tokenizer``'s vocabulary (no special
    tokens), for ``KVzip(prompt_ids=...)``."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def kvzip_template_ids(tokenizer) -> dict[str, tuple[int, ...]]:
    """KVzip's reconstruction prompts in ``tokenizer``'s vocabulary, as its reference code builds them: the
    instructions for the first and the later chunks and, when the tokenizer has a chat template, the
    template's header before a user message (``header_ids``: not reconstructed) and what follows the
    message up to the assistant's answer (``suffix_ids``: between the instruction and the chunk)."""
    out = {"prompt_ids": kvzip_prompt_ids(tokenizer), "repeat_ids": kvzip_prompt_ids(tokenizer, KVZIP_REPEAT),
           "header_ids": (), "suffix_ids": ()}
    if getattr(tokenizer, "chat_template", None):
        marker, sep = "dummy context", "\n" + "#" * len("dummy context")
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker + sep}], add_generation_prompt=True,
                                             tokenize=False)
        before, suffix = text.split(sep)
        header = before.split(marker)[0]
        out["header_ids"] = tuple(tokenizer.encode(header, add_special_tokens=False))
        out["suffix_ids"] = tuple(tokenizer.encode(suffix, add_special_tokens=False))
    return out


@dataclass(frozen=True)
class KVzipPolicy(CachePolicy):
    """KVzip: after prefill the model reconstructs the prompt in chunks of ``chunk`` tokens (after
    ``prompt_ids`` and ``overlap`` preceding tokens); each KV head keeps the pairs that the reconstruction
    attends to most (``scope``: which keys a reconstruction query scores and reads), plus ``sinks``."""

    chunk: int = 2048
    scope: str = "chunk"
    sinks: int = 4
    overlap: int = 8
    prompt_ids: tuple[int, ...] = ()
    repeat_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()
    header_ids: tuple[int, ...] = ()
    method = "kvzip"
    kind = "evict"

    def details(self):
        return ([f"scored by reconstructing the prompt in chunks of {self.chunk} ({self.scope} scope)"]
                + ([f"{self.sinks} sinks"] if self.sinks else []))


@dataclass(frozen=True)
class KVzip(KVRecipe):
    """KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
    Reconstruction"): after prefill the model reconstructs the prompt, teacher-forced, one chunk of
    ``chunk`` tokens per forward over the full cache (each forward: ``prompt_ids``, the ``overlap`` prompt
    tokens before the chunk, the chunk). A cached pair's score is the largest softmax attention it
    receives from the reconstruction queries, over the queries and the query heads of its GQA group; each
    KV head keeps its ``budget`` best (the first ``sinks`` tokens always); the reconstruction's own k/v
    are discarded. Prefill costs about twice as much; decode appends to the compacted cache.

    ``scope``: "chunk" (KVzip's chunked scoring: a chunk's reconstruction scores that chunk's pairs, its
    softmax over the sinks, the chunk and the reconstruction), "full" (every reconstruction query scores
    every pair with the softmax over the whole cache), or "local" (the cheaper variant: as "chunk", and
    the reconstruction also attends only to the sinks, its chunk and itself, so its attention costs
    O(prompt x chunk) instead of O(prompt^2)). The reconstruction prompts, as token ids: ``prompt_ids``
    (the first chunk's instruction, KVzip's "Repeat the previous context exactly."), ``repeat_ids`` (the
    later chunks' instruction, followed by the ``overlap`` tokens before the chunk; empty: ``prompt_ids``),
    ``suffix_ids`` (between the instruction and the chunk: a chat template's end of user turn and start of
    the assistant's) and ``header_ids`` (a chat template's header: a prompt starting with it is
    reconstructed after it, and the header's pairs score 0 but for the sinks). ``skimfx.compile(...,
    tokenizer=tok)`` fills in all four from the tokenizer when none are given (``kvzip_template_ids``, as
    KVzip's reference code and kvpress build them); without a tokenizer and with none given, the chunk
    repeats right after the prompt (after the ``overlap`` tokens that precede it)."""

    budget: int | float
    chunk: int = 2048
    scope: str = "chunk"
    sinks: int = 4
    overlap: int = 8
    prompt_ids: tuple[int, ...] | int = ()
    repeat_ids: tuple[int, ...] | int = ()
    suffix_ids: tuple[int, ...] | int = ()
    header_ids: tuple[int, ...] | int = ()
    layers: tuple[int, ...] | int | None = None
    name = "kvzip"
    TEMPLATE = ("prompt_ids", "repeat_ids", "suffix_ids", "header_ids")     # the reconstruction prompts' fields

    def __post_init__(self):
        amount_ok("budget", self.budget)
        positive("chunk", self.chunk)
        if self.scope not in KVZIP_SCOPES:
            raise RecipeError(f"scope must be {' or '.join(map(repr, KVZIP_SCOPES))}, got {self.scope!r}")
        for name in ("sinks", "overlap"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RecipeError(f"{name} must be an integer >= 0, got {v!r}")
        if isinstance(self.budget, int) and self.budget <= self.sinks:
            raise RecipeError(f"budget ({self.budget}) must exceed sinks ({self.sinks}): the sinks are always kept")
        for name in self.TEMPLATE:
            value = getattr(self, name)
            ids = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(ids, (tuple, list)) or any(not isinstance(t, int) or isinstance(t, bool) or t < 0
                                                         for t in ids):
                raise RecipeError(f"{name} must be token ids (integers >= 0; in a recipe string 1/2/3), e.g. from "
                                  f"skimfx.kvzip_template_ids(tokenizer); got {value!r}")
            object.__setattr__(self, name, tuple(ids))
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def with_tokenizer(self, tokenizer) -> "KVzip":
        """With no reconstruction prompts given, KVzip's (``kvzip_template_ids``) in the tokenizer's vocabulary."""
        if any(getattr(self, name) for name in self.TEMPLATE) or tokenizer is None:
            return self
        return dataclasses.replace(self, **kvzip_template_ids(tokenizer))

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        template = {name: getattr(self, name) for name in self.TEMPLATE}
        for name, ids in template.items():
            outside = [t for t in ids if t >= info.vocab_size]
            if outside:
                raise RecipeError(f"{name} {outside} are outside the model's vocabulary of {info.vocab_size} tokens")
        return self._policies(info, lambda b: KVzipPolicy(b, chunk=self.chunk, scope=self.scope, sinks=self.sinks,
                                                          overlap=self.overlap, **template), 0)


# ----------------------------------------------------------------------------------------------
# Expected Attention: scores from a Gaussian model of the queries to come
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpectedAttentionPolicy(CachePolicy):
    """Expected Attention: each KV head keeps the pairs that the modelled future queries (the prompt queries'
    mean and covariance before RoPE, rotated to the next ``future`` positions) are expected to attend to,
    times the value norm (``vnorm``); ``sinks`` always."""

    future: int = 512
    sinks: int = 4
    covariance: bool = True
    vnorm: bool = True
    method = "expected_attention"
    kind = "evict"

    def details(self):
        return ([f"expected attention of the next {self.future} queries"] + ([f"{self.sinks} sinks"] if self.sinks
                                                                             else []))


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise RecipeError(f"{name} must be true or false, got {value!r}")


def _count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecipeError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class ExpectedAttention(KVRecipe):
    """Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating
    Attention from Future Queries Distribution"; kvpress's ExpectedAttentionPress): the queries to come are
    modelled as Gaussian, with the mean and covariance of the prompt's queries before RoPE (the first
    ``sinks`` left out) rotated by the average RoPE matrix of the next ``future`` positions; a key's
    expected attention is the softmax of ``s mu.k + s^2/2 k^T Sigma k`` (``covariance=false``: the mean
    term only), averaged over its GQA group and multiplied by the value norm (``vnorm``). After prefill each
    KV head keeps its ``budget`` best (the first ``sinks`` always); decode appends. ``pyramid``: PyramidKV
    per-layer budgets."""

    budget: int | float
    future: int = 512
    sinks: int = 4
    covariance: bool = True
    vnorm: bool = True
    pyramid: bool = False
    layers: tuple[int, ...] | int | None = None
    name = "expected_attention"

    def __post_init__(self):
        amount_ok("budget", self.budget)
        positive("future", self.future)
        _count("sinks", self.sinks)
        _flag("covariance", self.covariance)
        _flag("vnorm", self.vnorm)
        if isinstance(self.budget, int) and self.budget <= self.sinks:
            raise RecipeError(f"budget ({self.budget}) must exceed sinks ({self.sinks}): the sinks are always kept")
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def budget_total(self):
        return self.budget

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        floor = self.sinks if isinstance(self.budget, int) else 0.0
        return self._policies(info, lambda b: ExpectedAttentionPolicy(b, future=self.future, sinks=self.sinks,
                                                                      covariance=self.covariance,
                                                                      vnorm=self.vnorm), floor)


# ----------------------------------------------------------------------------------------------
# per-head budgets: AdaKV over any scorer, DuoAttention
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaKVPolicy(CachePolicy):
    """AdaKV: the ``scorer``'s per-head scores choose head budgets that share the layer's ``budget * Hkv``
    pairs (each head keeps at least ``alpha * budget``)."""

    scorer: CachePolicy = None
    alpha: float = 0.2
    share: str = "layer"
    decode_evict = False
    method = "adakv"
    kind = "evict"

    @property
    def sentence_granular(self) -> bool:
        return self.scorer.sentence_granular

    @property
    def max_sentence(self) -> int:
        return self.scorer.max_sentence

    def details(self):
        return [f"head budgets from {self.scorer.describe()}", f"safeguard {self.alpha:g}"] + \
            (["one budget over all its layers"] if self.share == "model" else [])


def _adakv_scorers() -> dict:
    """The evicting recipes AdaKV can take by name (each made with AdaKV's budget and its defaults)."""
    return {"snapkv": SnapKV, "tova": lambda budget: TOVA(budget, evict_during_decode=False), "knorm": Knorm,
            "keydiff": KeyDiff, "expected_attention": ExpectedAttention, "kvzip": KVzip}


@dataclass(frozen=True)
class AdaKV(KVRecipe):
    """AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference"): a wrapper over any evicting scorer. The layer's total budget stays ``budget``
    per KV head, but the heads share it by their scores: per sequence, each head's ``int(alpha * budget)``
    best pairs are kept (the safeguard), then the ``budget * Hkv`` best scores over all heads of the layer.
    Heads keep different counts and the layer holds exactly its total (stored as head groups, the memory
    released). ``scorer``: a name (``snapkv``, ``tova``, ``knorm``, ``keydiff``, ``expected_attention``,
    ``kvzip``: made with ``budget`` and its defaults) or, in Python, a recipe (then ``budget`` comes from it;
    it must not evict during decode). ``share``: "layer" (each layer's heads share its budget) or "model"
    (every covered layer's heads share the sum of the layers' budgets: one score threshold over the model,
    KVzip's own allocation; layers then keep different totals)."""

    budget: int | float | None = None
    scorer: object = "snapkv"
    alpha: float = 0.2
    share: str = "layer"
    layers: tuple[int, ...] | int | None = None
    name = "adakv"

    def __post_init__(self):
        if self.share not in ("layer", "model"):
            raise RecipeError(f"share must be 'layer' (the heads of each layer share its budget) or 'model' (all "
                              f"covered layers share one budget), got {self.share!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise RecipeError(f"alpha (the per-head safeguard, a fraction of the budget) must be in [0, 1], "
                              f"got {self.alpha!r}")
        if isinstance(self.scorer, str):
            makers = _adakv_scorers()
            if self.scorer not in makers:
                raise RecipeError(f"scorer must be one of {', '.join(makers)} (or a recipe object), got "
                                  f"{self.scorer!r}")
            if self.budget is None:
                raise RecipeError("adakv needs a budget (tokens per KV head on average, or a fraction of the prompt)")
            amount_ok("budget", self.budget)
            try:
                self.scorer_recipe
            except RecipeError as e:
                raise RecipeError(f"adakv's scorer {self.scorer}: {e}") from None
        elif isinstance(self.scorer, KVRecipe):
            if type(self.scorer).__name__ == "AdaKV" or not hasattr(self.scorer, "budget_total"):
                raise RecipeError(f"adakv's scorer must be an evicting recipe with a budget, got {self.scorer.name}")
            if getattr(self.scorer, "evict_during_decode", False):
                raise RecipeError(f"adakv's scorer {self.scorer.name} must not evict during decode "
                                  "(evict_during_decode=False): the head budgets are chosen once, after the prompt")
            if getattr(self.scorer, "granularity", "token") != "token":
                raise RecipeError(f"adakv chooses single pairs per head; its scorer must use granularity='token', "
                                  f"got {self.scorer.granularity!r}")
            if self.budget is not None and self.budget != self.scorer.budget_total:
                raise RecipeError(f"adakv's budget ({self.budget}) differs from its scorer's "
                                  f"({self.scorer.budget_total}); give it once")
        else:
            raise RecipeError(f"scorer must be a scorer name or a KV recipe, got {self.scorer!r}")
        object.__setattr__(self, "layers", layers_ok(self.layers))

    @property
    def scorer_recipe(self) -> KVRecipe:
        if isinstance(self.scorer, str):
            return _adakv_scorers()[self.scorer](self.budget)
        return self.scorer

    @property
    def budget_total(self):
        return self.scorer_recipe.budget_total

    def with_tokenizer(self, tokenizer) -> "AdaKV":
        inner = self.scorer_recipe.with_tokenizer(tokenizer)
        return self if inner == self.scorer_recipe else dataclasses.replace(self, scorer=inner, budget=None)

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        inner = self.scorer_recipe
        if self.layers is not None:
            inner = dataclasses.replace(inner, layers=self.layers)
        return {l: AdaKVPolicy(p.budget, scorer=p, alpha=float(self.alpha), share=self.share)
                for l, p in inner.policies(info).items()}


@dataclass(frozen=True)
class DuoPolicy(CachePolicy):
    """DuoAttention: the KV heads in ``streaming`` keep ``sinks`` + ``recent`` prompt tokens, the others all."""

    sinks: int = 64
    recent: int = 256
    streaming: tuple[int, ...] = ()
    decode_evict: bool = True
    method = "duo_attention"
    kind = "evict"

    def details(self):
        return [f"streaming KV heads {list(self.streaming)} keep {self.sinks} sinks + {self.recent} recent"
                + (" (rolling during decode)" if self.decode_evict else ""), "the other heads keep everything"]

    def fill_conflict(self):
        if self.decode_evict and self.streaming:
            return ("the streaming heads roll their window inside the decode step's attention; writing an exited "
                    "token's k/v without it is not implemented (evict_during_decode=false keeps the window fixed)")
        return None


@dataclass(frozen=True)
class DuoAttention(KVRecipe):
    """DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
    Streaming Heads"): retrieval heads keep the full cache, streaming heads keep the first ``sinks`` and the
    ``recent`` newest prompt tokens. ``calibration``: per (layer, KV head) scores of how much each head needs
    the full context (a ``DuoCalibration`` from ``skimfx.calibrate_duo``, a path to its file, or a nested
    list [layer][KV head]); the ``streaming`` fraction of the full-attention layers' KV heads with the
    lowest scores stream (as kvpress's ``head_compression_ratio``). After prefill each layer is stored as
    head groups (full heads, streaming heads), the memory released. ``evict_during_decode`` (the paper's rule):
    the streaming heads keep rolling their window during decode, so their memory stays at sinks + recent;
    false: decode appends to every head (as kvpress, which compresses the prompt only)."""

    calibration: object = None
    streaming: float = 0.5
    sinks: int = 64
    recent: int = 256
    evict_during_decode: bool = True
    name = "duo_attention"
    calibration_kind = "duo"          # ``calibrate.resolve`` loads a path given here as a DuoCalibration

    def __post_init__(self):
        if isinstance(self.streaming, bool) or not isinstance(self.streaming, (int, float)) or \
                not 0 <= self.streaming <= 1:
            raise RecipeError(f"streaming (the fraction of KV heads that stream) must be in [0, 1], got "
                              f"{self.streaming!r}")
        _count("sinks", self.sinks)
        positive("recent", self.recent)
        _flag("evict_during_decode", self.evict_during_decode)
        if self.calibration is None:
            raise RecipeError("duo_attention needs head scores: calibration=skimfx.calibrate_duo(model, tokenizer=tok) "
                              "(or the path of its saved file)")

    def head_scores(self) -> list[list[float]]:
        s = getattr(self.calibration, "scores", self.calibration)
        if isinstance(s, str):
            raise RecipeError(f"duo_attention: calibration {s!r} is a path that was not loaded; compile with "
                              "skimfx.compile (which loads it) or pass DuoCalibration.load(path)")
        try:
            rows = [[float(x) for x in row] for row in (s.tolist() if hasattr(s, "tolist") else s)]
        except (TypeError, ValueError):
            raise RecipeError("duo_attention: calibration must hold head scores [layer][KV head]") from None
        return rows

    def policies(self, info: ModelInfo) -> dict[int, CachePolicy]:
        scores = self.head_scores()
        if len(scores) != info.num_layers or any(len(r) != info.num_kv_heads for r in scores):
            raise RecipeError(f"duo_attention: the head scores are {len(scores)} x {len(scores[0]) if scores else 0}, "
                              f"this model has {info.num_layers} layers x {info.num_kv_heads} KV heads; calibrate "
                              "on this model")
        heads = [(s, l, h) for l in _policy_layers(info, None) for h, s in enumerate(scores[l]) if s == s]
        n = round(len(heads) * self.streaming)
        stream: dict[int, list[int]] = {}
        for _, l, h in sorted(heads)[:n]:
            stream.setdefault(l, []).append(h)
        return {l: DuoPolicy(self.sinks + self.recent, sinks=self.sinks, recent=self.recent,
                             streaming=tuple(sorted(hs)), decode_evict=self.evict_during_decode)
                for l, hs in sorted(stream.items())}

    def passes(self, info: ModelInfo) -> list:
        policies = self.policies(info)
        return [bind_pass(kv_policy, "kv_policy", policies=policies)] if policies else []
