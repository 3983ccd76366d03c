"""The HF ``PreTrainedModel`` contract that evaluation harnesses call (lm-eval's HFLM uses exactly
``model(inps).logits``, ``model.generate(input_ids=..., max_length=..., stopping_criteria=...,
pad_token_id=..., use_cache=True, do_sample=False)``, ``.config``, ``.device``, ``.eval()``,
``.tie_weights()``): ``cm.hf`` against the HF model itself."""
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import skimfx
from tiny import tiny_model


@pytest.fixture(scope="module")
def pair():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None        # random weights: no EOS, fixed-length outputs
    return model, skimfx.compile(model)


class StopAfter(StoppingCriteria):
    """Row b stops once it has ``n[b]`` new tokens (HF's per-row stopping contract)."""

    def __init__(self, prompt_len, n):
        self.prompt_len, self.n = prompt_len, n

    def __call__(self, input_ids, scores, **kw):
        new = input_ids.shape[1] - self.prompt_len
        return torch.tensor([new >= k for k in self.n])


def test_attributes_and_logits(pair):
    model, cm = pair
    hf = cm.hf
    assert hf.config is model.config and hf.device == torch.device("cpu") and hf.dtype == torch.float32
    assert hf.eval() is hf and hf.tie_weights() is None
    ids = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_generate_returns_hf_sequences(pair):
    model, cm = pair
    ids = torch.randint(0, 512, (2, 20))
    kw = dict(max_length=32, pad_token_id=0, do_sample=False, use_cache=True)
    with torch.no_grad():
        want = model.generate(input_ids=ids, **kw)
    got = cm.hf.generate(input_ids=ids, **kw)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_generate_left_padded_batch(pair):
    model, cm = pair
    ids = torch.randint(1, 512, (2, 16))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, do_sample=False)
    got = cm.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, do_sample=False)
    assert torch.equal(got, want)


def test_stopping_criteria_per_row(pair):
    model, cm = pair
    ids = torch.randint(0, 512, (2, 12))
    crit = StoppingCriteriaList([StopAfter(12, [3, 7])])
    # with an EOS id set, HF pads a row after it stops (without one it keeps generating for it)
    kw = dict(max_length=40, stopping_criteria=crit, pad_token_id=0, eos_token_id=511, do_sample=False)
    with torch.no_grad():
        want = model.generate(input_ids=ids, **kw)
    got = cm.hf.generate(input_ids=ids, **kw)
    assert got.shape == (2, 12 + 7) and torch.equal(got, want)


def test_bad_lengths(pair):
    _, cm = pair
    ids = torch.randint(0, 512, (1, 12))
    with pytest.raises(ValueError, match="max_length=10 leaves no room"):
        cm.hf.generate(input_ids=ids, max_length=10)
    with pytest.raises(ValueError, match="max_new_tokens or max_length"):
        cm.hf.generate(input_ids=ids)

