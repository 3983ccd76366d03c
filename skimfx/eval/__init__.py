"""Evaluation tasks with seeded generators (shared by the benchmarks and tests). User-facing (the top
layer): may import anything in skimfx; nothing below it imports eval."""
from .agreement import agreement, logit_agreement, teacher_forced_logits
from .passkey import PasskeyPrompt, chat_ids, passkey_correct, passkey_prompts
from .run import TASKS, evaluate

__all__ = ["PasskeyPrompt", "chat_ids", "passkey_prompts", "passkey_correct", "agreement", "logit_agreement", "teacher_forced_logits", "evaluate", "TASKS"]
