"""CPU benchmark of CoLT5's coordinate descent: the fused op vs the unrolled TensorFlow loop, time and peak memory.

Columns (float32, n_iters = 20, the CoLT5 router's eps schedule: eps 0.03, eps_init 4, eps_decay 0.7; k = n / 8;
every case in a fresh process with 2 threads; both under ``tf.function``):

  unrolled  the plain-TF unrolled loop: ``bsattn.colt5.coor_descent.coor_descent(fused=False)`` when that module
            exists, else the same loop written here (``unrolled_coor_descent``); autograd through all iterations
  fused     ``bsattn.colt5.coor_descent_op.fused_coor_descent`` (one op forward, one exact op backward)

Forward: ``reduce_sum(y)``; forward+backward: ``y`` and the gradient ``ds`` for a fixed random cotangent ``dy``
(``tape.gradient(y, s, output_gradients=dy)``: no loss tensors of its own). Time: the best of 7 calls after a
warm-up call (the machine is shared: the least disturbed call estimates the cost best; the JSON also has the
median). Peak memory: the process's peak resident set (ru_maxrss) and that
minus the resident set after the inputs were made and both functions traced, before their first call ("+MB");
each process measures the forward first, then forward+backward (so the forward+backward peak includes the
forward's). The machine is
shared: the load average is recorded with the numbers.

    python benchmarks/colt5.py                              # rows x n = 64x4k, 32x16k, 16x32k, 8x64k
    python benchmarks/colt5.py --sizes 64x4096 --columns fused

Prints the table and writes a results JSON (``--out``; default outside the repository, see outputs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from outputs import default_out

SIZES = ["64x4096", "32x16384", "16x32768", "8x65536"]
COLUMNS = ("unrolled", "fused")
MODES = ("fwd", "fwd+bwd")
N_ITERS, EPS, EPS_INIT, EPS_DECAY, THREADS = 20, 0.03, 4.0, 0.7, 2
ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def unrolled_coor_descent(s, *, n_iters, k, eps=0.1, eps_init=None, eps_decay=1.0, mask=None):
    """The original's loop (peers.md §3.1) in TensorFlow ops: ``s [..., n] -> [..., n]``."""
    import tensorflow as tf

    log_k = tf.math.log(tf.maximum(tf.cast(k, s.dtype), 1e-20))
    if mask is not None:
        s = tf.where(mask, s, -s.dtype.max)
    a, b = 0.0, -s
    e = max(eps if eps_init is None else eps_init, eps)
    for _ in range(n_iters):
        sb = (s + b) / e
        if mask is not None:
            sb = tf.where(mask, sb, -s.dtype.max)
        a = e * (log_k - tf.reduce_logsumexp(sb, axis=-1, keepdims=True))
        b = -tf.nn.relu(s + a)
        e = max(e * eps_decay, eps)
    y = tf.exp((s + a + b) / e)
    return tf.where(mask, y, 0.0) if mask is not None else y


def unrolled_impl():
    """(function, where it came from): the colt5 reference when present, else the loop above."""
    try:
        from bsattn.colt5.coor_descent import coor_descent
    except ImportError:
        return unrolled_coor_descent, "benchmarks/colt5.py:unrolled_coor_descent"
    return (lambda s, **kw: coor_descent(s, fused=False, **kw)), "bsattn.colt5.coor_descent(fused=False)"


def measure(fn, reps: int = 7) -> dict:
    base = rss_mb()
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": min(times), "median_seconds": statistics.median(times), "peak_mb": peak, "base_mb": base}


def worker(column: str, rows: int, n: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    sys.path.insert(0, str(ROOT))
    from bsattn.colt5.coor_descent_op import fused_coor_descent

    impl, source = (fused_coor_descent, "fused_coor_descent") if column == "fused" else unrolled_impl()
    kw = dict(n_iters=N_ITERS, k=n / 8, eps=EPS, eps_init=EPS_INIT, eps_decay=EPS_DECAY)
    rng = np.random.default_rng(0)
    s = tf.constant(rng.standard_normal((rows, n), dtype=np.float32))
    w = tf.constant(rng.standard_normal((rows, n), dtype=np.float32))

    @tf.function
    def forward(s):
        return tf.reduce_sum(impl(s, **kw))

    @tf.function
    def backward(s):  # y and its vector-Jacobian product with the fixed cotangent w: ds = w . dy/ds
        with tf.GradientTape() as tape:
            tape.watch(s)
            y = impl(s, **kw)
        return tape.gradient(y, s, output_gradients=w)

    # The base is taken after a trace of both functions, so "+MB" is what one call adds.
    forward.get_concrete_function(s)
    backward.get_concrete_function(s)
    fwd = measure(lambda: forward(s).numpy())
    bwd = measure(lambda: backward(s).numpy())
    return {"fwd": fwd, "fwd+bwd": {**bwd, "base_mb": fwd["base_mb"]}, "source": source}


def run_case(column: str, rows: int, n: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", column, str(rows), str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        failed = {"status": f"failed (rc {proc.returncode})", "stderr": proc.stderr[-400:]}
        return {"fwd": failed, "fwd+bwd": failed}
    out = json.loads(lines[-1])
    return {mode: {"status": "ok", "source": out["source"], **out[mode]} for mode in MODES}


def cell(r: dict | None) -> str:
    if r is None:
        return f"{'-':>22}"
    if r["status"] != "ok":
        return f"{r['status'][:22]:>22}"
    return f"{r['seconds'] * 1e3:8.1f}ms {r['peak_mb']:5.0f} +{r['peak_mb'] - r['base_mb']:<5.0f}"


def table(results: dict, columns: list, sizes: list) -> str:
    lines = [f"ms (best of 7), peak RSS MB, +MB over inputs and traced functions; float32, n_iters={N_ITERS}, eps={EPS}, "
             f"eps_init={EPS_INIT}, eps_decay={EPS_DECAY}, k=n/8, {THREADS} threads"]
    header = "  rows x n | " + " | ".join(f"{c:^22}" for c in columns)
    if {"fused", "unrolled"} <= set(columns):
        header += " | speed-up | memory ratio"
    for mode in MODES:
        lines += ["", f"{mode}:", header]
        for size in sizes:
            row = f"{size:>10} | " + " | ".join(cell(results.get(f"{c}|{size}|{mode}")) for c in columns)
            f, u = results.get(f"fused|{size}|{mode}"), results.get(f"unrolled|{size}|{mode}")
            if f and u and f["status"] == u["status"] == "ok":
                grown = lambda r: max(r["peak_mb"] - r["base_mb"], 0.5)  # noqa: E731  (RSS pages: >= 0.5 MB)
                row += f" | {u['seconds'] / f['seconds']:7.1f}x | {grown(u) / grown(f):8.1f}x"
            lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="ROWSxN")
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS)
    parser.add_argument("--out", default=default_out("colt5.json"), help="results JSON (default: outside the repo)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))), flush=True)
        return
    results: dict = {}
    load_start = os.getloadavg()
    for size in args.sizes:
        rows, n = map(int, size.lower().split("x"))
        for column in args.columns:
            case = run_case(column, rows, n)
            for mode in MODES:
                results[f"{column}|{size}|{mode}"] = case[mode]
                shown = {k: v for k, v in case[mode].items() if k != "stderr"}
                print(f"{column}|{size}|{mode}", json.dumps(shown), "load", os.getloadavg()[0], flush=True)
    text = table(results, args.columns, args.sizes)
    load = os.getloadavg()
    text += f"\n\nload average (1, 5, 15 min) at the start {load_start}, at the end {load}"
    print("\n" + text)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": load_start,
        "loadavg_at_end": load,
        "command": " ".join(["python", "benchmarks/colt5.py"] + sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "table": text}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
