#!/usr/bin/env bash
# On the GPU machine: the KV-cache decoding checks and timing in one call (issue 16 §1), with the library
# built beforehand (PREBUILT=1 of run.sh: build/device/libbsattn_cuda.so carried along).
#   1. fused_harness.py --variants decode (every dtype, block size, head dim; float64 reference), with the
#      tensor-core step split over the keys as chosen (BSATTN_DECODE_SPLITS unset) and unsplit (=1)
#   2. compute-sanitizer over the quick decode set: $DECODE_TOOLS (default memcheck: nothing outside q/out/lse/the
#      written cache; racecheck, initcheck (bsattn's kernels only, as in run.sh) on request)
#   3. --decode: one decode step vs FlexAttention's decode (DECODE_BUDGET seconds of Flex compiles at most),
#      then ours unsplit (no Flex)
# Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/bsattn_device}
LIB=build/device/libbsattn_cuda.so
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
rc=0
start=$SECONDS
for splits in auto 1; do
  if [ "$splits" = auto ]; then unset BSATTN_DECODE_SPLITS; else export BSATTN_DECODE_SPLITS=$splits; fi
  echo "== checks, BSATTN_DECODE_SPLITS=$splits"
  python3 tests/device/fused_harness.py --lib "$LIB" --variants decode --no-bench 2>&1 | tee -a "$OUT/decode_checks.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
unset BSATTN_DECODE_SPLITS
cp "$OUT/fused.json" "$OUT/decode_checks.json" 2>/dev/null
echo "checks: $((SECONDS - start)) s"
for tool in ${DECODE_TOOLS:-memcheck}; do
  filter=(); [ "$tool" = initcheck ] && filter=(--kernel-name kns=bsattn_cuda --check-api-memory-access no)
  log="$OUT/decode_$tool.log"
  timeout "${SANITIZER_TIMEOUT:-90}" compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 3 \
    python3 tests/device/fused_harness.py --lib "$LIB" --variants decode --quick --no-bench >"$log" 2>&1
  sc=$?
  echo "$tool: rc=$sc ($(grep -h 'ERROR SUMMARY' "$log" | tail -1); $(grep -E '^[0-9]+ passed' "$log" | tail -1)) at $((SECONDS - start)) s"
  [ "$sc" = 0 ] || { tail -30 "$log"; rc=1; }
done
[ "${DECODE_BENCH:-1}" = 1 ] || { echo "total: $((SECONDS - start)) s"; exit $rc; }
python3 tests/device/fused_harness.py --lib "$LIB" --no-check --no-bench --decode --decode-batches "${DECODE_BATCHES:-1,8}" \
  --decode-budget "${DECODE_BUDGET:-100}" 2>&1 | tee "$OUT/decode_bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
cp "$OUT/fused.json" "$OUT/decode_bench.json" 2>/dev/null
echo "== ours unsplit (BSATTN_DECODE_SPLITS=1)" | tee -a "$OUT/decode_bench.log"
BSATTN_DECODE_SPLITS=1 python3 tests/device/fused_harness.py --lib "$LIB" --no-check --no-bench --decode \
  --decode-batches "${DECODE_BATCHES:-1,8}" --decode-budget 0 2>&1 | grep -v "^decode T_max" | tee -a "$OUT/decode_bench.log"
rm -f "$OUT/fused.json" "$OUT/fused_quick.json"
echo "total: $((SECONDS - start)) s"
exit $rc
