#!/usr/bin/env bash
# Every check in one device call (about 8 minutes): the TF-level GPU == CPU checks (tf_run.sh STEPS=check, when
# TensorFlow is at /tmp/tf: see tf_run.sh) start at once; the launchers' library is built (run.sh), then the fused
# harness's full check set and compute-sanitizer over its quick set ($TOOLS, default memcheck racecheck initcheck;
# SANITIZER_TIMEOUT per process) run side by side. Logs in $OUT; the summary lines at the end.
#   OUT=/tmp/l bash tests/device/parallel_checks.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/bsattn_device}
mkdir -p "$OUT"
export OUT
pids=()
if [ -f /tmp/tf/env.sh ]; then
  STEPS=check bash tests/device/tf_run.sh >"$OUT/tf_summary.log" 2>&1 &
  pids+=("$!")
fi
STEPS=none bash tests/device/run.sh >"$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
STEPS=fused PREBUILT=1 FUSED_ARGS="${FUSED_ARGS:---no-bench}" bash tests/device/run.sh >"$OUT/fused_summary.log" 2>&1 &
pids+=("$!")
STEPS=sanitizer PREBUILT=1 SCRIPTS=fused_harness TOOLS="${TOOLS:-memcheck racecheck initcheck}" \
  bash tests/device/run.sh >"$OUT/sanitizer_summary.log" 2>&1 &
pids+=("$!")
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
tail -n 2 "$OUT/build.log"
[ -f "$OUT/tf_summary.log" ] && grep -E "FAIL|GPU == CPU|Error|error" "$OUT/tf_summary.log" | tail -n 20
grep -E "FAIL|checks:|passed|failed" "$OUT/fused_summary.log" | tail -n 12
grep -E "compute-sanitizer" "$OUT/sanitizer_summary.log"
exit $rc
