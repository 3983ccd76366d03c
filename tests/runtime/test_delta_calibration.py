"""DELTA's select-layer placement, ``calibrate_delta``: its scores against an independent teacher-forced
run, the search never ends worse than the default, the chosen recipe compiles, errors."""
import pytest
import torch
import transformers as tf

import skimfx
from skimfx import Delta
from skimfx.eval import logit_agreement, teacher_forced_logits
from tiny import COMMON, tiny_model

pytestmark = pytest.mark.slow          # runs calibration searches: the full lane only


def deep_llama(layers: int = 8):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": layers}, head_dim=16)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def deep():
    return skimfx.compile(deep_llama())


def test_calibration_scores_are_teacher_forced_kl_and_the_search_only_improves(deep, tmp_path):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (300, 260)]
    cal = skimfx.calibrate_delta(deep, prompts, budget=0.1, full_layers=1, selections=3,
                                 recent=8, steps=5)
    L = 8
    assert cal.num_layers == L and cal.full_layers == 1 and len(cal.selection_layers) == 3
    assert cal.selection_layers[0] == 1 and list(cal.selection_layers) == sorted(set(cal.selection_layers))
    assert cal.selection_layers[-1] <= L - 2
    # the default placement is evaluated first; the chosen one is the best of everything tried
    assert cal.default_layers == (1, 1, 2, 5)
    assert cal.tried[cal.default_layers[1:]] == cal.default_kl
    assert cal.kl == min(cal.tried.values()) <= cal.default_kl
    assert len(cal.tried) > 3
    # each score is KL(dense || DELTA) of the next-token distributions over the dense model's own continuation
    for sel in (cal.selection_layers, (1, 3, 6)):
        recipe = Delta(budget=0.1, full_layers=1, selection_layers=sel, recent=8)
        kls = []
        for p in prompts:
            cont = deep.generate([p], max_new_tokens=6, stop_tokens=[]).tokens[0]
            ref = teacher_forced_logits(deep.program, [p], [cont])[:, 1:]
            got = teacher_forced_logits(skimfx.compile(deep.model, recipe).program, [p], [cont])[:, 1:]
            kls.append(logit_agreement(ref, got)["kl"])
        if sel in cal.tried:
            assert cal.tried[sel] == pytest.approx(sum(kls) / 2, rel=1e-4, abs=1e-7)
    # the chosen placement is a working recipe; the calibration round-trips through a file
    r = cal.recipe(budget=0.25)
    assert r.selection_layers == cal.selection_layers and r.budget == 0.25 and r.recent == 8
    skimfx.compile(deep.model, r).generate([prompts[0]], max_new_tokens=3)
    cal.save(tmp_path / "delta.pt")
    back = skimfx.DeltaCalibration.load(tmp_path / "delta.pt")
    assert back.selection_layers == cal.selection_layers and back.tried == cal.tried
    assert "chosen: full_layers=1" in cal.report()


def test_calibration_errors(deep):
    ok = [list(range(100))]
    with pytest.raises(ValueError, match="at least one prompt"):
        skimfx.calibrate_delta(deep, [])
    with pytest.raises(ValueError, match="selections must be in 1..5"):
        skimfx.calibrate_delta(deep, ok, full_layers=2, selections=6)
    with pytest.raises(ValueError, match="steps must be"):
        skimfx.calibrate_delta(deep, ok, steps=0)
    with pytest.raises(skimfx.RecipeError, match="budget"):
        skimfx.calibrate_delta(deep, ok, budget=1.5)
    with pytest.raises(ValueError, match="pass tokenizer=tok"):
        skimfx.calibrate_delta(deep, ["a text prompt"])
    with pytest.raises(ValueError, match="two tokens"):
        skimfx.calibrate_delta(deep, [[5]])
    with pytest.raises(ValueError, match="sliding-window"):
        skimfx.calibrate_delta(skimfx.compile(tiny_model("gemma3")), ok, full_layers=0,
                               selections=1)


def test_calibration_on_the_real_model(smollm2, smollm2_compiled):
    from skimfx.eval import passkey_prompts

    _, tok = smollm2
    prompts = [p.ids for p in passkey_prompts(tok, 700, depths=(0.5,), keys_per_depth=1, seed=21)]
    cal = skimfx.calibrate_delta(smollm2_compiled, prompts, budget=0.1, steps=4, max_rounds=1)
    assert cal.full_layers == 2 and len(cal.selection_layers) == 3 and cal.selection_layers[0] == 2
    assert cal.default_layers == (2, 2, 10, 20)
    assert 0 <= cal.kl <= cal.default_kl and 0 <= cal.top1 <= 1
    # one round tries the second select layer at 3..19 (below the third), then moves the third
    assert len(cal.tried) >= 17 and all(s[0] == 2 and len(s) == 3 for s in cal.tried)
