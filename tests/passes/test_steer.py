"""Activation-Steered Compression: the steer pass against HF with a forward hook that adds alpha * v to
the layer's output (prefill logits and greedy decoding), calibrate_steering's vector against the mean
difference computed from HF's hidden states and its alpha against the KL measured on HF, files, errors."""
import pytest
import torch

import skimfx
from skimfx import RecipeError, Steer, SteeringCalibration, calibrate_steering
from skimfx.passes.steer import BUFFER
from tiny import tiny_model


class CharTokenizer:
    """Text <-> ids for random-weight models: one id per character (no chat template)."""

    chat_template = None

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=True):
        return self._Out(([1] if add_special_tokens else []) + [ord(c) % 500 + 2 for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _hooked(model, layer, shift):
    """A forward hook on HF's decoder layer ``layer`` that adds ``shift`` to the residual stream it returns."""
    def hook(_mod, _args, out):
        if isinstance(out, tuple):
            return (out[0] + shift,) + tuple(out[1:])
        return out + shift
    return model.model.layers[layer].register_forward_hook(hook)


def _cal(layer, hidden, alpha=0.8, seed=0):
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return SteeringCalibration(layer=layer, vector=v, alpha=alpha, kl_bound=0.1)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_steered_logits_match_hf_with_a_hook(arch):
    model = tiny_model(arch)
    H = model.config.hidden_size
    ids = torch.randint(0, 512, (33,), generator=torch.Generator().manual_seed(0))[None]
    for layer in range(model.config.num_hidden_layers):
        cal = _cal(layer, H)
        got = skimfx.compile(model, Steer(steering=cal))(ids).logits
        h = _hooked(model, layer, cal.alpha * cal.vector)
        try:
            with torch.no_grad():
                ref = model(ids).logits
        finally:
            h.remove()
        torch.testing.assert_close(got, ref, atol=3e-4, rtol=1e-4)
        with torch.no_grad():
            assert (model(ids).logits - ref).abs().max() > 1e-3      # the steering changed something


def test_greedy_decoding_is_steered_at_every_token():
    model = tiny_model("llama")
    cal = _cal(1, 96, alpha=1.5)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    g = skimfx.compile(model, Steer(steering=cal)).generate(prompt, max_new_tokens=10, stop_tokens=[])
    seq = list(prompt)
    h = _hooked(model, 1, cal.alpha * cal.vector)
    try:
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    finally:
        h.remove()
    assert g.tokens[0] == seq[len(prompt):]


def test_the_rewrite_is_in_the_program():
    model = tiny_model("llama")
    cm = skimfx.compile(model, Steer(steering=_cal(2, 96), alpha=0.25))
    assert ("steer", 1) in cm.program.history and "steer (1 rewrites)" in str(cm.program)
    st = cm.program.stage("layer.2")
    assert [n.target for n in st.module.graph.nodes if n.op == "get_attr" and n.target == BUFFER] == [BUFFER]
    torch.testing.assert_close(getattr(st.module, BUFFER), 0.25 * _cal(2, 96).vector)
    dense = skimfx.compile(model)
    assert not any(hasattr(s.module, BUFFER) for s in dense.program.stages)
    assert not any(n == "steer" for n, _ in dense.program.history)
    with pytest.raises(ValueError, match="already steered"):
        skimfx.compile(model, [Steer(steering=_cal(2, 96)), Steer(steering=_cal(2, 96, seed=1))])


PAIRS = [(f"Question {i}: add {i} and {2 * i}.", f"Let me think step by step. First I take {i}, then I add "
          f"{2 * i} to it, which gives {3 * i}. So the answer is {3 * i}.", f"{3 * i}") for i in range(1, 7)]


def test_calibration_against_hf_hidden_states(tmp_path):
    model = tiny_model("qwen3")
    tok = CharTokenizer()
    layer = 1
    cal = calibrate_steering(model, PAIRS, tokenizer=tok, layer=layer, kl_bound=0.02, kl_pairs=3)
    diffs = []
    with torch.no_grad():
        for p, verbose, concise in PAIRS:
            pid = tok(p).input_ids
            means = []
            for ans in (concise, verbose):
                ids = pid + tok(ans, add_special_tokens=False).input_ids
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1]
                means.append(hs[0, len(pid):].mean(0))
            diffs.append(means[0] - means[1])
    torch.testing.assert_close(cal.vector, torch.stack(diffs).mean(0), atol=2e-4, rtol=1e-4)
    # alpha: within the bound, measured as HF's KL between unsteered and hooked next-token distributions
    assert 0 < cal.alpha and cal.kl <= cal.kl_bound
    assert cal.bound_reached and any(a > cal.alpha and k > cal.kl_bound for a, k in cal.curve)
    assert all(k <= cal.kl_bound for a, k in cal.curve if a <= cal.alpha)

    def hf_kl(alpha):
        total, n = 0.0, 0
        for p, verbose, _ in PAIRS[:3]:
            pid = tok(p).input_ids
            ids = torch.tensor([pid + tok(verbose, add_special_tokens=False).input_ids])
            with torch.no_grad():
                ref = torch.log_softmax(model(ids).logits[0, len(pid) - 1:], -1)
                h = _hooked(model, layer, alpha * cal.vector)
                try:
                    got = torch.log_softmax(model(ids).logits[0, len(pid) - 1:], -1)
                finally:
                    h.remove()
            total += float((ref.exp() * (ref - got)).sum())
            n += ref.shape[0]
        return total / n

    assert hf_kl(cal.alpha) == pytest.approx(cal.kl, rel=1e-3, abs=1e-6)
    # the file round trip, and the recipe reading it by path
    path = tmp_path / "asc.safetensors"
    cal.save(path)
    back = SteeringCalibration.load(path)
    assert back.layer == layer and back.alpha == cal.alpha and torch.equal(back.vector, cal.vector)
    assert back.curve == cal.curve and back.bound_reached
    ids = torch.randint(0, 512, (12,))[None]
    torch.testing.assert_close(skimfx.compile(model, f"steer:steering={path}")(ids).logits,
                               skimfx.compile(model, cal.recipe())(ids).logits)


def test_a_bound_beyond_saturation_stops_at_max_alpha():
    """The KL saturates once the shift dominates the stream: alpha stops at max_shift x the residual norm."""
    model = tiny_model("qwen3")
    cal = calibrate_steering(model, PAIRS[:3], tokenizer=CharTokenizer(), layer=1, kl_bound=5.0, kl_pairs=2,
                             max_shift=2.0)
    assert not cal.bound_reached and cal.kl <= 5.0
    assert cal.alpha * float(cal.vector.norm()) == pytest.approx(2.0 * cal.norm, rel=1e-5)


def test_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="SteeringCalibration"):
        Steer(steering=3)
    with pytest.raises(RecipeError, match="finite"):
        Steer(steering=_cal(0, 96), alpha=float("nan"))
    with pytest.raises(ValueError, match="hidden size"):
        skimfx.compile(model, Steer(steering=SteeringCalibration(0, torch.zeros(7), 1.0, 0.1)))
    with pytest.raises(ValueError, match="layer must be in 0..2"):
        skimfx.compile(model, Steer(steering=_cal(3, 96)))
    with pytest.raises(RecipeError, match="no SteeringCalibration file"):
        skimfx.compile(model, Steer(steering=str(tmp_path / "none.safetensors")))
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="kl_bound"):
        calibrate_steering(model, PAIRS, tokenizer=tok, kl_bound=0)
    with pytest.raises(ValueError, match="at least one"):
        calibrate_steering(model, [], tokenizer=tok)
    with pytest.raises(ValueError, match="prompt, verbose answer, concise answer"):
        calibrate_steering(model, [("only", "two")], tokenizer=tok)
    with pytest.raises(ValueError, match="layer must be in"):
        calibrate_steering(model, PAIRS, tokenizer=tok, layer=5)


@pytest.mark.slow
def test_steer_on_smollm2(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok("Explain briefly why the sky is blue.").input_ids])
    cal = _cal(15, model.config.hidden_size, alpha=0.5)
    got = skimfx.compile(model, Steer(steering=cal), tokenizer=tok)(ids).logits
    h = _hooked(model, 15, cal.alpha * cal.vector)
    try:
        with torch.no_grad():
            ref = model(ids).logits
    finally:
        h.remove()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
