"""The runtime's Triton path end to end: the path it takes on CUDA, forced on CPU with the kernels
interpreted, generates what the torch reference path generates.

The kernel tests check each kernel against its reference; this checks the runtime's side of the
contract: the arguments, layouts and index sets it hands the Triton wrappers while prefilling, selecting
and decoding (DELTA: dense prefill, select-layer scores, sparse decode over the chosen slots; Quest: page
metadata kept up to date as tokens are appended, page scores, sparse decode). fp32: the interpreter
cannot multiply bf16 (see tests/kernels/test_attention.py); bf16 on CUDA is bench/gpu.sh's part."""
import importlib
import pkgutil

import pytest
import torch

import skimfx
import skimfx.kernels
from skimfx.eval import teacher_forced_logits
from skimfx.kernels._triton import HAS_TRITON, interpreting
from tiny import tiny_model

pytestmark = [pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs triton, interpreted"),
              pytest.mark.slow]          # generates through the Triton interpreter: the full lane only

# every kernels module whose ops dispatch through use_triton
DISPATCHING = [m for m in (importlib.import_module(f"skimfx.kernels.{i.name}")
                           for i in pkgutil.iter_modules(skimfx.kernels.__path__))
               if hasattr(m, "use_triton") and m.__name__ != "skimfx.kernels._triton"]


@pytest.fixture
def triton_path(monkeypatch):
    """Call to route every op to its Triton kernel (as on CUDA) or back to the torch reference."""
    def route(on: bool):
        for module in DISPATCHING:
            monkeypatch.setattr(module, "use_triton", lambda t: on)
    return route


@pytest.mark.parametrize("recipe", ["delta:budget=0.3,full_layers=1,selection_layers=1,recent=4",
                                    "quest:page_size=4,token_budget=12,dense_layers=1"])
def test_triton_path_generates_what_the_reference_path_does(triton_path, recipe):
    model = tiny_model("llama")
    cm = skimfx.compile(model, recipe)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 21)]
    out = {}
    for on in (False, True):
        triton_path(on)
        g = cm.generate(prompts, max_new_tokens=2, stop_tokens=[])
        out[on] = g.tokens, g.stats, teacher_forced_logits(cm.program, prompts, [[5, 77]] * 2)
    assert out[True][0] == out[False][0]
    # the same next-token logits after the prompt and after each fed token (prefill, then sparse decode)
    torch.testing.assert_close(out[True][2], out[False][2], atol=1e-4, rtol=1e-4)
    assert out[True][1].layer_attended_fraction() == pytest.approx(out[False][1].layer_attended_fraction())
    assert out[True][1].attended_fraction < 1.0                # the sparse reads really ran
