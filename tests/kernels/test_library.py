"""Every kernel as ``torch.ops.skimfx.<op>``: registered, schema/fake-implementation checked with
``torch.library.opcheck``, equal to the Python wrapper, usable inside ``torch.compile`` (fullgraph),
and a fused, compiled stage generating the same tokens as eager."""
import pytest
import torch

import skimfx
from skimfx import kernels
from skimfx.kernels.library import OPS
from tiny import tiny_model


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    B, Hq, Hkv, S, D = 2, 6, 2, 23, 16
    q1, k, v = r(B, Hq, 1, D), r(B, Hkv, S, D), r(B, Hkv, S, D)
    kv_len, q_start = torch.tensor([23, 17]), torch.tensor([22, 16])
    index = torch.tensor([[[0, 3, 5, 22], [1, 2, 4, 6]], [[0, 1, 2, 16], [3, 4, 5, -1]]])
    kmin, kmax = kernels.page_minmax(k, kv_len, 8)
    x, w = r(3, 5, 40), r(40)
    gate_up = r(3, 2 * 24)
    q, kk = r(B, Hq, 7, D).transpose(1, 2).contiguous().transpose(1, 2), r(B, Hkv, 7, D)
    cos, sin = r(1, 7, D), r(1, 7, D)
    return {
        "attention": ((q1, k, v, q_start, kv_len, 0.25, None, None), kernels.attention),
        "sparse_attention": ((q1[:, :, 0], k, v, index, kv_len, 0.25, None), kernels.sparse_attention),
        "token_scores": ((r(B, Hq, 4, D), k, torch.tensor([19, 13]), kv_len, 0.25, True, "mean", "avg", 5),
                         lambda *a: kernels.token_scores(*a[:5], softmax=a[5], heads=a[6], pool=a[7],
                                                         pool_kernel=a[8])),
        "gather_kv": ((k, index), kernels.gather_kv),
        "page_minmax": ((k, kv_len, 8, 0, None), kernels.page_minmax),
        "page_scores": ((q1[:, :, 0], kmin, kmax, kv_len, 8), kernels.page_scores),
        "rms_norm": ((x, w, 1e-6, 1.0), kernels.rms_norm),
        "add_rms_norm": ((x, r(3, 5, 40), w, 1e-6, 0.0), kernels.add_rms_norm),
        "glu": ((gate_up[:, :24], gate_up[:, 24:], "silu"), kernels.glu),
        "rope": ((q, kk, cos, sin), kernels.rope),
        "exit_confidence": ((r(3, 40), r(300, 40), None), kernels.exit_confidence),
        "decode_attention_scores": ((q1, k, v, kv_len, 0.25, None), kernels.decode_attention_scores),
        "linear": ((r(2, 3, 40), r(24, 40), r(24)), kernels.linear),
    }


CASES = _cases()


def test_every_kernel_is_registered():
    assert set(CASES) == set(OPS)
    for name in OPS:
        assert hasattr(torch.ops.skimfx, name)


@pytest.mark.parametrize("name", OPS)
def test_op_equals_wrapper_and_passes_opcheck(name):
    args, wrapper = CASES[name]
    op = getattr(torch.ops.skimfx, name)
    got, ref = op(*args), wrapper(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_ops_inside_torch_compile_fullgraph():
    x, w = torch.randn(4, 9, 48), torch.randn(48)
    gu = torch.randn(4, 9, 64)
    q, k = torch.randn(4, 3, 9, 16), torch.randn(4, 1, 9, 16)
    cos, sin = torch.randn(4, 9, 16), torch.randn(4, 9, 16)

    def f(x, w, gu, q, k, cos, sin):
        h, y = torch.ops.skimfx.add_rms_norm(x, x, w, 1e-6, 0.0)
        y = torch.ops.skimfx.rms_norm(y, w, 1e-6, 1.0)
        a = torch.ops.skimfx.glu(gu[..., :32], gu[..., 32:], "gelu_tanh")
        qr, kr = torch.ops.skimfx.rope(q, k, cos, sin)
        return h.sum() + y.sum() + a.sum() + qr.sum() + kr.sum()

    args = (x, w, gu, q, k, cos, sin)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), f(*args))


@pytest.mark.slow          # torch.compile of every stage
def test_compiled_stages_generate_the_same_tokens():
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    eager = skimfx.compile(model)
    ref_logits, ref = eager(ids).logits, eager.generate(input_ids=ids, max_new_tokens=6).tokens
    cm = skimfx.compile(model).compile_stages(backend="inductor")
    assert all(not isinstance(s.module, torch.fx.GraphModule) for s in cm.program.stages)
    torch.testing.assert_close(cm(ids).logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert cm.generate(input_ids=ids, max_new_tokens=6).tokens == ref
