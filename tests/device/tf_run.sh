#!/usr/bin/env bash
# TensorFlow's side of the GPU checks, on the device machine (issue 14 §3):
#   (a) tests/device/tf_fused_gpu.py and tf_decode_coor_gpu.py (decode steps, fused coordinate descent): every op (fused forward/gradient; nt, nn, tn, masked softmax and its
#       gradient through blocksparse_attention_impl), dtype and feature on /GPU:0 against /CPU:0, eager and
#       tf.function, table-cache and determinism cases;
#   (b) the TF-level timing table beside the launcher's (launcher_timing.py, then tf_timing.py with the GPU
#       table cache on, then off: the old per-call copies).
# Before it, on the dev machine: `bash ../shared/tools/tf-on-device/prepare.sh` (writes .tfdev/0..N), then one
# device call per part, back to back (the machine stays warm 30 s), each carrying .tfdev/i:
#   mkdir -p /tmp/tfparts && mv .tfdev/i/* /tmp/tfparts/          (the last: && python3 /tmp/tfparts/unpack.py)
# and build here: the op library with CUDA (`BSATTN_CUDA=1 python build_config.py`: bsattn/_bsattn_ops.so) and the
# launchers' library for the harness (build/device/libbsattn_cuda.so, as tests/device/run.sh builds it), both
# carried with the tree. Then, in the next call:
#   bash tests/device/tf_run.sh                  # STEPS="check timing" by default; logs and JSON in $OUT
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/bsattn_device}
STEPS=${STEPS:-"check timing"}
LIB=${LIB:-build/device/libbsattn_cuda.so}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
[ -f /tmp/tf/env.sh ] || { echo "no TensorFlow at /tmp/tf: install it first (header)"; exit 1; }
rc=0
step() { [[ " $STEPS " == *" $1 "* ]]; }
if step check; then
  (source /tmp/tf/env.sh && python3 tests/device/tf_fused_gpu.py) 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" \
    | tee "$OUT/tf_fused_gpu.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  (source /tmp/tf/env.sh && python3 tests/device/tf_decode_coor_gpu.py) 2>&1 | grep -v "^WARNING\|^I0000\|^E0000" \
    | tee "$OUT/tf_decode_coor_gpu.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if step timing; then
  python3 tests/device/launcher_timing.py --lib "$LIB" --out "$OUT/launcher_timing.json" 2>&1 | tee "$OUT/timing.log"
  for cache in 1 0; do
    (source /tmp/tf/env.sh && BSATTN_GPU_TABLE_CACHE=$cache python3 tests/device/tf_timing.py \
      --launcher "$OUT/launcher_timing.json" --out "$OUT/tf_timing_cache$cache.json") 2>&1 \
      | grep -v "^WARNING\|^I0000\|^E0000" | tee -a "$OUT/timing.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
fi
exit $rc
