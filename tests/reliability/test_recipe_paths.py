"""Recipe-string values that are file paths keep their slashes; quoted values are taken verbatim; the
label of a recipe parses back to the same recipe."""
import re

import pytest

import skimfx
from skimfx import EarlyExit, SelfSpeculative, parse_recipe, recipe_label
from skimfx.calibrate import SkipCalibration
from skimfx.cli import main


@pytest.mark.parametrize("text, field, value", [
    ("selfspeculative:draft=skip,skip_layers=./cal/skip.st", "skip_layers", "./cal/skip.st"),
    ("selfspeculative:draft=skip,skip_layers=cal/skip.st", "skip_layers", "cal/skip.st"),
    ("selfspeculative:draft=skip,skip_layers=/abs/skip.st", "skip_layers", "/abs/skip.st"),
    ("selfspeculative:draft=skip,skip_layers=4/7", "skip_layers", (4, 7)),
    ("selfspeculative:draft=skip,skip_layers=5", "skip_layers", (5,)),
    ("earlyexit:layers=3,calibration=runs/exit cal/e.st,threshold=0.9", "calibration", "runs/exit cal/e.st"),
    ("earlyexit:layers=3,calibration='/data/a,b+c=d.st',threshold=0.9", "calibration", "/data/a,b+c=d.st"),
    ('earlyexit:layers=3,calibration="/data/it\'s.st",threshold=0.9', "calibration", "/data/it's.st"),
])
def test_path_values_keep_their_slashes(text, field, value):
    (r,) = parse_recipe(text)
    assert getattr(r, field) == value
    assert parse_recipe(recipe_label([r])) == [r]                   # the label reads back


def test_quotes_protect_separators_inside_a_composed_recipe():
    rs = parse_recipe("snapkv:budget=0.1+earlyexit:layers=3,calibration='x+y/z.st',threshold=0.8")
    assert isinstance(rs[1], EarlyExit) and rs[1].calibration == "x+y/z.st"
    with pytest.raises(skimfx.RecipeError, match="unclosed '"):
        parse_recipe("earlyexit:layers=3,calibration='x.st")


@pytest.mark.slow
def test_cli_loads_a_calibration_named_by_a_relative_path(tmp_path, monkeypatch, capsys, smollm2):
    monkeypatch.setattr(skimfx, "load_model", lambda name: smollm2)
    cal = SkipCalibration(num_layers=30, order=(11, 17), ablation={11: 0.9, 17: 0.8}, agreement=(1.0, 0.9, 0.8),
                          expected=(1.0, 1.2, 1.1), skip=(11, 17), draft_tokens=4, verify_cost=0.1)
    (tmp_path / "cal dir").mkdir()
    cal.save(tmp_path / "cal dir" / "skip.st")
    monkeypatch.chdir(tmp_path)
    assert main(["show", "--model", "smollm2-135m",
                 "--recipe", "selfspeculative:draft=skip,skip_layers=./cal dir/skip.st"]) == 0
    out = capsys.readouterr().out
    assert "drafts from skip (skipping layers [11, 17])" in out, out[-1500:]


@pytest.mark.parametrize("text, says", [
    ("promptdistill:layers=1,keep=1.5", "keep as a fraction must be in (0, 1), got 1.5"),
    ("promptdistill:layers=1,keep=many", "keep is, per selection layer, a number of prompt tokens (int) or a fraction"),
    ("gemfilter:layer=1,keep=0", "keep must be > 0"),
    ("promptdistill:keep=3", "missing parameter(s) layers"),
])
def test_bad_values_say_what_was_wrong(text, says):
    with pytest.raises(skimfx.RecipeError, match=re.escape(says)):
        parse_recipe(text)
