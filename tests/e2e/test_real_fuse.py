"""Fusion on the embedded real models: every pattern once per layer, fused logits equal to the
unfused graph (fp32, <= 1e-4). (The other e2e tests run the fused default against HF.)"""
import pytest

import skimfx

pytestmark = pytest.mark.slow

# plain RMSNorms per layer: SmolLM2 (Llama) input norm; Gemma3 input, post-attention, post-MLP, q-norm, k-norm
PLAIN_NORMS = {"smollm2": 1, "gemma3": 5}


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_fused_counts_and_logits_equal_unfused(request, name):
    model, tok = request.getfixturevalue(name)
    fused = request.getfixturevalue(f"{name}_compiled")
    plain = skimfx.compile(model, tokenizer=tok, fuse=False)
    L = model.config.num_hidden_layers
    hist = {k: v for k, v in fused.program.history if k.startswith("fuse.")}
    assert hist == {"fuse.rms_norm": PLAIN_NORMS[name] * L + 1, "fuse.add_rms_norm": L, "fuse.rope": L,
                    "fuse.glu": L, "fuse.qkv": L, "fuse.gate_up": L}
    text = "Fusion must not change what the model computes. " * 8
    ids = tok(text, return_tensors="pt").input_ids
    for batch in (ids, ids[:, :1]):
        a, b = plain(batch).logits, fused(batch).logits
        assert (a - b).abs().max().item() <= 1e-4
    assert plain.generate(input_ids=ids, max_new_tokens=8).tokens == fused.generate(input_ids=ids, max_new_tokens=8).tokens
