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
