"""bench/vllm_sparse.py runs end to end (--quick) and writes its table with stock vLLM beside the plugin."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def test_vllm_sparse_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "vllm_sparse.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "vllm_sparse.json").read_text())["rows"]
    assert set(rows) == {"stock vLLM (dense)", "GemFilter 25% (sentences) -> stock vLLM", "plugin quest:token_budget=0.25"}
    plugin = rows["plugin quest:token_budget=0.25"]["1024"]
    assert plugin["keys_read"] <= 0.35 and rows["stock vLLM (dense)"]["1024"]["keys_read"] == 1.0
    md = (tmp_path / "vllm_sparse.md").read_text()
    assert "| stock vLLM (dense) | 1024 |" in md and "Provenance: `python vllm_sparse.py --quick" in md
