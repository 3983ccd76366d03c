"""The user's model after ``skimfx.compile``: changes the compiled model cannot follow (a new dtype, a new
device, new tensor objects) give ``ModelChangedError`` naming what changed and what to do; changes made in
place are followed; compiling the changed model again never reuses a stale export."""
import pytest
import torch

import skimfx
from skimfx import ModelChangedError
from tiny import tiny_model

IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture()
def compiled():
    model = tiny_model("llama")
    return model, skimfx.compile(model)


@pytest.mark.parametrize("change, says", [
    (lambda m: m.to(torch.bfloat16), r"is now torch\.bfloat16 on cpu \(compiled as torch\.float32 on cpu"),
    (lambda m: m.half(), r"is now torch\.float16 on cpu"),
    (lambda m: m.to("meta"), r"is now torch\.float32 on meta"),
    (lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
     r"new tensor object \(e\.g\. load_state_dict\(\.\.\., assign=True\)\)"),
])
def test_a_change_the_compiled_model_cannot_follow_is_refused_with_what_to_do(compiled, change, says):
    model, cm = compiled
    change(model)
    for call in (lambda: cm(IDS), lambda: cm.generate(IDS[0].tolist(), max_new_tokens=2),
                 lambda: cm.hf.generate(IDS, max_new_tokens=2)):
        with pytest.raises(ModelChangedError, match=says) as e:
            call()
        assert "skimfx.compile(model, ...)" in str(e.value)


def test_param_data_reassignment_of_a_fused_projection_is_refused(compiled):
    model, cm = compiled
    w = model.model.layers[1].self_attn.k_proj.weight
    w.data = w.data.clone()
    with pytest.raises(ModelChangedError, match=r"layers\.1\.self_attn\.k_proj\.weight now points at new storage"):
        cm(IDS)


def test_param_data_reassignment_elsewhere_is_followed(compiled):
    model, cm = compiled
    w = model.model.layers[1].mlp.down_proj.weight
    w.data = w.data * 1.25                        # the graph reads the parameter object: it sees the new data
    torch.testing.assert_close(cm(IDS).logits, hf_logits(model), rtol=1e-4, atol=1e-4)


def test_an_unfused_compile_survives_a_later_fused_compile_of_the_same_model():
    model = tiny_model("llama")
    unfused = skimfx.compile(model, fuse=False)
    fused = skimfx.compile(model)                 # re-points q/k/v and gate/up into merged buffers
    ref = hf_logits(model)
    torch.testing.assert_close(unfused(IDS).logits, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused(IDS).logits, ref, rtol=1e-4, atol=1e-4)


def test_in_place_load_state_dict_is_followed_including_the_fused_projections(compiled):
    model, cm = compiled
    other = tiny_model("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5).add_(0.01)                 # different weights, q/k/v and gate/up included
    model.load_state_dict(other.state_dict())      # copies into the existing tensors
    torch.testing.assert_close(cm(IDS).logits, hf_logits(other), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hf_logits(other), hf_logits(tiny_model("llama")), atol=1e-3)


def test_compiling_again_after_a_dtype_change_exports_afresh():
    from skimfx.capture import _EXPORTS

    model = tiny_model("llama")
    skimfx.compile(model)(IDS)
    model.to(torch.bfloat16)
    cm = skimfx.compile(model)
    _EXPORTS.pop(model)                             # what an export made now, with nothing cached, gives
    fresh = skimfx.compile(model)
    # a reused fp32 export would have dropped the casts that were no-ops in fp32 (RMSNorm's upcast, RoPE's
    # inv_freq cast) and compute differently
    assert str(cm.program.graph_module.code) == str(fresh.program.graph_module.code)
    torch.testing.assert_close(cm(IDS).logits, fresh(IDS).logits, rtol=0, atol=0)
    assert cm(IDS).logits.dtype == torch.bfloat16


def test_compiling_twice_shares_the_merged_buffers_and_both_follow_in_place_updates():
    model = tiny_model("llama")
    a, b = skimfx.compile(model), skimfx.compile(model, "snapkv:budget=8,window=4")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(2.0)
    ref = hf_logits(model)
    torch.testing.assert_close(a(IDS).logits, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b(IDS).logits, ref, rtol=1e-4, atol=1e-4)      # SnapKV's prefill is dense
