"""kernels.linear: F.linear's math on every shape; the weight-streaming CPU path for decode-shaped
inputs, and F.linear wherever that path does not apply (gradients, other dtypes, strided weights)."""
import sys

import pytest
import torch
import torch.nn.functional as F

from skimfx.kernels.linear import SMALL_M, _small_m, linear


@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (1, 1, 96), (3, 5, 96), (SMALL_M, 96), (SMALL_M + 1, 96),
                                   (2, 300, 96), (0, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(shape, bias):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    w = torch.randn(70, 96, generator=g)
    b = torch.randn(70, generator=g) if bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
        ref = F.linear(x, w, b)
    assert got.shape == ref.shape == (*shape[:-1], 70)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_which_inputs_take_the_streaming_path():
    w = torch.randn(64, 32)
    with torch.no_grad():
        assert _small_m(torch.randn(1, 32), w, None)
        assert _small_m(torch.randn(2, 4, 32), w, torch.zeros(64))
        assert not _small_m(torch.randn(SMALL_M + 1, 32), w, None)           # prefill-sized: F.linear
        assert not _small_m(torch.randn(2, 32).bfloat16(), w.bfloat16(), None)  # fp32 only
        assert not _small_m(torch.randn(2, 32), w.T.contiguous().T, None)    # strided weight
        assert not _small_m(torch.randn(0, 32), w, None)
    w.requires_grad_(True)
    assert not _small_m(torch.randn(2, 32), w, None)                          # autograd: F.linear
    with torch.no_grad():
        assert _small_m(torch.randn(2, 32), w, None)


def test_gradients_flow_through_the_fallback():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(2, 16, requires_grad=True)
    linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.detach().sum(0)[None].expand(8, 16))
    torch.testing.assert_close(x.grad, w.detach().sum(0)[None].expand(2, 16))


def test_strided_weight_and_other_dtypes_are_exact():
    x = torch.randn(3, 32)
    w = torch.randn(32, 64).T                                                    # [64, 32], not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
        xb, wb = x.bfloat16(), w.contiguous().bfloat16()
        assert torch.equal(linear(xb, wb), F.linear(xb, wb))


def test_shape_mismatch_raises_like_f_linear():
    with pytest.raises(RuntimeError):
        linear(torch.randn(2, 31), torch.randn(8, 32))


@pytest.mark.parametrize("path", ["torch", "stream", "onednn"])
def test_every_cpu_path_computes_f_linear(path, monkeypatch):
    lin = sys.modules["skimfx.kernels.linear"]

    monkeypatch.setenv(lin.PATH_ENV, path)
    monkeypatch.setattr(lin, "_CHOICE", {})
    w, b = torch.randn(40, 24), torch.randn(40)
    for m in (1, 3):
        x = torch.randn(m, 24)
        expect = path if path != "onednn" or (m == 1 and lin._ONEDNN) else "torch"
        assert lin.choose_path(x, w, b) == expect
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_auto_measures_once_per_shape_and_keeps_f_linear_on_a_near_tie(monkeypatch):
    lin = sys.modules["skimfx.kernels.linear"]

    monkeypatch.delenv(lin.PATH_ENV, raising=False)
    monkeypatch.setattr(lin, "_CHOICE", {})
    timed = []
    speeds = {"torch": 1.0, "stream": 0.95, "onednn": 0.5}     # stream within MARGIN: F.linear stays

    def fake_time(path, rows, weight, bias):
        timed.append(path)
        return speeds[path]

    monkeypatch.setattr(lin, "_time", fake_time)
    w = torch.randn(16, 8)
    assert lin.choose_path(torch.randn(3, 8), w, None) == "torch"
    assert lin.choose_path(torch.randn(3, 8), w, None) == "torch" and timed == ["torch", "stream"]
    speeds["stream"] = 0.5
    assert lin.choose_path(torch.randn(4, 8), w, None) == "stream"          # a new shape is measured
    if lin._ONEDNN:
        speeds["onednn"] = 0.3
        assert lin.choose_path(torch.randn(1, 8), w, None) == "onednn"


def test_a_bad_forced_path_is_a_clear_error(monkeypatch):
    lin = sys.modules["skimfx.kernels.linear"]

    monkeypatch.setenv(lin.PATH_ENV, "fastest")
    monkeypatch.setattr(lin, "_CHOICE", {})
    with pytest.raises(ValueError, match="SKIMFX_CPU_LINEAR='fastest': expected auto or one of torch, stream, onednn"):
        linear(torch.randn(2, 8), torch.randn(4, 8))
