"""Truncate (sorted sub-models): the first k layers + the model's head through an exit adapter, against
HF's own modules (hidden state after layer k-1 -> adapter -> final norm -> LM head), greedy generation
against that reference, the Program it leaves (fewer layers, a smaller cache), files and errors."""
import pytest
import torch

import skimfx
from skimfx import ExitAdapter, ExitCalibration, RecipeError, Truncate
from skimfx.runtime import KVCache
from tiny import tiny_model


def _adapter(hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = ExitAdapter(hidden)
    with torch.no_grad():
        a.weight.add_(torch.randn(hidden, hidden, generator=g) * 0.05)
        a.bias.copy_(torch.randn(hidden, generator=g) * 0.1)
    return a.requires_grad_(False)


def _calibration(layer, hidden):
    return ExitCalibration("ridge", (layer,), {layer: _adapter(hidden)}, {})


def reference_logits(model, ids, k, adapter=None):
    """HF: the residual stream after layer k-1 (hidden_states[k]), the adapter, the model's norm and head."""
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[k]
        if adapter is not None:
            h = adapter(h)
        logits = model.lm_head(model.model.norm(h))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("adapted", [False, True])
def test_truncated_logits_match_hf_prefix(arch, adapted):
    model = tiny_model(arch)
    L = model.config.num_hidden_layers
    H = model.config.hidden_size
    ids = torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    for k in range(1, L):
        cal = _calibration(k - 1, H) if adapted else None
        cm = skimfx.compile(model, Truncate(layers=k, calibration=cal))
        got = cm(torch.tensor([ids])).logits
        ref = reference_logits(model, ids, k, cal.adapters[k - 1] if adapted else None)
        torch.testing.assert_close(got, ref, atol=3e-4, rtol=1e-4)


def test_program_is_a_smaller_model():
    model = tiny_model("llama")
    cm = skimfx.compile(model, Truncate(layers=1, calibration=_calibration(0, 96)))
    p = cm.program
    assert p.info.num_layers == 1 and len(p.layer_stages) == 1 and sorted(p.attention) == [0]
    assert ("truncate_layers", 3) in p.history
    assert "truncate_layers (3 rewrites)" in str(p)
    assert KVCache.for_program(p, 1, 16).num_layers == 1
    assert sum(1 for n in p.stage("epilogue").module.graph.nodes if n.op == "call_module") == 1
    dense = skimfx.compile(model)
    assert not any(name == "truncate_layers" for name, _ in dense.program.history)


def test_greedy_generation_follows_the_reference():
    model = tiny_model("qwen3")
    cal = _calibration(1, 96)
    cm = skimfx.compile(model, Truncate(layers=2, calibration=cal))
    prompt = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    g = cm.generate(prompt, max_new_tokens=10, stop_tokens=[])
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(reference_logits(model, seq, 2, cal.adapters[1])[0, -1].argmax()))
    assert g.tokens[0] == seq[len(prompt):]


def test_calibration_file_and_recipe_string(tmp_path):
    model = tiny_model("llama")
    cal = _calibration(1, 96)
    path = tmp_path / "exits.safetensors"
    cal.save(path)
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(3))[None]
    a = skimfx.compile(model, Truncate(layers=2, calibration=cal))(ids).logits
    b = skimfx.compile(model, f"truncate:layers=2,calibration={path}")(ids).logits
    torch.testing.assert_close(a, b)


def test_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="positive"):
        Truncate(layers=0)
    with pytest.raises(RecipeError, match="whole 3-layer model"):
        skimfx.compile(model, Truncate(layers=3))
    with pytest.raises(RecipeError, match="no exit after layer 1"):
        skimfx.compile(model, Truncate(layers=2, calibration=_calibration(0, 96)))
    with pytest.raises(RecipeError, match="ExitCalibration"):
        Truncate(layers=2, calibration=42)
    with pytest.raises(RecipeError, match="no ExitCalibration file"):
        skimfx.compile(model, Truncate(layers=2, calibration=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match="removes"):
        skimfx.compile(model, [skimfx.SnapKV(budget=16, window=4), Truncate(layers=2)])
    # a KV policy on the kept layers composes; after Truncate, "every layer" means every layer that is left
    cm = skimfx.compile(model, [Truncate(layers=2), skimfx.SnapKV(budget=16, window=4, layers=(0, 1))])
    assert sorted(cm.program.policies) == [0, 1] and cm.program.info.num_layers == 2
    every = skimfx.compile(model, "truncate:layers=2+snapkv:budget=16,window=4")
    assert every.program.policies == cm.program.policies
    prompt = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    assert every.generate(prompt, max_new_tokens=6).tokens == cm.generate(prompt, max_new_tokens=6).tokens
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        skimfx.compile(model, [Truncate(layers=2), skimfx.SnapKV(budget=16, window=4, layers=(1, 2))])


@pytest.mark.slow
def test_truncate_on_smollm2(smollm2):
    model, tok = smollm2
    H = model.config.hidden_size
    ids = tok("The quick brown fox jumps over the lazy dog because").input_ids
    cal = _calibration(19, H)
    cm = skimfx.compile(model, Truncate(layers=20, calibration=cal), tokenizer=tok)
    got = cm(torch.tensor([ids])).logits
    torch.testing.assert_close(got, reference_logits(model, ids, 20, cal.adapters[19]), atol=2e-3, rtol=1e-3)
    assert cm.program.info.num_layers == 20
