#!/usr/bin/env bash
# The GPU check, in one script (10 minutes at most: every step has its own time limit, and a step that
# fails or runs out of time leaves the others' results standing).
#   1. every Triton kernel against its fp32 torch reference on CUDA (bf16), then bench/kernels.py: each op
#      over a shape sweep vs torch SDPA / flash-attn / the eager ops, GB/s, TFLOP/s and the fraction of the
#      roofline, and the H100 targets read off the table;
#   2. bench/decode_step.py: the captured decode step replayed as a CUDA graph vs skimfx eager, HF eager and
#      HF static cache + torch.compile (host overhead on a tiny-dims 30-layer Llama; SmolLM2 dense / DELTA /
#      Quest / SnapKV at 512-8k, batch 1 and $GPU_BENCH_BATCH), with the policies' top-1 against dense;
#   3. bench/attention_share.py: dense decode at 1k-8k vs a short context, DELTA at 4k/8k next to it, at
#      batch 1 and batch $GPU_BENCH_BATCH (default 64);
#   4. bench/fuse.py: the end-to-end dense decode/prefill, HF generate vs skimfx unfused vs fused, and the
#      fused program's logits against the HF model's;
#   5. one summary: $OUT/gpu.md (+ kernels_cuda.*, decode_step_cuda.*, attention_share_cuda*.*, fuse_cuda.*, gpu.log).
# Steps 2-4 use SmolLM2-135M's real weights when its GGUF package is installed, else its architecture with
# random weights (the times are the same; the quality columns are then left out).
# $GPU_BENCH_ARCHIVE, if set, names a .tar.gz that is rewritten with everything after each step.
# Without a GPU it runs the CPU half (Triton interpreted on tiny shapes, pytest-benchmark timings) into
# $GPU_BENCH_OUT (default: a temporary folder), which is what the test suite does.
# Needs: python with torch (CUDA build on a GPU machine) and triton; skimfx is used from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  OUT=${GPU_BENCH_OUT:-$(mktemp -d)}
  echo "no CUDA device: running the CPU half into $OUT"
  TRITON_INTERPRET=1 timeout 300 "$PY" bench/kernels.py --device cpu --quick --check --out "$OUT"
  exit
fi

OUT=${GPU_BENCH_OUT:-bench/results}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
failed=()

snapshot() {  # everything so far into one archive (what survives a run cut short)
  [ -n "${GPU_BENCH_ARCHIVE:-}" ] && tar czf "$GPU_BENCH_ARCHIVE" -C "$OUT" . 2>/dev/null
  return 0
}

# step NAME SECONDS RESULT_MD COMMAND...: run with a time limit, append its table (or why it has none) to gpu.md
step() {
  local name=$1 limit=$2 md=$3 rc=0
  shift 3
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  if [ "$rc" -eq 0 ] && [ -f "$OUT/$md" ]; then
    { echo; cat "$OUT/$md"; } >>"$OUT/gpu.md"
  else
    failed+=("$name")
    { echo; echo "## $name: failed (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"; echo; echo '```';
      tail -n 15 "$LOG"; echo '```'; } >>"$OUT/gpu.md"
    [ -f "$OUT/$md" ] && { echo; cat "$OUT/$md"; } >>"$OUT/gpu.md"
  fi
  snapshot
}

{
  echo "# GPU check"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  "$PY" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed"
  echo '```'
} >"$OUT/gpu.md"
cat "$OUT/gpu.md"
: >"$LOG"

weights=--random-weights
"$PY" -c "import sys, skimfx.models as m; sys.exit(0 if m.installed('smollm2-135m') else 1)" \
  2>/dev/null && weights=
B=${GPU_BENCH_BATCH:-64}
# Kernels first: their checks compile every Triton kernel (on an H200 the first use of the model path spent
# ~2 minutes compiling and autotuning), and Triton keeps the builds on disk for the steps after.
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}   # autotune choices on disk too: later steps skip re-tuning
step "kernels: Triton vs reference, then the sweep" 150 kernels_cuda.md \
  "$PY" bench/kernels.py --device cuda --check --check-dtypes bfloat16 --time-budget 110 --out "$OUT"
# the captured decode step (CUDA graph) against skimfx eager, HF eager and HF static cache + torch.compile,
# dense / DELTA / Quest / SnapKV, with each policy's teacher-forced top-1 against dense
step "decode step: captured vs eager vs HF" 240 decode_step_cuda.md \
  "$PY" bench/decode_step.py --device cuda --dtype bfloat16 $weights --contexts 512,4096,8000 --batch 1,"$B" \
  --new-tokens 32 --repeats 2 --out "$OUT"
# the KV-selection question: decode time against context, dense and DELTA, at batch 1 and batch $B
step "attention share, batch 1" 90 attention_share_cuda.md \
  "$PY" bench/attention_share.py --device cuda --dtype bfloat16 $weights --lengths 1024,4096,8000 --repeats 3 --out "$OUT"
step "attention share, batch $B" 60 "attention_share_cuda_b$B.md" \
  "$PY" bench/attention_share.py --device cuda --dtype bfloat16 $weights --batch "$B" --lengths 2048,4096,8000 \
  --repeats 2 --new-tokens 32 --out "$OUT"
step "end to end: fused vs unfused vs HF" 60 fuse_cuda.md \
  "$PY" bench/fuse.py --device cuda --dtype bfloat16 $weights --models smollm2-135m --lengths 512,2048 \
  --new-tokens 32 --repeats 2 --prefill-repeats 5 --out "$OUT"

echo "wrote $OUT/gpu.md${failed[*]:+; failed: ${failed[*]}}"
[ "${#failed[@]}" -eq 0 ]
