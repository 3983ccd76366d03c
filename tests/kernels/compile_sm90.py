"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one, launching nothing.

The interpreter (how the tests run the kernels on CPU) executes the Python of a kernel, not what the
compiler accepts: code the interpreter runs can still fail to compile for a real GPU, or need more
shared memory than the chip has. This script builds each kernel down to a cubin for sm_90 (each
autotuner's default config; ``--all-configs``: every config its pruning keeps, ~3 minutes on 2 cores),
on the argument shapes of bench/kernels.py's quick sweep and
of the runtime's other variants (sliding window, soft-capping, a shared index set, head dim 256, the
GELU activations, Quest page metadata), and prints one JSON line: every kernel skimfx defines, the
kernels built, each build's shared memory, and the failures.

It stands in for the GPU through Triton's own hooks: a driver that names an sm_90 target, kernel
launches turned into compile-only warm-ups, and autotuners that build every config instead of timing
them. Run in a process of its own with TRITON_INTERPRET unset (the kernels must be decorated as
compiled kernels). Exit 2 when the installed Triton lacks those hooks.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SM90_SHARED_BYTES = 227 * 1024          # the most shared memory one block may use on an H100 / H200


def install_compile_only_hooks(builds: list, all_configs: bool) -> None:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class Sm90Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(Sm90Driver())
    jit_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        builds.append(dict(kernel=self.fn.__name__, shared=int(kernel.metadata.shared),
                           cubin=len(kernel.asm.get("cubin", b""))))
        return kernel

    def build_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
            for config in configs if all_configs else configs[:1]:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    JITFunction.run = compile_only
    Autotuner.run = build_every_config


def runtime_variants(K, torch):
    """Kernel variants the runtime launches beyond the quick sweep's."""
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dt)

    k = r(2, 3, 300, 64)
    kv_len = torch.tensor([300, 123], dtype=torch.int32)
    shared_index = torch.randint(0, 300, (2, 40), generator=g).to(torch.int32)
    one = torch.tensor([100], dtype=torch.int32)
    return {
        "page_minmax": lambda: K.page_minmax_triton(k, kv_len, 16),
        "prefill, window + softcap": lambda: K.attention_triton(
            r(2, 9, 300, 64), k, k, torch.zeros(2, dtype=torch.int32), kv_len, 0.125, window=64, softcap=30.0),
        "decode, window + softcap": lambda: K.attention_triton(
            r(2, 9, 1, 64), k, k, kv_len - 1, kv_len, 0.125, window=64, softcap=30.0),
        "sparse decode, shared index + softcap": lambda: K.sparse_attention_triton(
            r(2, 9, 64), k, k, shared_index, kv_len, 0.125, softcap=30.0),
        "decode, head dim 256": lambda: K.attention_triton(
            r(1, 4, 1, 256), r(1, 1, 100, 256), r(1, 1, 100, 256), one - 1, one, 0.0625),
        "glu gelu_tanh": lambda: K.glu_triton(r(4, 64), r(4, 64), "gelu_tanh"),
        "glu gelu": lambda: K.glu_triton(r(4, 64), r(4, 64), "gelu"),
    }


def defined_kernels() -> list[str]:
    """The names of every Triton kernel in skimfx.kernels (autotuned or plain)."""
    import skimfx.kernels
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    names = set()
    for info in pkgutil.iter_modules(skimfx.kernels.__path__):
        mod = importlib.import_module(f"skimfx.kernels.{info.name}")
        for name, obj in vars(mod).items():
            fn = obj
            while isinstance(fn, Autotuner):
                fn = fn.fn
            if isinstance(fn, JITFunction) and (fn is not obj or name.endswith("_kernel")):
                names.add(fn.fn.__name__)
    return sorted(names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all-configs", action="store_true", help="build every autotune config, not only the default")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_sm90.py needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import skimfx.kernels as K                      # decorated as compiled kernels (no interpreter)
    from skimfx.kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        print("triton is not installed", file=sys.stderr)
        return 2
    builds: list = []
    try:
        install_compile_only_hooks(builds, args.all_configs)
    except (ImportError, AttributeError) as e:
        print(f"this Triton lacks the hooks a compile-only build needs: {e}", file=sys.stderr)
        return 2
    import kernels as sweep                          # bench/kernels.py

    calls = {c.key: c.check[0] for c in sweep.cases("cpu", torch.bfloat16, quick=True, gpu_shapes=False,
                                                    with_triton=True) if c.check is not None}
    calls.update(runtime_variants(K, torch))
    failures = {}
    with torch.inference_mode():
        for name, call in calls.items():
            try:
                call()
            except Exception as e:  # noqa: BLE001 - every failure is reported, the others still build
                failures[name] = f"{type(e).__name__}: {str(e)[:1500]}"
    print(json.dumps(dict(kernels=defined_kernels(), calls=sorted(calls), builds=builds, failures=failures,
                          shared_limit=SM90_SHARED_BYTES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
