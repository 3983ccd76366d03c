"""Quest over a paged KV cache whose blocks hold every KV head of a token (vLLM's layout), without vLLM.

A serving engine's block table maps each sequence's logical blocks to physical blocks, and one table row
serves every head, so the selection here is one set of blocks per sequence, shared by the KV heads:

- ``update_block_bounds``: at each KV write, the channel-wise key min/max of every physical block the write
  touched (``kernels.page_minmax`` over the new keys, merged with the block's bounds). Blocks fill in
  order from slot 0, so a write that starts a block at slot 0 (a new block, or a freed one reused)
  starts its bounds afresh. A slot written again (a rejected speculative token) leaves the old key in
  the bounds: they stay an upper bound, only looser.
- ``select_blocks``: Quest's bound (``kernels.page_scores``: Σ_d max(q_d·min_d, q_d·max_d), max over the
  query heads of each GQA group) maxed over the KV heads, the ``sink_blocks`` first blocks and the
  newest block always, then the best others up to ``budget // block_size`` blocks in all.
- ``compact_rows``: a block table whose selected rows list only their selected blocks (in order, the
  newest last) and the shorter sequence lengths that go with it, for the engine's unmodified kernel: a
  one-token query at the end of a sequence attends to every key before it, so attending over the
  compacted table is attention over the selected blocks. RoPE was applied before the keys were cached,
  so moving a block changes nothing in its keys.

``SparseDecodeSettings`` reads the recipe (``SKIMFX_VLLM_RECIPE``, a Quest recipe string) and the engine-
side options; ``DecodeCounters`` counts what decode read.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from ..kernels import page_minmax, page_scores
from ..recipes import Quest, RecipeError, parse_recipe

RECIPE_ENV = "SKIMFX_VLLM_RECIPE"
SINK_BLOCKS_ENV = "SKIMFX_VLLM_SINK_BLOCKS"
MIN_CONTEXT_ENV = "SKIMFX_VLLM_MIN_CONTEXT"
STATS_ENV = "SKIMFX_VLLM_STATS"


@dataclass(frozen=True)
class SparseDecodeSettings:
    """What the engine plugin does at decode. ``recipe``: a ``Quest`` recipe (its ``token_budget`` in tokens
    or as a fraction of each sequence's length, its ``dense_layers``; its pages are the engine's KV blocks);
    ``sink_blocks``: leading blocks always read (attention sinks, Xiao et al. 2024); ``min_context``: decode
    rows holding at most this many tokens read everything."""

    recipe: Quest
    sink_blocks: int = 1
    min_context: int = 0

    def __post_init__(self):
        if not isinstance(self.recipe, Quest):
            raise RecipeError(f"the engine plugin runs Quest; got {type(self.recipe).__name__}")
        for name in ("sink_blocks", "min_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RecipeError(f"{name} must be an integer >= 0, got {v!r}")

    @classmethod
    def from_string(cls, text: str | None, sink_blocks: int = 1, min_context: int = 0
                    ) -> "SparseDecodeSettings | None":
        """Settings from a recipe string; None (pass-through) when it is unset or empty."""
        if text is None or not text.strip():
            return None
        recipes = parse_recipe(text)
        if len(recipes) != 1 or not isinstance(recipes[0], Quest):
            got = "+".join(r.name for r in recipes) or "dense"
            raise RecipeError(
                f"{RECIPE_ENV}={text!r}: the vLLM plugin takes one quest recipe (e.g. quest:token_budget=2048 or "
                f"quest:token_budget=0.25), got {got!r}. Token pruning, eviction and early exit do not fit the "
                "engine's block tables and scheduler; prompt compression (skimfx compress) works in front of it")
        return cls(recipes[0], sink_blocks, min_context)

    @classmethod
    def from_env(cls, environ=os.environ) -> "SparseDecodeSettings | None":
        return cls.from_string(environ.get(RECIPE_ENV), _int_env(environ, SINK_BLOCKS_ENV, 1),
                               _int_env(environ, MIN_CONTEXT_ENV, 0))

    def check_block_size(self, block_size: int) -> None:
        """The recipe's pages are the engine's blocks: a page_size set to anything else is refused."""
        ps = self.recipe.page_size
        if ps not in (block_size, Quest.__dataclass_fields__["page_size"].default):
            raise RecipeError(f"{RECIPE_ENV}: page_size={ps} but the engine's KV blocks hold {block_size} tokens; "
                              "the plugin's pages are the engine's blocks: drop page_size or set the engine's "
                              f"block size to {ps}")
        if isinstance(self.recipe.token_budget, int) and self.recipe.token_budget < block_size:
            raise RecipeError(f"{RECIPE_ENV}: token_budget={self.recipe.token_budget} is less than one KV block "
                              f"({block_size} tokens)")

    def sparse_layer(self, layer: int) -> bool:
        return layer >= self.recipe.dense_layers

    def blocks_to_read(self, seq_len: int, block_size: int) -> int:
        """Blocks a decode row of ``seq_len`` tokens reads: Quest's ``budget // page_size`` (at least one,
        at most all), and never fewer than the sinks plus the newest block."""
        n_blocks = -(-seq_len // block_size)
        budget = self.recipe.budget_total
        tokens = max(1, int(round(budget * seq_len))) if isinstance(budget, float) else budget
        return min(n_blocks, max(1, tokens // block_size, self.sink_blocks + 1))


def _int_env(environ, name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise RecipeError(f"{name} must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise RecipeError(f"{name} must be an integer >= 0, got {text!r}")
    return value


@dataclass
class DecodeCounters:
    """What one process's attention layers did at decode (one-token query rows), summed over the decoder's
    attention layers (layers left dense count as reading everything)."""

    decode_calls: int = 0          # layer calls with at least one decode row
    decode_rows: int = 0           # decode rows seen (row x layer)
    selected_rows: int = 0         # of them, rows that went through block selection
    keys_total: int = 0            # tokens the decode rows hold (what a dense read reads)
    keys_read: int = 0             # tokens the decode rows read
    blocks_total: int = 0          # blocks of the selected rows
    blocks_read: int = 0           # blocks the selected rows read
    last_selection: dict = field(default_factory=dict)   # layer name -> [logical blocks per selected row]

    @property
    def fraction_read(self) -> float:
        return self.keys_read / self.keys_total if self.keys_total else 1.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("last_selection")
        d["fraction_read"] = self.fraction_read
        return d

    def reset(self) -> None:
        for f in self.__dataclass_fields__.values():
            setattr(self, f.name, {} if f.name == "last_selection" else 0)


def update_block_bounds(kmin: torch.Tensor, kmax: torch.Tensor, keys: torch.Tensor, slot_mapping: torch.Tensor,
                        block_size: int) -> None:
    """Fold a KV write into the bounds of the blocks it touched.

    kmin, kmax: [num_blocks, Hkv, D] fp32 (updated in place); keys: [T, Hkv, D] the keys written (the
    engine's own input, so the cache's internal layout, which differs between kernels, never matters);
    slot_mapping: [T] their slots (-1: padding). A write fills consecutive slots of a block; the min/max
    of the new keys comes from ``kernels.page_minmax`` (one page per touched block) and is merged with the
    block's bounds, except in a block the write starts at slot 0 (a new or reused block), whose bounds
    start afresh."""
    ok = slot_mapping[: keys.shape[0]] >= 0
    slots = slot_mapping[: keys.shape[0]][ok].long()
    if slots.numel() == 0:
        return
    new = keys[: ok.shape[0]][ok]                                                   # [T', Hkv, D]
    blocks, offset = slots // block_size, slots % block_size
    touched, inverse = torch.unique(blocks, return_inverse=True)
    first = torch.full_like(touched, block_size).scatter_reduce(0, inverse, offset, "amin")
    last = torch.full_like(touched, -1).scatter_reduce(0, inverse, offset, "amax")
    # the new keys of each touched block, moved to its first slots: [n, Hkv, block_size, D]
    page = new.new_zeros(len(touched), new.shape[1], block_size, new.shape[2])
    page[inverse, :, offset - first[inverse]] = new
    lo, hi = page_minmax(page, last - first + 1, block_size)                        # [n, Hkv, 1, D]
    lo, hi = lo[:, :, 0], hi[:, :, 0]
    fresh = (first == 0)[:, None, None]
    kmin[touched] = torch.where(fresh, lo, torch.minimum(kmin[touched], lo))
    kmax[touched] = torch.where(fresh, hi, torch.maximum(kmax[touched], hi))


def block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quest's bound per logical block, maxed over the KV heads -> [R, P] fp32 (-inf past a row's blocks).

    q: [R, Hq, D] (one query per row); kmin/kmax: [num_blocks, Hkv, D]; block_table: [R, >= P] physical
    block ids; seq_lens: [R]."""
    P = int(-(-int(seq_lens.max()) // block_size))
    phys = block_table[:, :P].long().clamp(min=0)
    lo = kmin[phys].permute(0, 2, 1, 3)                                           # [R, Hkv, P, D]
    hi = kmax[phys].permute(0, 2, 1, 3)
    return page_scores(q, lo, hi, seq_lens, block_size).amax(1)                   # [R, P]


def select_blocks(scores: torch.Tensor, seq_lens: torch.Tensor, n_read: list[int], block_size: int,
                  sink_blocks: int) -> list[torch.Tensor]:
    """Per row the ``n_read[r]`` logical blocks to read, ascending: the first ``sink_blocks`` and the
    newest always, then the highest scores."""
    scores = scores.clone()
    newest = (seq_lens.long() - 1) // block_size                                  # [R]
    rows = torch.arange(scores.shape[0], device=scores.device)
    scores[:, :sink_blocks] = float("inf")
    scores[rows, newest] = float("inf")
    out = []
    for r, n in enumerate(n_read):
        live = int(newest[r]) + 1
        top = scores[r, :live].topk(min(n, live)).indices
        out.append(top.sort().values)
    return out


def compact_rows(block_table: torch.Tensor, seq_lens: torch.Tensor, rows: list[int],
                 selected: list[torch.Tensor], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block table, seq lens) with each of ``rows`` listing only its ``selected`` logical blocks (ascending,
    the newest last, so the newest block's partial fill stays at the end); other rows unchanged."""
    table = block_table.clone()
    lens = seq_lens.clone()
    for r, sel in zip(rows, selected):
        n_blocks = -(-int(seq_lens[r]) // block_size)
        if int(sel[-1]) != n_blocks - 1:
            raise ValueError(f"row {r}: the newest block ({n_blocks - 1}) must be selected and last, got {sel.tolist()}")
        table[r, :len(sel)] = block_table[r, sel.to(block_table.device)]
        lens[r] = int(seq_lens[r]) - (n_blocks - len(sel)) * block_size
    return table, lens


__all__ = ["SparseDecodeSettings", "DecodeCounters", "update_block_bounds", "block_scores", "select_blocks",
           "compact_rows", "RECIPE_ENV", "SINK_BLOCKS_ENV", "MIN_CONTEXT_ENV", "STATS_ENV"]
