"""Evaluation tasks with seeded generators (shared by the benchmarks and tests)."""
from .passkey import PasskeyPrompt, passkey_prompts, passkey_correct

__all__ = ["PasskeyPrompt", "passkey_prompts", "passkey_correct"]
