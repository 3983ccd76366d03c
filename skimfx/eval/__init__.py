"""Evaluation tasks with seeded generators (shared by the benchmarks and tests)."""
from .agreement import agreement
from .passkey import PasskeyPrompt, passkey_correct, passkey_prompts
from .run import TASKS, evaluate

__all__ = ["PasskeyPrompt", "passkey_prompts", "passkey_correct", "agreement", "evaluate", "TASKS"]
