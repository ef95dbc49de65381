"""TF-level time of the fused op on the GPU beside the launcher's (issue 14 section 3).

On the device machine with TensorFlow (../shared/tools/tf-on-device) and the op library built with CUDA:
``fused_attention`` under ``tf.function`` on /GPU:0, bf16, B = 1, H = 16, D = 128, block 128, T = 16384, forward
and forward+backward (GradientTape), timed with the host clock over n calls enqueued back to back (then one
device sync), for the patterns of tests/device/launcher_timing.py, whose JSON (--launcher) gives the launcher's
times measured the same way. BSATTN_GPU_TABLE_CACHE=0 in the environment times the old per-call table copies.

    source /tmp/tf/env.sh && python3 tests/device/tf_timing.py --launcher $OUT/launcher_timing.json --out $OUT/tf.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bsattn import patterns
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import fused_tables_for_pattern

PATTERNS = {"causal": patterns.Causal(), "fixed": patterns.Fixed(512, 1, 1, 16, 128), "local256": patterns.Local(256)}


def sync() -> None:
    tf.test.experimental.sync_devices()  # waits for the GPU's queued work


def wall_ms(fn, min_seconds: float = 0.5) -> float:
    """Host-clock time per call of `fn`, enqueued back to back, then one sync (as launcher_timing.py)."""
    fn()
    sync()
    n, elapsed = 4, 0.0
    while elapsed < min_seconds:
        n *= 2
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        elapsed = time.perf_counter() - start
    return 1e3 * elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launcher", required=True, help="JSON of launcher_timing.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args()
    tf.config.set_soft_device_placement(False)
    cache = os.environ.get("BSATTN_GPU_TABLE_CACHE", "1") != "0"
    launcher = {r["pattern"]: r for r in json.loads(Path(args.launcher).read_text())}
    batch, heads, head_dim, bs, n_ctx = 1, 16, 128, 128, args.length
    rng = np.random.default_rng(0)
    rows = []
    for name, pattern in PATTERNS.items():
        tables = fused_tables_for_pattern(pattern, n_ctx, n_ctx, bs)
        with tf.device("/GPU:0"):
            q, k, v, dout = (tf.cast(tf.constant(rng.standard_normal((batch, n_ctx, heads * head_dim)), tf.float32),
                                     tf.bfloat16) for _ in range(4))

            @tf.function
            def fwd(q, k, v):
                return fused_attention(q, k, v, tables, heads, scale=1.0 / math.sqrt(head_dim))

            @tf.function
            def fwd_bwd(q, k, v, dout):
                with tf.GradientTape() as tape:
                    tape.watch([q, k, v])
                    out = fused_attention(q, k, v, tables, heads, scale=1.0 / math.sqrt(head_dim))
                return tape.gradient(out, [q, k, v], output_gradients=dout)

            row = {"pattern": name, "T": n_ctx, "D": head_dim, "table_cache": cache,
                   "tf_fwd_ms": wall_ms(lambda: fwd(q, k, v)), "tf_fwd_bwd_ms": wall_ms(lambda: fwd_bwd(q, k, v, dout))}
        ref = launcher[name]
        row.update({key: ref[key] for key in ("fwd_wall_ms", "fwd_bwd_wall_ms", "fwd_bench_ms", "fwd_bwd_bench_ms")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"TF-level vs launcher (host clock, n calls then one sync; T={n_ctx}, H={heads}, D={head_dim}, bf16, "
          f"table cache {'on' if cache else 'off'})")
    print(f"{'pattern':>9} {'launcher fwd':>12} {'TF fwd':>8} {'diff':>7} {'launcher f+b':>12} {'TF f+b':>8} "
          f"{'diff':>7}")
    for r in rows:
        print(f"{r['pattern']:>9} {r['fwd_wall_ms']:12.3f} {r['tf_fwd_ms']:8.3f} "
              f"{100 * (r['tf_fwd_ms'] / r['fwd_wall_ms'] - 1):6.1f}% {r['fwd_bwd_wall_ms']:12.3f} "
              f"{r['tf_fwd_bwd_ms']:8.3f} {100 * (r['tf_fwd_bwd_ms'] / r['fwd_bwd_wall_ms'] - 1):6.1f}%")


if __name__ == "__main__":
    main()
