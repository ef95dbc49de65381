"""CPU benchmark of the unfused block-sparse path against dense TF attention.

For each context length and attn_mode it times ``blocksparse_attention_impl`` (nt -> masked
softmax -> nn) and ``attention_impl`` (dense TF, same mask), forward and forward+backward, inside
``tf.function``, each case in a fresh process (a case that runs out of memory is reported as such),
and reports the block density and the GFLOP/s over computed elements (blocks for the sparse path,
the full T x T matrix for the dense one). Prints a table, writes a JSON (``--out``; default outside the
repository, see outputs.py).

    python benchmarks/cpu_ops.py                      # T = 1024 ... 16384, all modes
    python benchmarks/cpu_ops.py --lengths 1024 2048 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

import bsattn
from outputs import default_out

MODES = ("all", "local", "strided", "fixed")


def stride_for(n_ctx: int) -> int:
    """A power of two near sqrt(n_ctx), as the paper's stride choice (at least 32)."""
    return max(32, 2 ** round(math.log2(math.sqrt(n_ctx))))


def mode_kwargs(mode: str, n_ctx: int) -> dict:
    kwargs: dict = {"local_attn_ctx": stride_for(n_ctx)} if mode != "all" else {}
    if mode == "fixed":
        kwargs.update(num_verts=1, vertsize=1)
    return kwargs


def timed(fn, repeats: int) -> float:
    """Median wall time in seconds of ``fn()`` after one warm-up call (which also traces)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_runners(impl, q, k, v, heads, mode, kwargs):
    @tf.function
    def forward():
        return tf.reduce_sum(impl(q, k, v, heads, mode, **kwargs))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(impl(q, k, v, heads, mode, **kwargs))
        return tape.gradient(loss, [q, k, v])

    return (lambda: forward().numpy()), (lambda: [g.numpy() for g in forward_backward()])


def measure(n_ctx: int, mode: str, engine: str, args) -> dict:
    """Times one (T, mode, engine) case in this process; engine is 'sparse' or 'dense'."""
    rng = np.random.default_rng(0)
    width = args.heads * args.head_dim
    q, k, v = (tf.constant(rng.uniform(-1, 1, (args.batch, n_ctx, width)).astype(np.float32)) for _ in range(3))
    kwargs = dict(mode_kwargs(mode, n_ctx), blocksize=args.blocksize)
    if engine == "sparse":
        kwargs["engine"] = "unfused"  # this benchmark is about the three-op path (the fused op: cpu_attention.py)
    impl = bsattn.blocksparse_attention_impl if engine == "sparse" else bsattn.attention_impl
    fwd, fwd_bwd = make_runners(impl, q, k, v, args.heads, mode, kwargs)
    return {"fwd_s": timed(fwd, args.repeats), "fwdbwd_s": timed(fwd_bwd, args.repeats)}


def measure_in_subprocess(n_ctx: int, mode: str, engine: str, args) -> dict:
    """Runs ``measure`` in a fresh process, so one case running out of memory is reported, not fatal."""
    cmd = [sys.executable, __file__, "--worker", str(n_ctx), mode, engine, *args.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = "out of memory (killed)" if proc.returncode in (-9, 137) else proc.stderr.strip().splitlines()[-1:]
        return {"fwd_s": None, "fwdbwd_s": None, "error": str(reason)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(n_ctx: int, mode: str, args) -> dict:
    kwargs = mode_kwargs(mode, n_ctx)
    bst = bsattn.get_blocksparse_obj(
        n_ctx, args.heads, mode, args.blocksize, kwargs.get("local_attn_ctx"), kwargs.get("num_verts"), kwargs.get("vertsize")
    )
    nnz = bst.blocks
    # Two matmuls of 2*bs*bs*D flops per block forward; the backward does four more (x3 in all).
    flops = {
        "sparse": 4 * args.blocksize**2 * args.head_dim * nnz * args.batch * args.heads,
        "dense": 4 * n_ctx**2 * args.head_dim * args.batch * args.heads,
    }
    row = {"T": n_ctx, "mode": mode, **kwargs, "blocks": nnz, "density": nnz / (bst.ctx_blks_q * bst.ctx_blks_k)}
    for engine in ("sparse", "dense"):
        result = measure_in_subprocess(n_ctx, mode, engine, args)
        row.update({f"{engine}_{key}": value for key, value in result.items()})
        if result["fwd_s"]:
            row[f"{engine}_fwd_gflops"] = flops[engine] / result["fwd_s"] / 1e9
            row[f"{engine}_fwdbwd_gflops"] = 3 * flops[engine] / result["fwdbwd_s"] / 1e9
    if row.get("dense_fwd_s") and row.get("sparse_fwd_s"):
        row["speedup_fwd"] = row["dense_fwd_s"] / row["sparse_fwd_s"]
        row["speedup_fwdbwd"] = row["dense_fwdbwd_s"] / row["sparse_fwdbwd_s"]
    return row


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'T':>6} {'mode':>8} {'L':>4} {'density':>8} | {'sparse fwd':>10} {'GF/s':>6} {'fwd+bwd':>8} {'GF/s':>6} |"
        f" {'dense fwd':>9} {'fwd+bwd':>8} | {'speed-up fwd':>12} {'fwd+bwd':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['T']:>6} {r['mode']:>8} {r.get('local_attn_ctx', '-'):>4} {r['density']:>8.4f} |"
            f" {fmt(r['sparse_fwd_s'], '9.4f')}s {fmt(r.get('sparse_fwd_gflops'), '6.1f')}"
            f" {fmt(r['sparse_fwdbwd_s'], '7.3f')}s {fmt(r.get('sparse_fwdbwd_gflops'), '6.1f')} |"
            f" {fmt(r['dense_fwd_s'], '8.3f')}s {fmt(r['dense_fwdbwd_s'], '7.3f')}s |"
            f" {fmt(r.get('speedup_fwd'), '11.1f')}x {fmt(r.get('speedup_fwdbwd'), '7.1f')}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--blocksize", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=default_out("cpu_ops.json"), help="results JSON (default outside the repository)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("T", "MODE", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [f"--batch={args.batch}", f"--heads={args.heads}", f"--head-dim={args.head_dim}",
                        f"--blocksize={args.blocksize}", f"--repeats={args.repeats}"]
    if args.worker:
        n_ctx, mode, engine = args.worker
        print(json.dumps(measure(int(n_ctx), mode, engine, args)))
        return

    rows = []
    for n_ctx in args.lengths:
        for mode in args.modes:
            rows.append(run_case(n_ctx, mode, args))
            print(f"done T={n_ctx} {mode}: {rows[-1]}", flush=True)
    print()
    print_table(rows)
    meta = {
        "command": "python benchmarks/cpu_ops.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "blocksize": args.blocksize,
        "dtype": "float32",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
