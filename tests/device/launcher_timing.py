"""The launchers' side of the TF-level timing table (tests/device/tf_timing.py prints both).

On the device machine (PyTorch, no TensorFlow): bsattn_fused_forward and forward+backward through ctypes, bf16,
B = 1, H = 16, D = 128, block 128, T = 16384, for the issue's patterns, timed two ways: do_bench medians (device
events) and the host-clock loop tf_timing.py uses for TF (n calls back to back, then one synchronize). JSON to
--out.

    python3 tests/device/launcher_timing.py --lib build/device/libbsattn_cuda.so --out $OUT/launcher_timing.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_harness import DeviceCase, FusedLaunchers, median_ms
from harness import stream

from bsattn import patterns
from bsattn.fused_tables import fused_tables_for_pattern

PATTERNS = {"causal": patterns.Causal(), "fixed": patterns.Fixed(512, 1, 1, 16, 128), "local256": patterns.Local(256)}


def wall_ms(fn, min_seconds: float = 0.5) -> float:
    """Host-clock time per call of `fn`, enqueued back to back (what a framework loop sees)."""
    fn()
    torch.cuda.synchronize()
    n, elapsed = 4, 0.0
    while elapsed < min_seconds:
        n *= 2
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return 1e3 * elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args()
    launchers = FusedLaunchers(args.lib)
    batch, heads, head_dim, bs, n_ctx = 1, 16, 128, 128, args.length
    width = heads * head_dim
    rows = []
    for name, pattern in PATTERNS.items():
        tables = fused_tables_for_pattern(pattern, n_ctx, n_ctx, bs)
        q, k, v, dout = (torch.randn(batch, n_ctx, width, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        case = DeviceCase(2, q, k, v, tables, heads, 1.0 / math.sqrt(head_dim))
        a = ctypes.byref(case.args)
        out, lse = torch.empty_like(q), torch.empty(batch, heads, n_ctx, device="cuda", dtype=torch.float32)
        grads = [torch.empty_like(q) for _ in range(3)]
        ws = launchers.lib.bsattn_fused_backward_workspace(a, 0)
        workspace = torch.empty(max(ws, 4) // 4, dtype=torch.float32, device="cuda")
        s = stream()

        def fwd():
            launchers.lib.bsattn_fused_forward(a, out.data_ptr(), lse.data_ptr(), s)

        def fwd_bwd():
            fwd()
            launchers.lib.bsattn_fused_backward(a, out.data_ptr(), lse.data_ptr(), dout.data_ptr(), None,
                                                *(g.data_ptr() for g in grads), None, workspace.data_ptr(), ws, s)

        row = {"pattern": name, "T": n_ctx, "D": head_dim, "fwd_bench_ms": median_ms(fwd), "fwd_wall_ms": wall_ms(fwd),
               "fwd_bwd_bench_ms": median_ms(fwd_bwd), "fwd_bwd_wall_ms": wall_ms(fwd_bwd)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
