#!/usr/bin/env bash
# On the GPU machine (PyTorch, no TensorFlow): build the CUDA launchers of ops/cuda with nvcc,
# check every launcher against the float64 references, run compute-sanitizer (memcheck and
# racecheck) on a small case, and time the ops. Logs and JSON go to $OUT.
#   bash tests/device/run.sh [--skip-sanitizer]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/bsattn_device}
LIB=build/device/libbsattn_cuda.so
mkdir -p "$OUT" build/device
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader

start=$SECONDS
nvcc -shared -O3 -std=c++17 -Xcompiler -fPIC -cudart static --expt-relaxed-constexpr -I. \
  -gencode=arch=compute_90a,code=sm_90a ops/cuda/*.cu -o "$LIB" || exit 1
echo "nvcc build: $((SECONDS - start)) s"

python3 tests/device/harness.py --lib "$LIB" 2>&1 | tee "$OUT/harness.log"
rc=${PIPESTATUS[0]}
if [ "${1:-}" != "--skip-sanitizer" ]; then
  for tool in memcheck racecheck; do
    if timeout 200 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        python3 tests/device/harness.py --lib "$LIB" --quick --no-bench >"$OUT/$tool.log" 2>&1; then
      echo "compute-sanitizer $tool: clean ($(grep -c passed "$OUT/$tool.log") summary line)"
    else
      echo "compute-sanitizer $tool: FAILED"; tail -25 "$OUT/$tool.log"; rc=1
    fi
  done
fi
exit $rc
