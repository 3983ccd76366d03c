"""RULER-style synthetic long-context tasks (Hsieh et al., 2024), seeded: multi-key needle,
variable tracking and common-word extraction. Each example is a token-id prompt and the strings a
correct answer contains; the score of an answer is the fraction of them it contains."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .passkey import FILLER, _chat

WORDS = ("apple river stone cloud maple tiger lemon violin harbor candle falcon meadow copper velvet "
         "lantern orchid pepper silver thunder walnut amber canyon dolphin ember glacier hazel iris jasmine "
         "kettle lotus marble nectar olive pebble quartz raven saffron tulip umber willow").split()


@dataclass(frozen=True)
class Example:
    ids: list[int]
    answers: tuple[str, ...]


def score(tok, example: Example, new_tokens: list[int]) -> float:
    text = tok.decode(new_tokens, skip_special_tokens=True).lower()
    return sum(a.lower() in text for a in example.answers) / len(example.answers)


def _fill(tok, sentences: list[str], question: str, length: int, rng: random.Random, answer_prefix: str) -> list[int]:
    """Scatter ``sentences`` (in order) through filler so the prompt has about ``length`` tokens."""
    n = 1
    while len(_chat(tok, FILLER * n + " ".join(sentences) + question, answer_prefix)) < length - 20:
        n += 1
    cuts = sorted(rng.randint(0, n) for _ in sentences)
    parts, prev = [], 0
    for cut, s in zip(cuts, sentences):
        parts.append(FILLER * (cut - prev) + s + " ")
        prev = cut
    parts.append(FILLER * (n - prev))
    return _chat(tok, "".join(parts) + question, answer_prefix)


def multikey_needle(tok, length: int, n: int = 10, keys: int = 4, seed: int = 0) -> list[Example]:
    """Several "special magic number for <word>" needles; the question asks for one of them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        names = rng.sample(WORDS, keys)
        nums = [str(rng.randint(100000, 999999)) for _ in names]
        sentences = [f"One of the special magic numbers for {w} is: {v}." for w, v in zip(names, nums)]
        rng.shuffle(sentences)
        i = rng.randrange(keys)
        q = f"What is the special magic number for {names[i]} mentioned in the provided text?"
        out.append(Example(_fill(tok, sentences, " " + q, length, rng,
                                 f"The special magic number for {names[i]} is"), (nums[i],)))
    return out


def variable_tracking(tok, length: int, n: int = 10, hops: int = 3, seed: int = 0) -> list[Example]:
    """``VAR A = 12345. VAR B = VAR A. …``; which variables hold the value?"""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        q = f"Find all variables that are assigned the value {value} in the text above."
        out.append(Example(_fill(tok, chain, " " + q, length, rng,
                                 f"The variables assigned the value {value} are:"), tuple(names)))
    return out


def common_words(tok, length: int, n: int = 10, top: int = 5, seed: int = 0) -> list[Example]:
    """A numbered word list where ``top`` words repeat far more often than the rest."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, len(WORDS))
        common, rare = words[:top], words[top:]
        reps = 2
        while True:
            seq = common * (reps * 4) + rare * reps
            rng.shuffle(seq)
            text = " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))
            q = f" What are the {top} most common words in the list above?"
            ids = _chat(tok, "Below is a numbered list of words. " + text + q,
                        f"The {top} most common words in the list are:")
            if len(ids) >= length - 40 or reps > 200:
                break
            reps += 1
        out.append(Example(ids, tuple(common)))
    return out


SYNTHETIC = {"multikey": multikey_needle, "vartrack": variable_tracking, "cwe": common_words}
