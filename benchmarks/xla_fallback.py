"""What the XLA fallback costs: the fused op (tf.function) against its TensorFlow-ops fallback under XLA
(tf.function(jit_compile=True), bsattn.gather_attention), CPU, float32, 'fixed' block-sparse pattern.

Per case (each in a fresh process: 2 intra-op threads, 1 inter-op): forward and forward+backward time (median
of the repeats), XLA's first-call (compile) time, and peak resident memory of forward+backward (ru_maxrss,
with the memory after making the inputs as "base").

    python benchmarks/xla_fallback.py            # T = 1024, 4096 (a few minutes)
    python benchmarks/xla_fallback.py --quick    # T = 256: checks that it runs

Writes benchmarks/results/xla_fallback.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

B, H, D, BS, STRIDE = 2, 4, 64, 64, 256


def one_case(t: int, path: str, repeats: int) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from bsattn import patterns
    from bsattn.fused_attention import fused_attention
    from bsattn.fused_tables import fused_tables_for_pattern

    tables = fused_tables_for_pattern(patterns.Fixed(STRIDE, 1, 1, H, BS), t, t, BS)
    q, k, v = (tf.random.normal([B, t, H * D]) for _ in range(3))

    def fwd(q, k, v):
        return fused_attention(q, k, v, tables, H)

    def fwd_bwd(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = fused_attention(q, k, v, tables, H)
        return tape.gradient(out, [q, k, v])

    jit = path == "xla"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"T": t, "path": path, "density": tables.density, "base_mb": base}
    for name, fn in (("fwd_bwd", fwd_bwd), ("fwd", fwd)):
        fn = tf.function(fn, jit_compile=jit, autograph=False)
        start = time.perf_counter()
        tf.nest.map_structure(lambda x: x.numpy(), fn(q, k, v))
        result[f"{name}_first_s"] = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tf.nest.map_structure(lambda x: x.numpy(), fn(q, k, v))
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = 1e3 * statistics.median(times)
        if name == "fwd_bwd":
            result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", nargs=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(int(args.case[0]), args.case[1], args.repeats)))
        return
    lengths = [256] if args.quick else [1024, 4096]
    rows = []
    for t in lengths:
        for path in ("op", "xla"):
            out = subprocess.run([sys.executable, __file__, "--case", str(t), path, "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True, env=dict(os.environ))  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"B={B} H={H} D={D} bs={BS} fixed(stride {STRIDE}), float32, CPU 2 threads")
    print(f"{'T':>6} {'path':>4} {'density':>7} {'fwd ms':>8} {'fwd+bwd ms':>10} {'1st fwd+bwd s':>13} {'peak-base MB':>12}")
    for r in rows:
        print(f"{r['T']:>6} {r['path']:>4} {r['density']:>7.3f} {r['fwd_ms']:>8.1f} {r['fwd_bwd_ms']:>10.1f} "
              f"{r['fwd_bwd_first_s']:>13.2f} {r['peak_mb'] - r['base_mb']:>12.0f}")  # fmt: skip
    if not args.quick:
        out = Path(__file__).parent / "results" / "xla_fallback.json"
        out.write_text(json.dumps({"B": B, "H": H, "D": D, "block": BS, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
