#!/usr/bin/env bash
# One-shot GPU check of the masked-attention CUDA kernels (crates/sgp-kernels), for a
# session that has a GPU machine. Run from anywhere; writes logs under $OUT (default
# ./ma_cuda_check). Steps, each logged and each allowed to fail without hiding the others:
#
#   0. nvidia-smi; NVRTC/nvJitLink compile of the .cu (register/spill report), if the
#      Python wheels are there.
#   1. build examples/masked_attention_check.rs with --features cuda (nvcc from PATH;
#      CUDA_COMPUTE_CAP from nvidia-smi). Skip by pointing MA_CHECK_BIN at a prebuilt
#      binary (e.g. built elsewhere with the same command and carried over).
#   2. compute-sanitizer memcheck on the quick correctness pass (out-of-bounds/races).
#   3. full correctness (fwd, dq, dk, dv, dp vs the naive candle composition on the GPU and
#      vs the CPU kernel; D = 32/64/128/256, odd lengths, Lq != Lk, soft/hard, per-query
#      maps) and timing vs naive candle CUDA at PMA's sizes (L = 1024/4096, H = 1/8,
#      B = 1/8), with GFLOP/s and achieved bandwidth vs the HBM bound (HBM_GBPS, 4800).
#   4. tools/kernels/sdpa_bench.py: the dumped case vs torch float64 autograd, and torch
#      SDPA (same soft mask) timings at the same sizes.
#
# Without a GPU, tools/kernels/nvrtc_check.py (compile) and tools/kernels/cuda_emulate.py
# (numpy lane-by-lane replay of the kernels) are the available checks.
#
# Exit status: non-zero if the build or any correctness check failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/ma_cuda_check}
mkdir -p "$OUT"
status=0

echo "== 0. device"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
  export CUDA_COMPUTE_CAP
fi
python3 tools/kernels/nvrtc_check.py --arch "$CUDA_COMPUTE_CAP" > "$OUT/nvrtc.txt" 2>&1 \
  && grep -E "registers|spill|OK" "$OUT/nvrtc.txt" | head -40 || echo "(nvrtc check unavailable, see $OUT/nvrtc.txt)"

echo "== 1. build (sm_$CUDA_COMPUTE_CAP)"
if [ -n "${MA_CHECK_BIN:-}" ]; then
  BIN=$MA_CHECK_BIN
else
  if ! command -v cargo >/dev/null; then
    echo "no cargo here: build elsewhere with" >&2
    echo "  cargo build -p sgp-kernels --features cuda --example masked_attention_check" >&2
    echo "and rerun with MA_CHECK_BIN=path/to/masked_attention_check" >&2
    exit 2
  fi
  if ! cargo build -p sgp-kernels --features cuda --example masked_attention_check 2>&1 | tee "$OUT/build.txt" | tail -20; then
    echo "BUILD FAILED (see $OUT/build.txt)"; exit 1
  fi
  if grep -q "^error" "$OUT/build.txt"; then echo "BUILD FAILED (see $OUT/build.txt)"; exit 1; fi
  BIN=target/debug/examples/masked_attention_check
fi

echo "== 2. compute-sanitizer (quick pass)"
if command -v compute-sanitizer >/dev/null; then
  timeout 600 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN" cuda --quick --no-timing \
    > "$OUT/memcheck.txt" 2>&1
  rc=$?
  tail -5 "$OUT/memcheck.txt"
  if [ $rc -eq 9 ]; then echo "MEMCHECK FOUND ERRORS"; status=1; fi
else
  echo "(compute-sanitizer not found)"
fi

echo "== 3. correctness + timing vs naive candle CUDA"
timeout 1200 "$BIN" cuda --dump "$OUT" 2>&1 | tee "$OUT/check.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
grep -c "^CHECK ok" "$OUT/check.txt" | sed 's/^/passed checks: /'
grep "^CHECK FAIL" "$OUT/check.txt" || true

echo "== 4. PyTorch SDPA reference"
timeout 900 python3 tools/kernels/sdpa_bench.py --case "$OUT/case.safetensors" 2>&1 | tee "$OUT/sdpa.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== summary: $( [ $status -eq 0 ] && echo PASS || echo FAIL ) (logs in $OUT)"
exit $status
