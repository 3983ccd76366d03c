"""Calibrations: measurements on real text that choose a recipe's parameters, saved to plain files.

What lives here: exit adapters and thresholds for early exit (``exits``: ``calibrate_exits`` ->
``ExitCalibration``), the layers a Draft&Verify draft skips (``skip``: ``calibrate_skip`` ->
``SkipCalibration``), DELTA's select-layer placement (``delta``: ``calibrate_delta`` ->
``DeltaCalibration``), DuoAttention's retrieval / streaming heads (``duo``: ``calibrate_duo`` ->
``DuoCalibration``), calibration text that ships with the system (``texts``: ``reference_texts``),
what they share (``common``: the dense compiled model, tokenizing, the safe file format), and
``resolve``, which loads the calibration files a recipe names by path. Each calibration's
``.recipe(...)`` returns the recipe it calibrates.

Every calibration runs the model through the public stage executor (``runtime.Executor``). Files are
safetensors (tensors) with JSON metadata (everything else): reading one runs no code; a pickle file
(the older ``torch.save`` format) is refused with ``CalibrationFileError``, never unpickled.

May import: ``runtime``, ``recipes``, ``kernels``, ``program``, ``capture``, ``passes``. Imported only
by the top level (``skimfx/__init__.py``, ``cli``, ``eval``, ``bench``); recipes read calibrations by
their attributes and never import this package.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .common import CalibrationFileError
from .delta import DeltaCalibration, calibrate_delta
from .duo import DuoCalibration, calibrate_duo
from .exits import ExitAdapter, ExitCalibration, calibrate_exits
from .skip import SkipCalibration, calibrate_skip
from .steering import SteeringCalibration, calibrate_steering
from .texts import reference_texts


def resolve(recipe):
    """``recipe`` with the calibration files it names by path loaded: a ``calibration`` field that is a
    path becomes ``ExitCalibration.load(path)``, a ``skip_layers`` field that is a path becomes
    ``SkipCalibration.load(path)`` (the recipe's own validation turns it into the layer tuple). Anything
    else is returned unchanged. A file that cannot be loaded raises ``RecipeError`` naming the field,
    the file and what to do."""
    if not dataclasses.is_dataclass(recipe) or isinstance(recipe, type):
        return recipe
    names = {f.name for f in dataclasses.fields(recipe)}
    changes = {}
    for name, cls in (("calibration", ExitCalibration), ("skip_layers", SkipCalibration),
                      ("steering", SteeringCalibration)):
        if name == "calibration" and getattr(recipe, "calibration_kind", None) == "duo":
            cls = DuoCalibration                       # DuoAttention's head scores
        value = getattr(recipe, name, None) if name in names else None
        if isinstance(value, (str, Path)):
            try:
                changes[name] = cls.load(value)
            except CalibrationFileError as e:
                from ..recipes import RecipeError

                raise RecipeError(f"{type(recipe).__name__}.{name}: {e}") from None
    return dataclasses.replace(recipe, **changes) if changes else recipe


__all__ = ["ExitAdapter", "ExitCalibration", "calibrate_exits", "SkipCalibration", "calibrate_skip",
           "DeltaCalibration", "calibrate_delta", "reference_texts", "resolve", "CalibrationFileError",
           "SteeringCalibration", "calibrate_steering", "DuoCalibration", "calibrate_duo"]
