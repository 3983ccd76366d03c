"""A Triton that fails to import is reported: a warning with the reason on a machine with a CUDA device,
an ImportError under SKIMFX_REQUIRE_TRITON=1, silence only on a CPU machine (where the torch references
are the intended path). Each case runs in a fresh interpreter with ``import triton`` made to fail."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow          # each case starts a fresh interpreter: the full lane only

PROBE = """
import json, sys, warnings
sys.modules["triton"] = None             # `import triton` now raises ImportError
import torch
torch.cuda.is_available = lambda: {cuda}
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    try:
        import skimfx
        from skimfx.kernels import _triton
        result = {{"has_triton": _triton.HAS_TRITON, "error": None}}
    except ImportError as e:
        result = {{"has_triton": None, "error": str(e)}}
result["warnings"] = [str(w.message) for w in caught if "Triton" in str(w.message)]
if result["error"] is None and {run}:          # the whole pipeline runs on the torch references
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    got = skimfx.compile(model)(ids).logits
    result["max_err"] = (got - ref).abs().max().item()
print("RESULT" + json.dumps(result))
"""


def probe(cuda: bool, require: bool | None = None, run: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SKIMFX_REQUIRE_TRITON"}
    if require is not None:
        env["SKIMFX_REQUIRE_TRITON"] = "1" if require else "0"
    out = subprocess.run([sys.executable, "-c", PROBE.format(cuda=cuda, run=run)], env=env, capture_output=True, text=True,
                         timeout=300)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    assert line, out.stderr[-2000:]
    return json.loads(line[-1][len("RESULT"):])


def test_on_a_cuda_machine_a_failed_import_warns_once_with_the_reason():
    r = probe(cuda=True)
    assert r["has_triton"] is False and r["error"] is None
    assert len(r["warnings"]) == 1
    assert "Triton failed to import (ModuleNotFoundError: import of triton halted" in r["warnings"][0] and "SKIMFX_REQUIRE_TRITON=1" in r["warnings"][0]


@pytest.mark.parametrize("cuda", [True, False])
def test_require_triton_turns_the_failure_into_an_error(cuda):
    r = probe(cuda=cuda, require=True)
    assert r["error"] is not None and "SKIMFX_REQUIRE_TRITON=1 but Triton failed to import" in r["error"]


def test_on_a_cpu_machine_the_torch_references_run_without_a_warning():
    r = probe(cuda=False, require=False, run=True)
    assert r["has_triton"] is False and r["error"] is None and r["warnings"] == []
    assert r["max_err"] <= 1e-4                # a compiled tiny Llama matches HF with no Triton at all
