"""Calibration files: safetensors + JSON metadata, read without unpickling anything (a crafted pickle
file is refused and runs nothing; so is an older torch.save file), clear errors, ``resolve`` (recipe fields that name a
file) and each calibration's ``.recipe()``."""
import json
import os

import pytest
import torch

import skimfx
from skimfx import EarlyExit, SelfSpeculative
from skimfx.calibrate import (CalibrationFileError, DeltaCalibration, ExitCalibration, SkipCalibration,
                              calibrate_exits, calibrate_skip, resolve)
from tiny import tiny_model


class CharTok:
    """One token per character (enough to calibrate a random-weight model)."""

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [ord(c) % 512 for c in text]
        return Out()


TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6, "A license grants permission to copy. " * 6,
         "Calibration text held out from training. " * 6, "Another document about lighthouses. " * 6]


@pytest.fixture(scope="module")
def cm():
    return skimfx.compile(tiny_model("llama"))


@pytest.fixture(scope="module")
def exits(cm):
    return calibrate_exits(cm, TEXTS, layers=(0, 1), method="distill", tokenizer=CharTok(), max_tokens=300,
                           chunk=64, rank=4, steps=3)


@pytest.fixture(scope="module")
def skip(cm):
    return calibrate_skip(cm, TEXTS, tokenizer=CharTok(), max_tokens=120, chunk=60, max_skip=1)


def delta_calibration() -> DeltaCalibration:
    return DeltaCalibration(8, 0.1, 8, 1, (1, 3, 6), 0.01, 0.9, (1, 1, 2, 5), 0.02, 0.8,
                            {(1, 2, 5): 0.02, (1, 3, 6): 0.01}, 100, 1.5)


class RunsCode:
    """Unpickling this would run a shell command (what a crafted calibration file could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("cls, maker", [(ExitCalibration, "calibrate_exits"), (SkipCalibration, "calibrate_skip"),
                                        (DeltaCalibration, "calibrate_delta")])
def test_a_file_that_would_run_code_is_refused_and_runs_nothing(cls, maker, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"method": "ridge", "layers": (1,), "payload": RunsCode(marker)}, path)
    # the payload is live: an unrestricted load runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CalibrationFileError, match=r"refused to load .*evil\.pt.*could run code") as e:
        cls.load(path)
    assert f"skimfx.{maker}(...)" in str(e.value)                   # says how to make a good file
    assert not marker.exists()


def _safetensors_doc(path) -> dict:
    """The JSON a calibration file carries (read with safetensors alone: the file is plain safetensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["skimfx"])


def test_an_older_torch_save_file_is_refused_with_what_to_do(skip, tmp_path):
    torch.save({k: getattr(skip, k) for k in skip.__dataclass_fields__}, tmp_path / "old.pt")
    with pytest.raises(CalibrationFileError, match=r"old\.pt.*pickle \(torch\.save\) file.*skimfx\.calibrate_skip"):
        SkipCalibration.load(tmp_path / "old.pt")


def test_exit_calibration_round_trips_as_plain_data(cm, exits, tmp_path):
    path = tmp_path / "exits.pt"
    exits.save(path)
    assert _safetensors_doc(path)["format"] == "skimfx-calibration/1"
    assert set(_safetensors_doc(path)["data"]) == {"method", "layers", "curves", "raw_agreement", "agreement",
                                                   "tokens", "seconds", "adapters"}
    back = ExitCalibration.load(path)
    assert back.method == "distill" and back.layers == (0, 1) and back.tokens == exits.tokens
    assert back.agreement == exits.agreement and back.raw_agreement == exits.raw_agreement
    for l in (0, 1):
        assert back.threshold(l, 0.3) == exits.threshold(l, 0.3)
        a, b = exits.adapters[l], back.adapters[l]
        assert (b.hidden, b.rank) == (a.hidden, a.rank) and not b.weight.requires_grad
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)
    # the adapters of a "none" calibration are None and stay None
    none = calibrate_exits(cm, TEXTS, layers=(1,), method="none", tokenizer=CharTok(), max_tokens=200, chunk=64)
    none.save(tmp_path / "none.pt")
    assert ExitCalibration.load(tmp_path / "none.pt").adapters == {1: None}


def test_skip_and_delta_calibrations_round_trip(skip, tmp_path):
    skip.save(tmp_path / "skip.pt")
    _safetensors_doc(tmp_path / "skip.pt")
    assert SkipCalibration.load(tmp_path / "skip.pt") == skip
    d = delta_calibration()
    d.save(tmp_path / "delta.pt")
    _safetensors_doc(tmp_path / "delta.pt")
    assert DeltaCalibration.load(tmp_path / "delta.pt") == d


def test_file_errors_name_the_file_and_what_to_do(skip, tmp_path):
    with pytest.raises(CalibrationFileError, match=r"no ExitCalibration file at .*missing\.pt.*calibrate_exits"):
        ExitCalibration.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(CalibrationFileError, match=r"junk\.pt.*calibrate_skip"):
        SkipCalibration.load(tmp_path / "junk.pt")
    skip.save(tmp_path / "skip.pt")                                   # the wrong kind of calibration
    with pytest.raises(CalibrationFileError, match=r"skip\.pt' is not a file saved by ExitCalibration\.save"):
        ExitCalibration.load(tmp_path / "skip.pt")
    with pytest.raises(CalibrationFileError, match=r"not a file saved by DeltaCalibration\.save"):
        DeltaCalibration.load(tmp_path / "skip.pt")
    assert issubclass(CalibrationFileError, ValueError)


def test_resolve_loads_the_files_a_recipe_names(exits, skip, tmp_path):
    exits.save(tmp_path / "exits.pt")
    r = resolve(EarlyExit(layers=(0, 1), calibration=str(tmp_path / "exits.pt"), target_agreement=0.3))
    assert isinstance(r.calibration, ExitCalibration) and r.calibration.layers == (0, 1)
    assert r.layers == (0, 1) and r.target_agreement == 0.3
    r = resolve(SelfSpeculative(draft="exit", exit_layer=1, calibration=tmp_path / "exits.pt"))
    assert isinstance(r.calibration, ExitCalibration)
    forced = SkipCalibration(**{**skip.__dict__, "skip": (1,)})
    forced.save(tmp_path / "skip.pt")
    r = resolve(SelfSpeculative(draft="skip", skip_layers=str(tmp_path / "skip.pt")))
    assert r.skip_layers == (1,)
    # nothing to load: the same object
    plain = SelfSpeculative(draft="skip", skip_layers=(1,))
    assert resolve(plain) is plain
    snap = skimfx.SnapKV(budget=48, window=8)
    assert resolve(snap) is snap
    with pytest.raises(skimfx.RecipeError, match=r"EarlyExit\.calibration: no ExitCalibration file at .*nope\.pt"):
        resolve(EarlyExit(layers=1, calibration=str(tmp_path / "nope.pt"), target_agreement=0.9))
    with pytest.raises(skimfx.RecipeError, match=r"SelfSpeculative\.skip_layers: no SkipCalibration file .*nope\.pt"):
        resolve(SelfSpeculative(draft="skip", skip_layers=str(tmp_path / "nope.pt")))
    SkipCalibration(**{**skip.__dict__, "skip": ()}).save(tmp_path / "none.pt")     # it chose no layers
    with pytest.raises(skimfx.RecipeError, match="chose no layers"):
        resolve(SelfSpeculative(draft="skip", skip_layers=str(tmp_path / "none.pt")))


def test_each_calibration_gives_its_recipe(exits, skip):
    r = exits.recipe()
    assert isinstance(r, EarlyExit) and r.layers == (0, 1) and r.calibration is exits and r.target_agreement == 0.95
    r = exits.recipe(layers=1, target_agreement=0.5)
    assert r.layers == (1,) and r.target_agreement == 0.5
    r = exits.recipe(threshold=0.7)
    assert r.threshold == (0.7, 0.7) and r.target_agreement is None and r.calibration is exits
    empty = SkipCalibration(**{**skip.__dict__, "skip": ()})
    with pytest.raises(ValueError, match="chose no layers"):
        empty.recipe()
    r = SkipCalibration(**{**skip.__dict__, "skip": (2, 1)}).recipe(draft_tokens=3, adaptive=False)
    assert isinstance(r, SelfSpeculative) and r.draft == ("skip",) and r.skip_layers == (1, 2)
    assert r.draft_tokens == 3 and not r.adaptive
    r = delta_calibration().recipe()
    assert isinstance(r, skimfx.Delta) and r.selection_layers == (1, 3, 6) and r.budget == 0.1
