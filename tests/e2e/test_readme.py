"""The README's example runs as written (on the real embedded model) and does what its comments say."""
import re
from pathlib import Path

import pytest
import torch

import skimfx

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_one_python_example():
    assert len(python_blocks(README.read_text())) == 1


@pytest.mark.slow
def test_the_readme_example_runs(smollm2, tmp_path, monkeypatch, capsys):
    (code,) = python_blocks(README.read_text())
    monkeypatch.setattr(skimfx, "load_model", lambda name: smollm2)      # the session's copy of the same model
    monkeypatch.chdir(tmp_path)                                          # the calibration file lands here
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    model, tok = smollm2
    assert ns["logits"].shape == (1, ns["input_ids"].shape[1], model.config.vocab_size)
    g = ns["g"]
    assert len(g.tokens) == 2 and all(len(t) >= 1 for t in g.tokens)
    assert g.stats.attended_fraction < 1.0                               # Quest read part of the cache
    assert all(0 < len(p) <= 256 for p in g.stats.selected[8])           # PromptDistill kept <= 256 tokens
    assert (tmp_path / "exits.safetensors").exists()
    spec = ns["cm"]
    assert spec.program.decoding.mode == "speculative" and ns["hf_like"].config is model.config
    # the speculative model is lossless: its greedy tokens are dense greedy's
    dense = skimfx.compile(model, tokenizer=tok)
    ids = tok(ns["prompts"][1]).input_ids
    assert spec.generate(ids, max_new_tokens=16).tokens[0] == dense.generate(ids, max_new_tokens=16).tokens[0]
