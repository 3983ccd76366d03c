"""Every Triton kernel builds for a Hopper GPU (sm_90) and fits its shared memory, checked without a GPU.

The other kernel tests run the kernels under the interpreter, which never compiles them; this one runs
tests/kernels/compile_sm90.py in a process without TRITON_INTERPRET, so the kernels go through the real
compiler down to cubins, into an empty Triton cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("compile_sm90.py")


@pytest.mark.slow          # builds every kernel for sm90: the full lane only
def test_every_kernel_builds_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failures"] == {}
    assert len(out["kernels"]) >= 14                       # every kernel skimfx defines ...
    assert sorted({b["kernel"] for b in out["builds"]}) == out["kernels"]   # ... was built
    assert all(b["cubin"] > 0 for b in out["builds"])
    assert all(b["shared"] <= out["shared_limit"] for b in out["builds"])
    assert {"decode, window + softcap", "sparse decode, shared index + softcap", "page_minmax"} <= set(out["calls"])
