"""Perplexity of a real text's continuation after a (possibly pruned) prefill of its beginning.

The text is the license of the Python interpreter running this code (every CPython install ships
it), falling back to the GPL-3 text Debian systems ship. The continuation is scored teacher-forced,
so a recipe that prunes the context is measured on exactly the tokens dense is measured on."""
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


def perplexity(program, tok, context_tokens: int, continuation_tokens: int = 128) -> float:
    ids = tok(real_text()).input_ids
    if len(ids) < context_tokens + continuation_tokens:
        raise ValueError(f"the text has {len(ids)} tokens; need {context_tokens + continuation_tokens}")
    ctx, cont = ids[:context_tokens], ids[context_tokens:context_tokens + continuation_tokens]
    logits = teacher_forced_logits(program, [ctx], [cont])[0]                    # [N, V]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(cont, device=logits.device))
    return math.exp(nll.item())
