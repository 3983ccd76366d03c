"""``RECIPES``: every recipe class by its name (what recipe strings and the CLI look up)."""
from __future__ import annotations

from .base import Dense
from .exit import EarlyExit, SelfSpeculative
from .generation import Hogwild, ShortMK, Steer, Truncate
from .kv import (H2O, TOVA, AdaKV, Delta, DuoAttention, ExpectedAttention, KeyDiff, Knorm, KVzip, Quest, SentenceKV,
                 SnapKV, StreamingLLM)
from .pruning import GemFilter, PromptDistill

RECIPES: dict[str, type] = {cls.name: cls for cls in (Dense, GemFilter, PromptDistill, SnapKV, StreamingLLM, H2O, TOVA,
                                                      Quest, Delta, SentenceKV, Knorm, KeyDiff, KVzip, EarlyExit,
                                                      SelfSpeculative, ShortMK, Truncate, Steer, Hogwild, ExpectedAttention,
                                                      AdaKV, DuoAttention)}
