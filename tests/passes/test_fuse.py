"""The fuse pass: pattern rewrites counted per layer, fused logits equal to the unfused graph and to
HF, merged projections sharing the model's storage, and patterns that must not match."""
import pytest
import torch
import torch.nn.functional as F

import skimfx
from skimfx.kernels.activation import glu
from skimfx.kernels.linear import linear_packable as linear  # compile lowers to the packable kernel by default
from skimfx.kernels.norm import add_rms_norm, rms_norm
from skimfx.kernels.rope import rope
from skimfx.passes import fuse_graph
from tiny import tiny_configs, tiny_model

ARCHS = list(tiny_configs())


def expected_counts(arch: str, L: int) -> dict:
    """Norms per layer differ by architecture; every other pattern fires once per layer."""
    plain = {"llama": 1, "qwen2": 1, "mistral": 1, "qwen3": 3, "gemma3": 5}[arch]   # qwen3/gemma3: q/k-norm
    return {"fuse.rms_norm": plain * L + 1, "fuse.add_rms_norm": L, "fuse.rope": L, "fuse.glu": L,
            "fuse.qkv": L, "fuse.gate_up": L}


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for arch in ARCHS:
        m = tiny_model(arch)
        out[arch] = (m, skimfx.compile(m, fuse=False), skimfx.compile(m))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_are_per_layer(pairs, arch):
    model, plain, fused = pairs[arch]
    L = model.config.num_hidden_layers
    hist = dict(fused.program.history)
    assert {k: v for k, v in hist.items() if k.startswith("fuse.")} == expected_counts(arch, L)
    assert not any(k.startswith("fuse") for k, _ in plain.program.history)
    # nothing of the unfused chains is left in the layer graphs
    aten = torch.ops.aten
    for stage in fused.program.layer_stages:
        targets = [n.target for n in stage.module.graph.nodes if n.op == "call_function"]
        assert aten.rsqrt.default not in targets and aten.neg.default not in targets
        assert aten.silu.default not in targets and aten.gelu.default not in targets
        assert sum(t is linear for t in targets) == 4          # qkv, o, gate_up, down (lowered after fusion)
        assert targets.count(rope) == 1 and targets.count(glu) == 1 and targets.count(add_rms_norm) == 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T", [1, 37])
def test_fused_logits_equal_unfused_and_hf(pairs, arch, T):
    model, plain, fused = pairs[arch]
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = model(ids).logits
    a, b = plain(ids).logits, fused(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (b - ref).abs().max().item() <= 1e-4


def test_fused_generation_equals_unfused_with_recipes(pairs):
    model, _, _ = pairs["llama"]
    ids = torch.randint(0, 512, (1, 60), generator=torch.Generator().manual_seed(1))
    for recipe in (None, "promptdistill:layers=1,keep=24", "snapkv:budget=32,window=8"):
        a = skimfx.compile(model, recipe, fuse=False).generate(input_ids=ids, max_new_tokens=12)
        b = skimfx.compile(model, recipe).generate(input_ids=ids, max_new_tokens=12)
        assert a.tokens == b.tokens, recipe


def test_merged_projections_share_the_models_storage():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
    cm = skimfx.compile(model)
    attn = model.model.layers[0].self_attn
    merged = cm.program.stage("layer.0").module.model_layers_0_self_attn_qkv_weight
    assert merged.shape == (attn.q_proj.weight.shape[0] + 2 * attn.k_proj.weight.shape[0], attn.q_proj.weight.shape[1])
    # the model's q/k/v parameters are now views of the merged buffer: same values, no second copy
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
        assert p.untyped_storage().data_ptr() == merged.untyped_storage().data_ptr()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # a second compile finds the blocks already adjacent and reuses the buffer
    cm2 = skimfx.compile(model)
    merged2 = cm2.program.stage("layer.0").module.model_layers_0_self_attn_qkv_weight
    assert merged2.data_ptr() == merged.data_ptr()
    assert torch.equal(cm2(ids).logits, cm(ids).logits)


def test_qwen2_biases_are_merged_too(pairs):
    _, _, fused = pairs["qwen2"]
    gm = fused.program.stage("layer.0").module
    lin = [n for n in gm.graph.nodes if n.target is linear and len(n.args) == 3]
    assert len(lin) == 1 and "qkv_bias" in lin[0].args[2].target


# ------------------------------------------------------------------------------- single-pattern graphs

class LlamaNorm(torch.nn.Module):
    def __init__(self, n=24, dim=-1, keepdim=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x):
        var = x.pow(2).mean(self.dim, keepdim=self.keepdim)
        if not self.keepdim:
            var = var.unsqueeze(-1)
        return self.weight * (x * torch.rsqrt(var + 1e-6))


class ResidualNorm(torch.nn.Module):
    def __init__(self, n=24):
        super().__init__()
        self.norm = LlamaNorm(n)

    def forward(self, a, b):
        h = a + b
        return h * 2, self.norm(h)


class Rope(torch.nn.Module):
    def __init__(self, swap=False):
        super().__init__()
        self.swap = swap

    def forward(self, q, k, cos, sin):
        def rot(x):
            h = x.shape[-1] // 2
            lo, hi = x[..., :h], x[..., h:]
            return torch.cat((-lo, hi), -1) if self.swap else torch.cat((-hi, lo), -1)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rot(q) * s, k * c + rot(k) * s


class Mlp(torch.nn.Module):
    def __init__(self, share_input=True, bias=(False, False), broadcast=False):
        super().__init__()
        self.gate_proj = torch.nn.Linear(16, 32, bias=bias[0])
        self.up_proj = torch.nn.Linear(16, 1 if broadcast else 32, bias=bias[1])
        self.share_input = share_input

    def forward(self, x, y):
        return F.silu(self.gate_proj(x)) * self.up_proj(x if self.share_input else y)


class Block(torch.nn.Module):
    """Holds the MLP as ``.mlp``, as a decoder layer does (the merged projections are named by it)."""

    def __init__(self, **kw):
        super().__init__()
        self.mlp = Mlp(**kw)

    def forward(self, x, y):
        return self.mlp(x, y)


def exported(mod, *args):
    return torch.export.export(mod.eval(), args).module()


def check(mod, args, patterns, expect):
    gm = exported(mod, *args)
    with torch.no_grad():
        ref = mod(*args)
        counts = fuse_graph(gm, patterns)
        got = gm(*args)
    assert {k: v for k, v in counts.items() if v} == expect
    for r, g in zip(ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    return gm


def test_rms_norm_variants():
    x = torch.randn(2, 5, 24)
    gm = check(LlamaNorm(), (x,), ("rms_norm",), {"rms_norm": 1})
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [rms_norm]
    check(ResidualNorm(), (x, torch.randn(2, 5, 24)), ("rms_norm", "add_rms_norm"), {"add_rms_norm": 1})
    # only the plain pattern asked for: the add stays, the norm is still fused
    check(ResidualNorm(), (x, torch.randn(2, 5, 24)), ("rms_norm",), {"rms_norm": 1})


@pytest.mark.parametrize("mod", [LlamaNorm(dim=1), LlamaNorm(keepdim=False)], ids=["mean-over-dim-1", "no-keepdim"])
def test_rms_norm_lookalikes_are_left_alone(mod):
    x = torch.randn(2, 24, 24)
    check(mod, (x,), ("rms_norm", "add_rms_norm"), {})


def test_rope_pairs_q_and_k_and_refuses_the_wrong_rotation():
    q, k = torch.randn(2, 6, 7, 8), torch.randn(2, 2, 7, 8)
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    check(Rope(), (q, k, cos, sin), ("rope",), {"rope": 1})
    check(Rope(swap=True), (q, k, cos, sin), ("rope",), {})


def test_glu_and_merge_linears():
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    gm = check(Block(), (x, y), ("glu", "gate_up"), {"glu": 1, "gate_up": 1})
    assert sum(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes) == 1
    check(Mlp(), (x, y), ("gate_up",), {"linears": 1})      # siblings outside an mlp/attn module: "linears"
    check(Block(bias=(True, True)), (x, y), ("glu", "gate_up"), {"glu": 1, "gate_up": 1})
    check(Block(share_input=False), (x, y), ("glu", "gate_up"), {"glu": 1})          # different inputs: no merge
    check(Block(bias=(True, False)), (x, y), ("glu", "gate_up"), {"glu": 1})         # one bias: no merge
    check(Block(broadcast=True), (x, y), ("glu",), {})                                # broadcasting mul: no glu


def test_second_fuse_finds_nothing(pairs):
    _, _, fused = pairs["gemma3"]
    for stage in fused.program.stages:
        assert not any(fuse_graph(stage.module).values())


def test_unknown_pattern_is_an_error():
    with pytest.raises(ValueError, match="unknown patterns"):
        fuse_graph(exported(LlamaNorm(), torch.randn(2, 24)), ("rmsnorm",))
