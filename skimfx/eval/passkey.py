"""Passkey retrieval (Mohtashami & Jaggi, 2023): a random number hidden at a chosen depth of filler
text; the model must repeat it. Seeded, so every recipe is scored on the same prompts."""
from __future__ import annotations

import random
from dataclasses import dataclass

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key?"


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float          # 0 = right after the intro, 1 = just before the question
    key_spans: tuple[tuple[int, int], ...]  # token ranges of each occurrence of the key in ids

    def key_kept(self, kept: list[int] | set[int]) -> bool:
        """Did a token selection keep at least one whole occurrence of the key?"""
        kept = set(kept)
        return any(all(i in kept for i in range(a, b)) for a, b in self.key_spans)


def chat_ids(tok, text: str) -> list[int]:
    """Token ids of one user turn and the assistant's turn opening (the chat template when the
    tokenizer has one, else the text itself)."""
    if tok.chat_template:
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tok(text + "\nAnswer:").input_ids


def _chat(tok, text: str, answer_prefix: str = "The pass key is") -> list[int]:
    """The user turn (chat template when the tokenizer has one) followed by the start of the answer."""
    if tok.chat_template:
        return chat_ids(tok, text) + tok(answer_prefix, add_special_tokens=False).input_ids
    return tok(text + "\nAnswer: " + answer_prefix).input_ids


def passkey_prompts(tok, target_tokens: int, depths=(0.0, 0.25, 0.5, 0.75, 1.0), keys_per_depth: int = 2,
                    seed: int = 0) -> list[PasskeyPrompt]:
    """Prompts of about ``target_tokens`` tokens, one per (depth, key)."""
    rng = random.Random(seed)
    n_fill = 1
    while len(_chat(tok, INTRO + " " + FILLER * n_fill + QUESTION)) < target_tokens - 30:
        n_fill += 1
    out = []
    for depth in depths:
        for _ in range(keys_per_depth):
            key = str(rng.randint(10000, 99999))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            before = round(depth * n_fill)
            text = INTRO + " " + FILLER * before + needle + FILLER * (n_fill - before) + QUESTION
            ids = _chat(tok, text)
            out.append(PasskeyPrompt(ids=ids, key=key, depth=depth, key_spans=_find_key(tok, ids, key)))
    return out


def _find_key(tok, ids: list[int], key: str) -> tuple[tuple[int, int], ...]:
    """Token spans whose decoded text is exactly the key (tokenizers split digits differently)."""
    spans = []
    pieces = [tok.decode([t]) for t in ids]
    for a in range(len(ids)):
        text = ""
        for b in range(a, min(len(ids), a + len(key) + 2)):
            text += pieces[b]
            if text.strip() == key:
                spans.append((a, b + 1))
                break
            if not key.startswith(text.strip()):
                break
    return tuple(spans)


def passkey_correct(tok, prompt: PasskeyPrompt, new_tokens: list[int]) -> bool:
    return prompt.key in tok.decode(new_tokens, skip_special_tokens=True)
