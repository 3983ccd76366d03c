"""Every autotune config of every Triton kernel computes the same result (interpreted).

On a GPU the autotuner may pick any config in a kernel's list, but the interpreter runs only the
first (tuning there would measure nothing), so each config is forced here in turn. Configs that
differ only in warps / pipeline stages are one case under the interpreter (it ignores both)."""
import importlib
import os
from contextlib import contextmanager

import pytest
import torch

from skimfx.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def all_configs(fn) -> list:
    """The full config list (``autotune_configs`` keeps only the first under the interpreter)."""
    old = os.environ.get("TRITON_INTERPRET", "0")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        cfgs = fn()
    finally:
        os.environ["TRITON_INTERPRET"] = old
    seen, out = set(), []
    for c in cfgs:
        key = tuple(sorted(c.kwargs.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


@contextmanager
def forced(kernel, cfg):
    saved = kernel.configs
    kernel.configs = [cfg]
    try:
        yield
    finally:
        kernel.configs = saved


def module(name):
    """The kernel module itself (the package re-exports functions under the same names)."""
    return importlib.import_module(f"skimfx.kernels.{name}")


def cases():
    A, C, P, S = (module(n) for n in ("attention", "compact", "kv_pages", "token_scores"))

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(1, 4, 37, 16), r(1, 2, 50, 16), r(1, 2, 50, 16)
    qs, kl = torch.tensor([13]), torch.tensor([50])
    kv2, kl2 = r(2, 2, 45, 16), torch.tensor([45, 30])
    idx = torch.randint(0, 45, (2, 2, 70), generator=g)
    qw, qpos = r(2, 4, 5, 16), torch.tensor([40, 25])
    kmin, kmax = P.page_minmax_ref(kv2, kl2, 8)
    yield ("prefill", A._attn_prefill_kernel, A._prefill_configs,
           lambda: A.attention_triton(q, k, v, qs, kl, 0.25), lambda: A.attention_ref(q, k, v, qs, kl, 0.25))
    for name, kern in (("stats", S._softmax_stats_kernel), ("scores", S._scores_kernel)):
        yield (f"token_scores.{name}", kern, S._key_tile_configs,
               lambda: S.token_scores_triton(qw, kv2, qpos, kl2, 0.25, softmax=True, heads="mean"),
               lambda: S.token_scores_ref(qw, kv2, qpos, kl2, 0.25, softmax=True, heads="mean"))
    yield ("token_scores.pool", S._pool_kernel, S._pool_configs,
           lambda: S.token_scores_triton(qw, kv2, qpos, kl2, 0.25, pool="avg", pool_kernel=5),
           lambda: S.token_scores_ref(qw, kv2, qpos, kl2, 0.25, pool="avg", pool_kernel=5))
    yield ("gather_kv", C._gather_kv_kernel, C._gather_configs,
           lambda: C.gather_kv_triton(kv2, idx), lambda: C.gather_kv_ref(kv2, idx))
    yield ("page_minmax", P._page_minmax_kernel, lambda: P._page_configs(16),
           lambda: P.page_minmax_triton(kv2, kl2, 8), lambda: P.page_minmax_ref(kv2, kl2, 8))
    yield ("page_scores", P._page_scores_kernel, lambda: P._page_configs(32),
           lambda: P.page_scores_triton(qw[:, :, 0], kmin, kmax, kl2, 8),
           lambda: P.page_scores_ref(qw[:, :, 0], kmin, kmax, kl2, 8))
    yield from fused_cases(r)


def fused_cases(r):
    G, N, R = (module(n) for n in ("activation", "norm", "rope"))

    x, res, w = r(3, 7, 40), r(3, 7, 40), r(40)
    gu = r(5, 2 * 24)
    q, k, cos, sin = r(2, 6, 5, 16), r(2, 2, 5, 16), r(1, 5, 16), r(1, 5, 16)
    yield ("rms_norm", N._rms_norm_kernel, N._configs,
           lambda: N.rms_norm_triton(x, w, 1e-6, 1.0), lambda: N.rms_norm_ref(x, w, 1e-6, 1.0))
    yield ("add_rms_norm", N._rms_norm_kernel, N._configs,
           lambda: N.add_rms_norm_triton(x, res, w, 1e-6), lambda: N.add_rms_norm_ref(x, res, w, 1e-6))
    yield ("glu", G._glu_kernel, G._configs,
           lambda: G.glu_triton(gu[:, :24], gu[:, 24:], "silu"), lambda: G.glu_ref(gu[:, :24], gu[:, 24:], "silu"))
    yield ("rope", R._rope_kernel, R._configs,
           lambda: R.rope_triton(q, k, cos, sin), lambda: R.rope_ref(q, k, cos, sin))
    E = module("exit_confidence")
    h, lm = r(2, 72), r(700, 72)
    yield ("exit_confidence", E._exit_confidence_kernel, E._configs,
           lambda: E.exit_confidence_triton(h, lm), lambda: E.exit_confidence_ref(h, lm))


CASES = list(cases()) if HAS_TRITON else []


@pytest.mark.parametrize("name,kernel,configs,run,ref", CASES, ids=[c[0] for c in CASES])
def test_every_config_matches_the_reference(name, kernel, configs, run, ref):
    want = ref()
    cfgs = all_configs(configs)
    assert cfgs, name
    for cfg in cfgs:
        with forced(kernel, cfg):
            got = run()
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name} {cfg}: {m}")
