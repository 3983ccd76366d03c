"""Token pruning on the embedded real models: GemFilter equals HF on the kept tokens, PromptDistill
keeps the passkey at 25% of the prompt and physically shrinks the later layers' KV."""
import pytest
import torch

import skimfx
from skimfx import GemFilter, PromptDistill
from skimfx.eval import passkey_correct, passkey_prompts

pytestmark = pytest.mark.slow


def hf_continue(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name,layer,keep", [("smollm2-135m", 12, 200), ("gemma3-270m", 6, 150)])
def test_gemfilter_equals_hf_on_the_kept_tokens(name, layer, keep, request):
    model, tok = request.getfixturevalue("smollm2" if name.startswith("smol") else "gemma3")
    cm = skimfx.compile(model, GemFilter(layer=layer, keep=keep), tokenizer=tok)
    prompt = passkey_prompts(tok, 700, depths=(0.5,), keys_per_depth=1)[0].ids
    g = cm.generate(prompt, max_new_tokens=16, stop_tokens=[])
    kept = g.stats.selected[layer][0]
    assert len(kept) == keep and kept == sorted(kept) and kept[-8:] == list(range(len(prompt) - 8, len(prompt)))
    assert g.tokens[0] == hf_continue(model, [prompt[i] for i in kept], 16)
    assert g.stats.layer_tokens == [keep] * model.config.num_hidden_layers


def test_promptdistill_keeps_the_passkey_at_25_percent(smollm2):
    model, tok = smollm2
    prompts = passkey_prompts(tok, 1000, depths=(0.0, 0.5, 0.75), keys_per_depth=1, seed=3)
    keep = len(prompts[0].ids) // 4
    cm = skimfx.compile(model, PromptDistill(layers=14, keep=keep), tokenizer=tok)
    g = cm.generate([p.ids for p in prompts], max_new_tokens=12)
    assert [passkey_correct(tok, p, t) for p, t in zip(prompts, g.tokens)] == [True, True, True]
    L = model.config.num_hidden_layers
    assert g.stats.layer_tokens[:15] == [max(len(p.ids) for p in prompts)] * 15
    assert g.stats.layer_tokens[15:] == [keep] * (L - 15)
    dense = skimfx.compile(model).generate([p.ids for p in prompts], max_new_tokens=1)
    assert g.stats.kv_prefill_bytes < 0.65 * dense.stats.kv_prefill_bytes


def test_promptdistill_on_gemma3_decodes_past_the_window(gemma3):
    model, tok = gemma3
    text = "The river runs north through the valley, past the old mill and the stone bridge. " * 40
    ids = tok(text).input_ids
    assert len(ids) > 600
    cm = skimfx.compile(model, PromptDistill(layers=(4, 10), keep=(300, 120), truncate_earlier_kv=True))
    g = cm.generate(ids, max_new_tokens=20, stop_tokens=[])
    assert len(g.tokens[0]) == 20
    assert g.stats.layer_tokens == [120] * model.config.num_hidden_layers
    # the text repeats, so even the pruned model continues it
    assert "river" in tok.decode(g.tokens[0]) or "valley" in tok.decode(g.tokens[0])
