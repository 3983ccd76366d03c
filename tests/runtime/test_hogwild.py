"""Hogwild! workers over one shared cache: the layout (each worker's queries attend over the prompt, the
other workers' blocks and its own block last, with the cached keys re-rotated to their positions in that
worker's view by HF's own RoPE) against the runtime's attention, one worker against dense generation,
the recipe and the errors."""
import pytest
import torch

import skimfx
from skimfx import Hogwild, RecipeError, hogwild_prompt
from skimfx.program import HogwildConfig
from skimfx.runtime.decoding.hogwild import HogwildDecoder
from skimfx.runtime.sampling import SamplingConfig
from tiny import tiny_model


class ByteTokenizer:
    """Text -> ids for random-weight models (one id per character)."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=True):
        return self._Out([ord(c) % 500 + 2 for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


HEADERS = ((7, 8, 9), (7, 8, 10), (7, 8, 11))


def run(model, prompt, workers, new, **kw):
    """(program, generation, trace) of ``workers`` greedy workers on ``prompt``."""
    cm = skimfx.compile(model)
    trace = {}
    g = HogwildDecoder(HogwildConfig(workers, HEADERS[:workers])).generate(
        cm.program, [prompt], new, SamplingConfig(**kw), stop_tokens=set(), trace=trace)
    return cm.program, g, trace




def reference_attention(model, program, layer, entry, blocks):
    """The worker's queries over its view laid end to end: each block's cached keys rotated by the block's start
    (HF's rotary embedding for this layer), a plain causal softmax over positions (and the layer's window)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    att = program.attention[layer]
    per_type = isinstance(model.model.rotary_emb.rope_type, dict)      # Gemma 3: local and global RoPE
    keys, values = [], []
    for b, start, nb in entry["view"]:
        k = blocks.k[layer][b][:, :nb].float()[None]
        pos = torch.full((1, nb), start)
        if per_type:
            cos, sin = model.model.rotary_emb(k, pos, model.config.layer_types[layer])
        else:
            cos, sin = model.model.rotary_emb(k, pos)
        keys.append(apply_rotary_pos_emb(k, k, cos, sin)[1][0])
        values.append(blocks.v[layer][b][:, :nb].float())
    K, V = torch.cat(keys, 1), torch.cat(values, 1)                  # [Hkv, N, D], position = index
    q = entry["q"].float()                                           # [Hq, n, D]
    g = q.shape[0] // K.shape[0]
    K, V = K.repeat_interleave(g, 0), V.repeat_interleave(g, 0)
    n, N = q.shape[1], K.shape[1]
    pos_q = torch.arange(N - n, N)
    s = q @ K.transpose(1, 2) * att.scale
    if att.softcap:
        s = att.softcap * torch.tanh(s / att.softcap)
    hide = torch.arange(N)[None] > pos_q[:, None]
    if att.window:
        hide |= pos_q[:, None] - torch.arange(N)[None] >= att.window
    return torch.softmax(s.masked_fill(hide, float("-inf")), -1) @ V


def check_layout(model, prompt, workers, new):
    program, g, trace = run(model, prompt, workers, new)
    blocks = trace.pop("blocks")
    shared = 0
    for layer, entries in trace.items():
        for e in entries:
            ref = reference_attention(model, program, layer, e, blocks)
            torch.testing.assert_close(e["out"].float(), ref, atol=2e-4, rtol=1e-4)
            # own block last; the other workers' blocks before it, in worker order
            assert e["view"][-1][0] == e["writer"]
            shared += sum(1 for b, _, nb in e["view"][1:-1] if nb > 0)
    assert workers == 1 or shared > 0              # the workers did read each other's tokens
    return g


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_layout_matches_rerotated_attention(arch):
    model = tiny_model(arch)
    prompt = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    g = check_layout(model, prompt, 3, 8)       # gemma3's 40-token window is crossed by the views
    assert [len(w) for w in g.workers[0]] == [8, 8, 8] and g.steps[0] == 7
    assert g.tokens[0] == [t for w in range(3) for t in list(HEADERS[w]) + g.workers[0][w]]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_one_worker_is_dense_generation(arch):
    model = tiny_model(arch)
    prompt = torch.randint(0, 512, (36,), generator=torch.Generator().manual_seed(1)).tolist()
    _, g, _ = run(model, prompt, 1, 12)
    dense = skimfx.compile(model).generate(prompt + list(HEADERS[0]), max_new_tokens=12, stop_tokens=[])
    assert g.workers[0][0] == dense.tokens[0]


def test_recipe_and_prompt():
    model = tiny_model("llama")
    cm = skimfx.compile(model, Hogwild(workers=2, header=" W{i}:"), tokenizer=ByteTokenizer())
    assert "Hogwild!: 2 workers" in str(cm.program)
    g = cm.generate([5, 6, 7, 8], max_new_tokens=5, stop_tokens=[])
    assert len(g.workers[0]) == 2 and all(len(w) == 5 for w in g.workers[0])
    w1 = ByteTokenizer()(" W1:").input_ids
    assert g.tokens[0][:len(w1)] == w1
    assert "2 workers" in hogwild_prompt("Name three fruits.", 2)
    assert skimfx.parse_recipe("hogwild:workers=3") == [Hogwild(workers=3)]


def test_errors():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="positive"):
        Hogwild(workers=0)
    with pytest.raises(RecipeError, match="{i}"):
        Hogwild(header="Worker:")
    with pytest.raises(RecipeError, match="tokenizer"):
        skimfx.compile(model, Hogwild())
    with pytest.raises(ValueError, match="one decoding mode"):
        skimfx.compile(model, [Hogwild(), skimfx.ShortMK()], tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="header per worker"):
        HogwildDecoder(HogwildConfig(2, ((1,),)))


@pytest.mark.slow
def test_layout_on_smollm2(smollm2):
    model, tok = smollm2
    check_layout(model, tok("List three colours and three animals.").input_ids, 2, 3)


@pytest.mark.slow
def test_layout_on_gemma3(gemma3):
    model, tok = gemma3
    check_layout(model, tok("List three colours and three animals.").input_ids, 2, 3)


@pytest.mark.slow
def test_cli_generate_with_workers(capsys):
    from skimfx.cli import main

    rc = main(["generate", "--recipe", "hogwild:workers=2", "--max-new-tokens", "6", "--prompt", "Name two fruits."])
    out = capsys.readouterr().out
    assert rc == 0 and "### Worker 1" in out and "### Worker 2" in out
