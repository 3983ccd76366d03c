#!/usr/bin/env bash
# The GPU check, in one script (at most 10 minutes: every step has its own time limit).
#   1. every Triton kernel against its fp32 torch reference on CUDA, in fp16 and bf16;
#   2. bench/kernels.py: each op over a shape sweep vs torch SDPA / flash-attn / the eager ops,
#      GB/s, TFLOP/s and the fraction of the roofline, and the H100 targets read off the table;
#   3. bench/fuse.py: the end-to-end dense decode/prefill on the GPU, HF generate vs skimfx unfused vs
#      fused (the embedded models' architectures; random weights when their GGUFs are not installed);
#   4. bench/attention_share.py (with the embedded model installed): dense decode at 1k-8k vs a short
#      context and DELTA at 4k/8k, the KV-selection speed target measured where attention dominates;
#   5. one table: bench/results/gpu.md (+ kernels_cuda.md/json, fuse_cuda.md/json, attention_share_cuda.md/json).
# Without a GPU it runs the CPU half (Triton interpreted on tiny shapes, pytest-benchmark timings) into
# $GPU_BENCH_OUT (default: a temporary folder), which is what the test suite does.
# Needs: python with torch (CUDA build on a GPU machine) and triton; skimfx is used from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  OUT=${GPU_BENCH_OUT:-bench/results}
  mkdir -p "$OUT"
  {
    echo "# GPU check"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed"
    echo '```'
    echo
  } > "$OUT/gpu.md"
  status=0
  timeout 300 "$PY" bench/kernels.py --device cuda --check --out "$OUT" || status=$?
  cat "$OUT/kernels_cuda.md" >> "$OUT/gpu.md" 2>/dev/null || echo "bench/kernels.py failed (exit $status)" >> "$OUT/gpu.md"
  weights=--random-weights
  "$PY" -c "import skimfx.models as m; m._gguf_path(m.EMBEDDED['smollm2-135m'])" 2>/dev/null && weights=
  e2e=0
  timeout 150 "$PY" bench/fuse.py --device cuda --dtype bfloat16 $weights --models smollm2-135m \
      --lengths 512,2048 --new-tokens 32 --repeats 2 --out "$OUT" || e2e=$?
  { echo; cat "$OUT/fuse_cuda.md" 2>/dev/null || echo "bench/fuse.py failed (exit $e2e)"; } >> "$OUT/gpu.md"
  # decode at 1k-8k vs a short context (attention's share, the bound on any KV selection) and DELTA next to it
  if [ -z "$weights" ]; then
    timeout 120 "$PY" bench/attention_share.py --device cuda --dtype bfloat16 --out "$OUT" || e2e=$?
    { echo; cat "$OUT/attention_share_cuda.md" 2>/dev/null || echo "bench/attention_share.py failed"; } >> "$OUT/gpu.md"
  fi
  echo "wrote $OUT/gpu.md"
  [ "$status" -eq 0 ] && [ "$e2e" -eq 0 ]
else
  OUT=${GPU_BENCH_OUT:-$(mktemp -d)}
  echo "no CUDA device: running the CPU half into $OUT"
  TRITON_INTERPRET=1 timeout 300 "$PY" bench/kernels.py --device cpu --quick --check --out "$OUT"
fi
