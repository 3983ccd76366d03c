"""Prompt compression for any engine: the kept ids are GemFilter's selection, and a plain dense model fed
those ids (what an engine does with prompt_token_ids) generates what GemFilter generates."""
import json

import pytest
import torch

import skimfx
from skimfx.integrations.compress import PromptCompressor
from skimfx.recipes import RecipeError
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_kept_ids_are_gemfilters_and_reproduce_its_generation_on_a_dense_model(llama):
    torch.manual_seed(4)
    prompt = torch.randint(0, 512, (120,)).tolist()
    recipe = skimfx.GemFilter(layer=1, keep=30, keep_last=4)
    kept = skimfx.compress_prompt(llama, prompt, recipe)
    g = skimfx.compile(llama, recipe).generate([prompt], max_new_tokens=8, stop_tokens=[])
    sel = g.stats.selected[1][0]
    assert kept == [prompt[i] for i in sel] and len(kept) == 30 and sel[-4:] == list(range(116, 120))
    dense = skimfx.compile(llama).generate([kept], max_new_tokens=8, stop_tokens=[])
    assert dense.tokens[0] == g.tokens[0]


def test_keep_and_fraction_per_call(llama):
    prompt = list(range(3, 103))
    comp = PromptCompressor(llama, "gemfilter:layer=0,keep=40")
    assert len(comp(prompt)) == 40 and len(comp(prompt, keep=10)) == 10 and len(comp(prompt, fraction=0.25)) == 25
    assert comp(prompt[:30]) == prompt[:30]                                       # not longer than keep: whole
    with pytest.raises(ValueError, match="not both"):
        comp(prompt, keep=10, fraction=0.5)
    with pytest.raises(ValueError, match="fraction must be in"):
        comp(prompt, fraction=1.5)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        comp("some text")


@pytest.mark.parametrize("recipe", ["promptdistill:layers=1,keep=8", "quest:token_budget=64", "dense"])
def test_only_gemfilter_gives_a_prompt_of_its_own(llama, recipe):
    with pytest.raises(RecipeError, match="one gemfilter recipe"):
        PromptCompressor(llama, recipe)


@pytest.mark.slow
def test_cli_compress_prints_the_kept_ids(capsys):
    from skimfx.cli import main

    assert main(["compress", "--recipe", "gemfilter:layer=12,keep=64", "--prompt",
                 "The grass is green. " * 40 + "The pass key is 12345. What is the pass key?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept_tokens"] == 64 == len(out["prompt_token_ids"]) and out["prompt_tokens"] > 200
