"""exit_confidence (LM head + online softmax -> top-1, probability, top-2 margin): Triton (interpreted)
against the reference, the reference against a plain softmax over full logits, and the edge cases."""
import pytest
import torch

from skimfx.kernels import HAS_TRITON, exit_confidence, exit_confidence_ref, exit_confidence_triton


def _plain(h, w, softcap=None):
    z = h.double() @ w.double().T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    p = torch.softmax(z, -1)
    top = p.topk(2, dim=-1)
    return z.argmax(-1), top.values[:, 0], top.values[:, 0] - top.values[:, 1]


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_reference_is_the_softmax_of_the_full_logits(softcap):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 48, generator=g), torch.randn(1000, 48, generator=g)
    for a, b in zip(exit_confidence_ref(h, w, softcap), _plain(h, w, softcap)):
        torch.testing.assert_close(a.double() if a.is_floating_point() else a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("N,H,V,softcap,dtype", [(1, 64, 1000, None, torch.float32), (3, 40, 517, None, torch.float32),
                                                 (2, 64, 3000, 30.0, torch.float32), (2, 64, 1300, None, torch.float16)])
def test_triton_matches_the_reference(N, H, V, softcap, dtype):
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(N, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) / 4).to(dtype)
    top, p, m = exit_confidence_triton(h, w, softcap)
    rtop, rp, rm = exit_confidence_ref(h, w, softcap)
    assert top.tolist() == rtop.tolist()
    torch.testing.assert_close(p, rp, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(m, rm, atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_ties_pick_the_first_token_and_margin_zero():
    h = torch.ones(1, 8)
    w = torch.zeros(600, 8)
    w[[5, 450]] = 1.0                          # two equal maxima in different vocabulary splits
    for fn in (exit_confidence_ref, exit_confidence_triton):
        top, p, m = fn(h, w)
        assert top.item() == 5 and m.item() == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"h must be \[N, H\]"):
        exit_confidence(torch.zeros(2, 3, 4), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="weight"):
        exit_confidence(torch.zeros(2, 4), torch.zeros(10, 5))
