"""Recipe strings: parse, print back, and one-line errors that say what is valid."""
import pytest
import torch

import skimfx
from skimfx import GemFilter, PromptDistill, RecipeError, parse_recipe, recipe_label
from tiny import tiny_model


@pytest.mark.parametrize("text,expected", [
    ("dense", []),
    ("", []),
    ("promptdistill:layers=8,keep=256", [PromptDistill(layers=8, keep=256)]),
    ("promptdistill:layers=4/12,keep=1024/256,truncate_earlier_kv=true",
     [PromptDistill(layers=(4, 12), keep=(1024, 256), truncate_earlier_kv=True)]),
    ("gemfilter:layer=12,keep=256,keep_last=4", [GemFilter(layer=12, keep=256, keep_last=4)]),
    ("dense+gemfilter:layer=3,keep=9", [GemFilter(layer=3, keep=9)]),
])
def test_parse_and_label_round_trip(text, expected):
    got = parse_recipe(text)
    assert got == expected
    assert parse_recipe(recipe_label(got)) == got


@pytest.mark.parametrize("text,match", [
    ("nosuchpress:budget=10", "unknown recipe 'nosuchpress'; valid recipes: dense, gemfilter, promptdistill, snapkv, streamingllm, h2o, tova, quest, delta, sentencekv"),
    ("promptdistill:layers=8", "promptdistill: missing parameter.*keep"),
    ("promptdistill:layer=8,keep=3", "unknown parameter 'layer'; valid: granularity, heads, keep, keep_last, layers, max_sentence"),
    ("promptdistill:layers=8,keep=0", "promptdistill: keep must be > 0"),
    ("gemfilter:layer", "expected key=value"),
    ("gemfilter:layer=1,keep=30+promptdistill:layers=1,keep=20", "one prefill pruning recipe at a time"),
])
def test_bad_recipe_strings(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(text)


def test_compile_takes_a_recipe_string():
    model = tiny_model("llama")
    cm = skimfx.compile(model, "promptdistill:layers=0,keep=20")
    g = cm.generate(torch.randint(0, 512, (60,)).tolist(), max_new_tokens=3, stop_tokens=[])
    assert g.stats.layer_tokens == [60, 20, 20]
