"""Shared fixtures. Triton kernels run under the interpreter on CPU (set before triton is imported)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _compile(pair):
    import skimfx

    model, tok = pair
    return skimfx.compile(model, tokenizer=tok)


@pytest.fixture(scope="session")
def smollm2():
    import skimfx

    return skimfx.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2):
    return _compile(smollm2)


@pytest.fixture(scope="session")
def gemma3():
    import skimfx

    return skimfx.load_model("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_compiled(gemma3):
    return _compile(gemma3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REAL_MODEL_FIXTURES = {"smollm2", "smollm2_compiled", "gemma3", "gemma3_compiled"}


def pytest_collection_modifyitems(config, items):
    """A test that takes a real-model fixture is slow whether or not it says so."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_lane_loads_no_real_model(request, monkeypatch):
    """Outside the slow lane, loading an embedded model fails the test: the fast lane
    (``pytest -m "not slow"``) must never pay for one. Mark such a test ``@pytest.mark.slow``."""
    if request.node.get_closest_marker("slow"):
        return
    from skimfx import models

    def refuse(*a, **k):
        raise AssertionError(f"{request.node.nodeid} loads a real model but is not marked @pytest.mark.slow")

    def refuse_build(entry, cached):
        models._gguf_path(entry)           # a missing or damaged GGUF still reports itself first
        refuse()

    monkeypatch.setattr(models, "_load_cached", refuse)
    monkeypatch.setattr(models, "_build_cache", refuse_build)
