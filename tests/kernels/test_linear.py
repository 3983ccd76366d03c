"""kernels.linear: F.linear's math on every shape; the weight-streaming CPU path for decode-shaped
inputs, and F.linear wherever that path does not apply (gradients, other dtypes, strided weights)."""
import sys

import pytest
import torch
import torch.nn.functional as F

from skimfx.kernels.linear import SMALL_M, _small_m, linear, linear_packable, packed_bytes


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


@pytest.mark.parametrize("path", ["torch", "stream", "onednn", "packed"])
def test_every_cpu_path_computes_f_linear(path, monkeypatch):
    lin = sys.modules["skimfx.kernels.linear"]

    monkeypatch.setenv(lin.PATH_ENV, path)
    monkeypatch.setattr(lin, "_CHOICE", {})
    w, b = torch.randn(40, 24), torch.randn(40)
    for m in (1, 3):
        x = torch.randn(m, 24)
        for packable, fn in ((False, linear), (True, linear_packable)):
            applies = {"onednn": m == 1 and lin._ONEDNN, "packed": m > 1 and packable and lin._ONEDNN}
            expect = path if applies.get(path, True) else "torch"
            assert lin.choose_path(x, w, b, packable) == expect
            with torch.inference_mode():
                torch.testing.assert_close(fn(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.modules["skimfx.kernels.linear"]._ONEDNN, reason="this torch build has no oneDNN")
def test_packed_copy_is_lazy_follows_in_place_changes_and_dies_with_the_weight(monkeypatch):
    import gc

    lin = sys.modules["skimfx.kernels.linear"]
    monkeypatch.setenv(lin.PATH_ENV, "packed")
    monkeypatch.setattr(lin, "_CHOICE", {})
    monkeypatch.setattr(lin, "_PACKED", {})
    w, x = torch.randn(48, 32), torch.randn(4, 32)
    with torch.inference_mode():
        linear(x, w)                                        # not lowered as packable: no copy
        linear_packable(x[:1], w)                           # one row: the weight as it is
        assert packed_bytes() == 0
        torch.testing.assert_close(linear_packable(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert packed_bytes() == w.numel() * 4
        first = lin._PACKED[id(w)][2]
        linear_packable(x, w)
        assert lin._PACKED[id(w)][2] is first               # made once
    with torch.no_grad():
        w.mul_(-2.0)                                        # the user changes the weight in place
    with torch.inference_mode():
        torch.testing.assert_close(linear_packable(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert lin._PACKED[id(w)][2] is not first
    del w, first
    gc.collect()
    assert packed_bytes() == 0 and not lin._PACKED        # the copy goes with the weight


def test_a_copy_that_measured_slower_is_freed(monkeypatch):
    lin = sys.modules["skimfx.kernels.linear"]
    monkeypatch.delenv(lin.PATH_ENV, raising=False)
    monkeypatch.setattr(lin, "_CHOICE", {})
    monkeypatch.setattr(lin, "_PACKED", {})
    speeds = {"torch": 1.0, "stream": 1.0, "onednn": 1.0, "packed": 2.0}

    def fake_time(path, rows, weight, bias):
        lin._run(path, rows, weight, bias)                  # makes the copy, as the real timing does
        return speeds[path]

    monkeypatch.setattr(lin, "_time", fake_time)
    w = torch.randn(16, 8)
    with torch.inference_mode():
        assert lin.choose_path(torch.randn(3, 8), w, None, packable=True) == "torch"
        assert packed_bytes() == 0
        if lin._ONEDNN:
            speeds["packed"] = 0.2
            assert lin.choose_path(torch.randn(5, 8), w, None, packable=True) == "packed"
            assert packed_bytes() == w.numel() * 4


def test_compile_lowers_to_the_packable_kernel_unless_told_not_to():
    import skimfx
    from skimfx.kernels.linear import linear as plain
    from tiny import tiny_model

    model = tiny_model("qwen2")
    targets = {}
    for pack in (True, False):
        cm = skimfx.compile(model, pack_weights=pack)
        targets[pack] = {n.target for s in cm.program.stages for n in s.module.graph.nodes
                         if n.op == "call_function" and n.target in (plain, linear_packable)}
        assert cm.program.pack_weights is pack
    assert targets == {True: {linear_packable}, False: {plain}}


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
    assert lin.choose_path(torch.randn(4, 8), w, None) == "torch"           # 3 and 4 rows share a bucket
    assert len(timed) == 2
    assert lin.choose_path(torch.randn(5, 8), w, None) == "stream"          # a new bucket is measured
    assert [lin.measure_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 24)] == [1, 2, 4, 4, 8, 8, 16, 16, 32, 32]
    if lin._ONEDNN:
        speeds["onednn"] = 0.3
        assert lin.choose_path(torch.randn(1, 8), w, None) == "onednn"


def test_a_bad_forced_path_is_a_clear_error(monkeypatch):
    lin = sys.modules["skimfx.kernels.linear"]

    monkeypatch.setenv(lin.PATH_ENV, "fastest")
    monkeypatch.setattr(lin, "_CHOICE", {})
    with pytest.raises(ValueError, match="SKIMFX_CPU_LINEAR='fastest': expected auto or one of torch, stream, onednn"):
        linear(torch.randn(2, 8), torch.randn(4, 8))
