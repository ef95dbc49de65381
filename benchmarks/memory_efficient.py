"""CPU benchmark of memory-efficient attention: time and peak memory, forward and forward+backward.

Columns (B = 1, H = 8, D = 64, float32, causal; every case in a fresh process with 2 threads):

  dense     bsattn.attention (plain TF, [T, T] scores)
  keras     keras.layers.MultiHeadAttention(8, 64), use_causal_mask (includes its four projections of x [1, T, 512])
  chunked   bsattn.memory_efficient_attention(engine="chunked") (pure TF, buckets 512 / 1024)
  fused     bsattn.memory_efficient_attention(engine="fused") (the fused op)
  original  memory_efficient_attention_pytorch.memory_efficient_attention (the original package, torch CPU,
            buckets 512 / 1024, checkpointed chunks when gradients are needed)
  sdpa      torch.nn.functional.scaled_dot_product_attention(is_causal=True) (torch's CPU flash attention)

The torch columns run in another interpreter (``--torch-python``, default ``$BSATTN_TORCH_PYTHON`` or
/tmp/torchenv/bin/python) that has torch and memory-efficient-attention-pytorch; they are skipped with a
message when it is missing. Time: the fastest of 5 calls (3 for T = 8192) after a warm-up call, one call
above 8192 (the fastest is the least disturbed by other processes on a shared machine; the TF columns first make one
small call, which loads the op library). The columns of one
T run one after the other, before the next T, and each case records the load average before and after.
Peak memory: the process's peak resident set (ru_maxrss) and that minus the resident set after the inputs
were made ("+MB"); one process per (column, T) runs the forward first, then forward+backward.
A case that fails (out of memory: killed) or whose time or memory is projected past ``--limit`` seconds or
``--max-mb`` (x4 per doubling of T from the previous length) is reported as such.

    python benchmarks/memory_efficient.py                       # T = 1k ... 64k
    python benchmarks/memory_efficient.py --lengths 1024 2048 --columns fused chunked

Prints the table and writes a results JSON (``--out``; default outside the repository, see outputs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from outputs import default_out

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
COLUMNS = ("dense", "keras", "chunked", "fused", "original", "sdpa")
TORCH_COLUMNS = ("original", "sdpa")
MODES = ("fwd", "fwd+bwd")
H, D, THREADS = 8, 64, 2
ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(fn, t: int) -> dict:
    """Time of ``fn()`` (module docstring) and the peak memory so far."""
    base = rss_mb()
    if t <= 8192:
        fn()  # warm-up (and tracing)
    times = []
    for _ in range(5 if t <= 4096 else 3 if t <= 8192 else 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": min(times), "peak_mb": peak, "base_mb": base}


def tf_worker(column: str, t: int, limit: float) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    sys.path.insert(0, str(ROOT))
    import keras

    import bsattn

    rng = np.random.default_rng(0)
    if column == "keras":
        layer = keras.layers.MultiHeadAttention(H, D)
        x = tf.constant(rng.standard_normal((1, t, H * D), dtype=np.float32))
        layer(x[:, :8], x[:, :8])
        inputs = [x]

        def attend(x):
            return layer(x, x, use_causal_mask=True)
    else:
        inputs = [tf.constant(rng.standard_normal((1, H, t, D), dtype=np.float32)) for _ in range(3)]
        if column == "dense":

            def attend(q, k, v):
                return bsattn.attention(q, k, v, causal=True)
        else:

            def attend(q, k, v):
                return bsattn.memory_efficient_attention(q, k, v, causal=True, engine=column)

            # One small call first: the op library's load (about 4 s, once per process) is not attention time,
            # and the cases above 8192 are timed on their first call.
            small = tf.ones([1, H, 64, D])
            attend(small, small, small)

    @tf.function
    def forward(*xs):
        return tf.reduce_sum(attend(*xs))

    @tf.function
    def backward(*xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            loss = tf.reduce_sum(attend(*xs))
        return tape.gradient(loss, xs)

    return both(lambda: forward(*inputs).numpy(), lambda: [g.numpy() for g in backward(*inputs)], t, limit)


def both(forward, backward, t: int, limit: float) -> dict:
    """The forward measured first (its peak is then the process's), then forward+backward unless the forward
    alone projects it past ``limit`` (x3.5)."""
    fwd = measure(forward, t)
    if fwd["seconds"] * 3.5 > limit:
        return {"fwd": fwd, "fwd+bwd": {"status": f"skipped (> {limit:.0f} s)"}}
    bwd = measure(backward, t)
    return {"fwd": fwd, "fwd+bwd": {**bwd, "base_mb": fwd["base_mb"]}}


def torch_worker(column: str, t: int, limit: float) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, t, D, generator=gen, requires_grad=True) for _ in range(3))
    if column == "original":
        from memory_efficient_attention_pytorch import memory_efficient_attention

        def attend():
            return memory_efficient_attention(q, k, v, causal=True, q_bucket_size=512, k_bucket_size=1024)
    else:

        def attend():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward():
        with torch.no_grad():
            return attend().sum().item()

    def backward():
        q.grad = k.grad = v.grad = None
        attend().sum().backward()
        return q.grad.sum().item()

    result = both(forward, backward, t, limit)
    result["torch"] = torch.__version__
    return result


def run_case(python: str, column: str, t: int, limit: float) -> dict:
    """Both modes of one (column, T) in a fresh process → ``{"fwd": ..., "fwd+bwd": ...}``."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", column, str(t), str(limit)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=6 * limit, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        failed = {"status": f"timeout > {6 * limit:.0f} s"}
        return {"fwd": failed, "fwd+bwd": failed}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory)" if proc.returncode in (-9, 137) else f"failed (rc {proc.returncode})"
        failed = {"status": why, "stderr": proc.stderr[-400:]}
        return {"fwd": failed, "fwd+bwd": failed}
    out = json.loads(lines[-1])
    return {mode: {"status": "ok", **r} if "seconds" in r else r for mode, r in out.items() if mode in MODES}


def cell(r: dict | None) -> str:
    if r is None:
        return f"{'-':>23}"
    if r["status"] != "ok":
        return f"{r['status'][:23]:>23}"
    return f"{r['seconds']:8.3f}s {r['peak_mb']:6.0f} +{r['peak_mb'] - r['base_mb']:<5.0f}"


def table(results: dict, columns: list, lengths: list) -> str:
    header = "     T | " + " | ".join(f"{c:^23}" for c in columns)
    lines = [f"seconds, peak RSS MB, +MB over the inputs; B=1 H={H} D={D} float32 causal, {THREADS} threads"]
    for mode in MODES:
        lines += ["", f"{mode}:", header]
        for t in lengths:
            lines.append(f"{t:6d} | " + " | ".join(cell(results.get(f"{c}|{t}|{mode}")) for c in columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS)
    parser.add_argument("--limit", type=float, default=600.0, help="skip a case projected to take longer (s)")
    parser.add_argument("--max-mb", type=float, default=12000.0,
                        help="skip a case whose memory (x4 per doubling of T) is projected past this (MB)")
    parser.add_argument("--torch-python", default=os.environ.get("BSATTN_TORCH_PYTHON", "/tmp/torchenv/bin/python"))
    parser.add_argument(
        "--out", default=default_out("memory_efficient.json"), help="results JSON (default outside the repository)"
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of these result files")
    args = parser.parse_args()
    if args.table:
        results = {}
        for path in args.table:
            results.update(json.loads(Path(path).read_text())["results"])
        present = [c for c in COLUMNS if any(key.startswith(f"{c}|") for key in results)]
        lengths = sorted({int(key.split("|")[1]) for key in results})
        print(table(results, present, lengths))
        return
    if args.worker:
        column, t, limit = args.worker[0], int(args.worker[1]), float(args.worker[2])
        worker = torch_worker if column in TORCH_COLUMNS else tf_worker
        result = worker(column, t, limit)
        print(json.dumps(result), flush=True)
        return

    columns = list(args.columns)
    if any(c in TORCH_COLUMNS for c in columns):
        probe = subprocess.run([args.torch_python, "-c", "import torch, memory_efficient_attention_pytorch"], check=False,
                               capture_output=True) if Path(args.torch_python).exists() else None  # fmt: skip
        if probe is None or probe.returncode != 0:
            print(f"skipping {', '.join(c for c in columns if c in TORCH_COLUMNS)}: {args.torch_python} cannot import "
                  "torch and memory_efficient_attention_pytorch", flush=True)  # fmt: skip
            columns = [c for c in columns if c not in TORCH_COLUMNS]

    # Lengths outside, columns inside: the columns of one T run minutes apart, under the same load.
    results: dict = {}
    previous: dict = {}  # column -> its last measured forward (with "t" and "grown_mb")
    for t in sorted(args.lengths):
        for column in columns:
            last = previous.get(column)
            if last is not None and last["status"] != "ok":
                case = {mode: {"status": "skipped (smaller T failed)"} for mode in MODES}
            elif last is not None and last["seconds"] * (t / last["t"]) ** 2 > args.limit:
                case = {mode: {"status": f"skipped (> {args.limit:.0f} s)"} for mode in MODES}
            elif last is not None and last["grown_mb"] * (t / last["t"]) ** 2 > args.max_mb:
                case = {mode: {"status": f"skipped (> {args.max_mb / 1000:.0f} GB)"} for mode in MODES}
            else:
                python = args.torch_python if column in TORCH_COLUMNS else sys.executable
                load_before = os.getloadavg()[0]
                case = run_case(python, column, t, args.limit)
                for mode in MODES:
                    case[mode]["load"] = [load_before, os.getloadavg()[0]]
                last = {**case["fwd"], "t": t}
                if last["status"] == "ok":
                    ran = case["fwd+bwd"] if case["fwd+bwd"]["status"] == "ok" else case["fwd"]
                    last["grown_mb"] = ran["peak_mb"] - ran["base_mb"]
                previous[column] = last
            for mode in MODES:
                results[f"{column}|{t}|{mode}"] = case[mode]
                shown = {k: v for k, v in case[mode].items() if k != "stderr"}
                print(f"{column}|{t}|{mode}", json.dumps(shown), flush=True)

    text = table(results, columns, sorted(args.lengths))
    print("\n" + text)
    load = os.getloadavg()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": load,
        "command": " ".join(["python", "benchmarks/memory_efficient.py"] + sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "table": text}, indent=1))
    print(f"\nload average at the end: {load}; wrote {args.out}")


if __name__ == "__main__":
    main()
