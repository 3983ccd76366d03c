"""Recipes: named, validated configurations that select and parameterise passes.

Each recipe is a dataclass validated in ``__post_init__`` (parameters alone) and in ``passes(info)``
(against the model: layer ranges); ``RECIPES`` maps a name to its class, so adding a method is one
small class. ``pruning`` (GemFilter, PromptDistill), ``kv`` (the KV cache policies and their per-layer
parameters), ``exit`` (early exit, self-speculation), ``parse`` (recipe strings).
May import: ``passes``, ``program``. Never: ``runtime``, ``calibrate`` (a recipe contributes passes and
plain parameters, never runtime objects; calibrations are read by their attributes).
"""
from .base import Dense, Recipe, RecipeError
from .exit import DRAFT_SOURCES, EarlyExit, SelfSpeculative
from .generation import ANSWER_EXTRACTORS, Hogwild, ShortMK, Steer, Truncate, hogwild_prompt
from .kv import (H2O, KVZIP_PROMPT, TOVA, AdaKV, AdaKVPolicy, Delta, DuoAttention, DuoPolicy, ExpectedAttention,
                 ExpectedAttentionPolicy, DeltaPolicy, H2OPolicy, KeyDiff, KeyDiffPolicy, Knorm, KnormPolicy,
                 KVRecipe, KVzip, KVzipPolicy, Quest, QuestPolicy, SentenceKV, SentenceKVPolicy, SnapKV, SnapKVPolicy,
                 StreamingLLM, StreamingLLMPolicy, TOVAPolicy, kvzip_prompt_ids, kvzip_template_ids,
                 pyramid_budgets)
from .parse import parse_recipe, recipe_label
from .pruning import GemFilter, PromptDistill
from .registry import RECIPES

__all__ = ["Recipe", "RecipeError", "Dense", "GemFilter", "PromptDistill", "SnapKV", "StreamingLLM", "H2O", "TOVA",
           "Quest", "Delta", "SentenceKV", "EarlyExit", "SelfSpeculative", "RECIPES", "parse_recipe", "recipe_label",
           "pyramid_budgets", "KVRecipe", "DRAFT_SOURCES", "SnapKVPolicy", "StreamingLLMPolicy", "H2OPolicy",
           "TOVAPolicy", "QuestPolicy", "DeltaPolicy", "SentenceKVPolicy", "Knorm", "KeyDiff", "KVzip", "KnormPolicy",
           "KeyDiffPolicy", "KVzipPolicy", "kvzip_prompt_ids", "kvzip_template_ids", "KVZIP_PROMPT", "ShortMK",
           "Truncate", "Steer", "Hogwild",
           "ANSWER_EXTRACTORS", "ExpectedAttention", "ExpectedAttentionPolicy", "AdaKV", "AdaKVPolicy", "DuoAttention",
           "DuoPolicy"]
