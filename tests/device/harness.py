"""GPU harness: drives the CUDA launchers of ops/cuda through ctypes with torch tensors as buffers.

Runs on the device machine (PyTorch, no TensorFlow). For every launcher, dtype and block size it
draws fresh random inputs and tables (shared and per-head layouts, random in-block masks), poisons
the outputs with NaN, runs the kernel, and compares with bsattn.reference (float64, on the CPU).
Error = max |ours - ref| / max |ref|; float32 must stay under 1e-5, float16/bfloat16 under twice
the error of the same computation done densely by torch in that dtype (+ a small floor).
Then it times the ops on a larger case and prints a table; full results go to $OUT as JSON.

    python tests/device/harness.py --lib build/libbsattn_cuda.so [--quick] [--no-bench]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bsattn import reference  # noqa: E402  (NumPy only: no TensorFlow needed)
from bsattn.tables import BlockTables, build_tables  # noqa: E402

DTYPES = {"float32": (torch.float32, 0), "float16": (torch.float16, 1), "bfloat16": (torch.bfloat16, 2)}
BLOCK_SIZES = (8, 16, 32, 64, 128)
I64, PTR = ctypes.c_int64, ctypes.c_void_p


class Launchers:
    """The C ABI of ops/cuda/bsattn_cuda.h."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.bsattn_cuda_error_string.restype = ctypes.c_char_p
        lib.bsattn_nt.argtypes = [ctypes.c_int, PTR, PTR, PTR, PTR] + [I64] * 8 + [PTR]
        lib.bsattn_dsd.argtypes = [ctypes.c_int, ctypes.c_int, PTR, PTR, PTR, PTR] + [I64] * 9 + [PTR]
        lib.bsattn_dsd_mixed_weights.argtypes = lib.bsattn_dsd.argtypes
        lib.bsattn_masked_softmax.argtypes = (
            [ctypes.c_int, PTR, PTR, ctypes.c_float, PTR, PTR, ctypes.c_int] + [I64] * 9 + [PTR]
        )
        lib.bsattn_masked_softmax_grad.argtypes = [ctypes.c_int, PTR, PTR, PTR, ctypes.c_float, PTR] + [I64] * 7 + [PTR]
        self.lib = lib

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: {self.lib.bsattn_cuda_error_string(code).decode()}")


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def dev(array: np.ndarray, dtype=None) -> torch.Tensor:
    # A writable C-ordered copy: the launchers read raw pointers, so layouts must be dense row-major
    # (NumPy results can be strided, and torch keeps those strides through .cuda() and .to()). Cast on the
    # host, then one copy: the device memory is written by a memcpy, which compute-sanitizer's initcheck
    # tracks even when it checks only bsattn's kernels (run.sh), unlike the writes of torch's cast kernels.
    t = torch.from_numpy(np.array(array, order="C"))
    return (t if dtype is None else t.to(dtype)).contiguous().cuda()


def poisoned(shape, dtype) -> torch.Tensor:
    """NaN everywhere (written by a memcpy, as in dev): what a launcher leaves unwritten stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype).cuda()


def random_tables(rng, bs: int, n_qb: int, n_kb: int, lut_heads: int) -> BlockTables:
    """A random layout (same block count per head, every row non-empty) with random in-block masks."""
    count = max(n_qb, (n_qb * n_kb) // 2)
    layouts = []
    for _ in range(lut_heads):
        layout = np.zeros((n_qb, n_kb), bool)
        layout[np.arange(n_qb), rng.integers(0, n_kb, n_qb)] = True
        free = np.flatnonzero(~layout.ravel())
        layout.ravel()[rng.choice(free, count - n_qb, replace=False)] = True
        layouts.append(layout)
    layout = np.stack(layouts).astype(np.int32)

    def masks(head, qb, kb):
        keep = rng.random((len(qb), bs, bs)) < 0.8
        keep[:, 0, :] = True  # no fully masked rows here; the CPU tests cover those
        return keep

    return build_tables(layout, bs, mask_fn=masks)


def error(ours: torch.Tensor, ref: np.ndarray) -> float:
    got = ours.double().cpu().numpy()
    if not np.isfinite(got).all():
        return float("inf")  # an unwritten (NaN-poisoned) or overflowing element
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def nan_error(ours: torch.Tensor, ref: np.ndarray) -> float:
    """Like error(), for references with NaN: the NaN positions must match exactly, the rest within the bound."""
    got = ours.double().cpu().numpy()
    if not (np.isnan(got) == np.isnan(ref)).all():
        return float("inf")
    fin = ~np.isnan(ref)
    if not np.isfinite(got[fin]).all():
        return float("inf")
    return float(np.abs(got[fin] - ref[fin]).max(initial=0.0) / max(np.abs(ref[fin]).max(initial=0.0), 1e-30))


def run_nan_case(launchers: Launchers, rng, dtype_name: str, bs: int, lut_heads: int, head_dim: int) -> dict:
    """NaN where it must be ignored: at masked softmax entries, at dy where y = 0, in value rows whose every
    weight is 0 (nn) and in query rows whose every weight is 0 (tn); plus a NaN at one kept score, which must
    make exactly its row NaN (the rule of the CPU kernels and bsattn.reference)."""
    dtype, code = DTYPES[dtype_name]
    batch, heads, n_qb, n_kb = 2, 2, 4, 3
    width = heads * head_dim
    tables = random_tables(rng, bs, n_qb, n_kb, lut_heads)
    nnz, s = tables.blocks, stream()
    cast = lambda x: torch.from_numpy(x).to(dtype).double().numpy()  # noqa: E731
    luts = {name: dev(getattr(tables, name)) for name in ("nn_lut", "tn_lut", "mask_words")}
    keep = np.broadcast_to(tables.keep_masks(), (heads, nnz, bs, bs))[None]  # [1, H, nnz, bs, bs]
    errors = {}

    x = cast(rng.normal(0, 2, (batch, heads, nnz, bs, bs)))
    x = np.where(keep, x, np.nan)  # NaN at every masked entry
    poison = (0, 0, int(rng.integers(nnz)), int(rng.integers(bs)))
    kept = np.flatnonzero(keep[(0,) + poison[1:]])
    x[poison + (int(kept[0]),)] = np.nan  # one kept NaN: its whole row turns NaN
    x_d, y = dev(x, dtype), poisoned(x.shape, dtype)
    launchers.check(launchers.lib.bsattn_masked_softmax(code, x_d.data_ptr(), y.data_ptr(), 0.75,
                                                        luts["nn_lut"].data_ptr(), luts["mask_words"].data_ptr(), 0, 0,
                                                        batch, heads, nnz, bs, lut_heads, lut_heads, n_qb + nnz, n_qb,
                                                        s), "masked_softmax")
    ref_y = reference.masked_softmax(x, tables, 0.75)
    errors["nan_softmax"] = nan_error(y, ref_y)

    y_in = cast(np.nan_to_num(ref_y, nan=0.0))
    dy = np.where(y_in == 0, np.nan, cast(rng.uniform(-1, 1, x.shape)))  # NaN wherever y = 0
    dx, dy_d, y_d = poisoned(x.shape, dtype), dev(dy, dtype), dev(y_in, dtype)
    launchers.check(launchers.lib.bsattn_masked_softmax_grad(code, dy_d.data_ptr(), y_d.data_ptr(), dx.data_ptr(), 0.75,
                                                             luts["nn_lut"].data_ptr(), batch, heads, nnz, bs,
                                                             lut_heads, n_qb + nnz, n_qb, s), "softmax_grad")
    errors["nan_softmax_grad"] = nan_error(dx, reference.masked_softmax_grad(dy, y_in, tables, 0.75))

    qb, kb = (np.broadcast_to(tables.nt_lut[..., c], (heads, nnz)) for c in (0, 1))
    w = cast(rng.uniform(-1, 1, (batch, heads, nnz, bs, bs)))
    for name, transpose, n_out, n_in, blk_of, axis in (("nan_nn", 0, n_qb, n_kb, kb, -1), ("nan_tn", 1, n_kb, n_qb, qb, -2)):
        bad = rng.choice(n_in * bs, size=3, replace=False)  # input rows (keys for nn, queries for tn) set to NaN
        x_in = cast(rng.uniform(-1, 1, (batch, n_in * bs, width)))
        x_in[:, bad] = np.nan
        wz = w.copy()
        for t in bad:  # every weight that meets row t is 0
            sel = blk_of == t // bs  # [H, nnz]
            index = [slice(None), sel] + [slice(None)] * 2
            index[axis] = t % bs
            wz[tuple(index)] = 0.0
        out = poisoned((batch, n_out * bs, width), dtype)
        wz_d, x_d = dev(wz, dtype), dev(x_in, dtype)
        launchers.check(launchers.lib.bsattn_dsd(code, transpose, wz_d.data_ptr(), x_d.data_ptr(),
                                                 luts[f"{name[4:]}_lut"].data_ptr(), out.data_ptr(), batch, heads, nnz,
                                                 bs, n_in * bs, width, lut_heads, n_out + nnz, n_out, s), name)
        ref = getattr(reference, name[4:])(wz, x_in, tables)
        errors[name] = nan_error(out, ref) if np.isfinite(ref).all() else float("inf")  # ref must be NaN-free
    torch.cuda.synchronize()
    return errors


def dense_nt_baseline(a, b, tables, heads, dtype) -> np.ndarray:
    """nt done by torch in `dtype` on the gathered tiles: the error floor of that dtype."""
    bs = tables.block_size
    batch, _, width = a.shape
    a5 = dev(a, dtype).view(batch, -1, bs, heads, width // heads)
    b5 = dev(b, dtype).view(batch, -1, bs, heads, width // heads)
    lut = dev(tables.nt_lut).long()
    lut = lut.expand(heads, -1, -1) if tables.lut_heads == 1 else lut
    qa = torch.stack([a5[:, lut[h, :, 0], :, h] for h in range(heads)], 1)  # [B, H, nnz, bs, D]
    kb = torch.stack([b5[:, lut[h, :, 1], :, h] for h in range(heads)], 1)
    return (qa @ kb.transpose(-1, -2)).double().cpu().numpy()


def run_case(launchers: Launchers, rng, dtype_name: str, bs: int, lut_heads: int, head_dim: int) -> dict:
    dtype, code = DTYPES[dtype_name]
    batch, heads, n_qb, n_kb = 2, 2, 4, 3
    width = heads * head_dim
    tables = random_tables(rng, bs, n_qb, n_kb, lut_heads)
    nnz = tables.blocks
    cast = lambda x: torch.from_numpy(x).to(dtype).double().numpy()  # noqa: E731  inputs as the kernel sees them
    a = cast(rng.uniform(-1, 1, (batch, n_qb * bs, width)))
    b = cast(rng.uniform(-1, 1, (batch, n_kb * bs, width)))
    w = cast(rng.uniform(-1, 1, (batch, heads, nnz, bs, bs)))
    luts = {name: dev(getattr(tables, name)) for name in ("nt_lut", "nn_lut", "tn_lut", "mask_words")}
    # Device copies stay referenced for the whole case: a temporary's memory would be freed (and
    # reused by the next allocation) before the launcher runs.
    a_d, b_d, w_d = dev(a, dtype), dev(b, dtype), dev(w, dtype)
    s = stream()
    errors = {}

    c = poisoned((batch, heads, nnz, bs, bs), dtype)
    launchers.check(launchers.lib.bsattn_nt(code, a_d.data_ptr(), b_d.data_ptr(),
                                            luts["nt_lut"].data_ptr(), c.data_ptr(), batch, heads, n_qb * bs,
                                            n_kb * bs, width, lut_heads, nnz, bs, s), "nt")
    ref = reference.nt(a, b, tables, heads)
    errors["nt"] = (error(c, ref), error(torch.from_numpy(dense_nt_baseline(a, b, tables, heads, dtype)), ref))

    for name, transpose, x, x_d, n_out, lut_len in (
        ("nn", 0, b, b_d, n_qb, n_qb + nnz),
        ("tn", 1, a, a_d, n_kb, n_kb + nnz),
    ):
        out = poisoned((batch, n_out * bs, width), dtype)
        launchers.check(launchers.lib.bsattn_dsd(code, transpose, w_d.data_ptr(), x_d.data_ptr(),
                                                 luts[f"{name}_lut"].data_ptr(), out.data_ptr(), batch, heads, nnz, bs,
                                                 x.shape[1], width, lut_heads, lut_len, n_out, s), name)
        ref = getattr(reference, name)(w, x, tables)
        # Baseline: the same sum done densely by torch in `dtype` on the expanded block matrix.
        dense_w = dev(reference.dense_from_blocks(w, tables), dtype)  # [B, H, Tq, Tk]
        dense_w = dense_w.transpose(-1, -2) if transpose else dense_w
        xs = dev(x, dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
        base = (dense_w @ xs).transpose(1, 2).reshape(batch, -1, width)
        errors[name] = (error(out, ref), error(base, ref))
        if dtype_name != "float32":  # blocksparse's mixed precision: 16-bit weights, float32 x and result
            x32_d, out32 = dev(x, torch.float32), poisoned((batch, n_out * bs, width), torch.float32)
            launchers.check(launchers.lib.bsattn_dsd_mixed_weights(
                code, transpose, w_d.data_ptr(), x32_d.data_ptr(), luts[f"{name}_lut"].data_ptr(), out32.data_ptr(),
                batch, heads, nnz, bs, x.shape[1], width, lut_heads, lut_len, n_out, s), f"{name}_mixed")
            errors[f"{name}_mixed"] = (error(out32, ref), 0.0)  # inputs exact in float32: judged by its bound

    x = cast(rng.normal(0, 2, (batch, heads, nnz, bs, bs)))
    x_d, y = dev(x, dtype), poisoned(x.shape, dtype)
    scale = 0.75
    launchers.check(launchers.lib.bsattn_masked_softmax(code, x_d.data_ptr(), y.data_ptr(), scale,
                                                        luts["nn_lut"].data_ptr(), luts["mask_words"].data_ptr(), 0, 0,
                                                        batch, heads, nnz, bs, lut_heads, lut_heads, n_qb + nnz, n_qb,
                                                        s), "masked_softmax")
    ref_y = reference.masked_softmax(x, tables, scale)
    dense_x = dev(reference.dense_from_blocks(x, tables, fill=-np.inf), dtype).float()
    keep = dev(reference.dense_from_blocks(np.ones_like(x), tables) > 0)
    token_mask = dev(reference.token_mask_from_tables(tables, heads))
    base = torch.softmax((scale * dense_x).masked_fill(~(keep & token_mask), -float("inf")), -1).to(dtype)
    base_blocks = reference.blocks_from_dense(base.double().cpu().numpy(), tables)
    errors["softmax"] = (error(y, ref_y), error(torch.from_numpy(base_blocks), ref_y))

    dy = cast(rng.uniform(-1, 1, x.shape))
    y_in = cast(ref_y)
    dx, dy_d, y_d = poisoned(x.shape, dtype), dev(dy, dtype), dev(y_in, dtype)
    launchers.check(launchers.lib.bsattn_masked_softmax_grad(code, dy_d.data_ptr(), y_d.data_ptr(),
                                                             dx.data_ptr(), scale, luts["nn_lut"].data_ptr(), batch, heads,
                                                             nnz, bs, lut_heads, n_qb + nnz, n_qb, s), "softmax_grad")
    ref_dx = reference.masked_softmax_grad(dy, y_in, tables, scale)
    # Baseline: the same formula evaluated by torch in `dtype`.
    rows = reference.dense_from_blocks(dy * y_in, tables).sum(-1)  # exact row sums, float64
    row_sum = dev(reference.blocks_from_dense(np.broadcast_to(rows[..., None], rows.shape + (n_kb * bs,)), tables), dtype)
    base_dx = scale * y_d * (dy_d - row_sum)
    errors["softmax_grad"] = (error(dx, ref_dx), error(base_dx, ref_dx))
    torch.cuda.synchronize()
    return errors


def passes(dtype_name: str, ours: float, baseline: float, float32_bound: float = 1e-5) -> bool:
    """float32: under float32_bound; float16/bfloat16: within twice torch's own error in that dtype + 1 ulp."""
    if dtype_name == "float32":
        return ours <= float32_bound
    floor = 2.0**-11 if dtype_name == "float16" else 2.0**-8  # one ulp near 1
    return ours <= 2.0 * baseline + floor


def check_all(launchers: Launchers, quick: bool) -> list[dict]:
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    rows = []
    head_dims = (64,) if quick else (24, 32, 64, 128)  # 24: the SIMT fallback of 16-bit types
    for dtype_name in DTYPES:
        for bs in BLOCK_SIZES:
            for lut_heads in (1, 2):
                for head_dim in head_dims:
                    if quick and bs not in (16, 64):
                        continue
                    errors = run_case(launchers, rng, dtype_name, bs, lut_heads, head_dim)
                    for op, (ours, base) in errors.items():
                        judged_as = "float32" if op.endswith("_mixed") else dtype_name
                        rows.append({"op": op, "dtype": dtype_name, "bs": bs, "lut_heads": lut_heads, "D": head_dim,
                                     "err": ours, "torch_err": base, "ok": passes(judged_as, ours, base)})
                    # NaN cases: the finite entries within the float32 bound, or within 1% (16-bit outputs).
                    for op, ours in run_nan_case(launchers, rng, dtype_name, bs, lut_heads, head_dim).items():
                        bound = 1e-5 if dtype_name == "float32" else 1e-2
                        rows.append({"op": op, "dtype": dtype_name, "bs": bs, "lut_heads": lut_heads, "D": head_dim,
                                     "err": ours, "torch_err": 0.0, "ok": ours <= bound})
    return rows


def bench(launchers: Launchers) -> list[dict]:
    """Times nt / nn / softmax on a local-window layout: T = 16384, H = 8, D = 64, bs = 64, bf16."""
    from bsattn.patterns import Local
    from bsattn.tables import tables_for_pattern

    results = []
    batch, heads, head_dim, n_ctx = 1, 8, 64, 16384
    width = heads * head_dim
    for bs in (32, 64):
        tables = tables_for_pattern(Local(1024), n_ctx, n_ctx, bs, heads)
        nnz, nqb = tables.blocks, tables.ctx_blks_q
        luts = {name: dev(getattr(tables, name)) for name in ("nt_lut", "nn_lut", "mask_words")}
        q = torch.randn(batch, n_ctx, width, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(batch, heads, nnz, bs, bs, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(w)
        out_dense = torch.empty_like(q)
        s = stream()
        calls = {
            "nt": lambda: launchers.lib.bsattn_nt(2, q.data_ptr(), q.data_ptr(), luts["nt_lut"].data_ptr(), out.data_ptr(),
                                                  batch, heads, n_ctx, n_ctx, width, 1, nnz, bs, s),
            "nn": lambda: launchers.lib.bsattn_dsd(2, 0, w.data_ptr(), q.data_ptr(), luts["nn_lut"].data_ptr(),
                                                   out_dense.data_ptr(), batch, heads, nnz, bs, n_ctx, width, 1, nqb + nnz, nqb, s),
            "softmax": lambda: launchers.lib.bsattn_masked_softmax(2, w.data_ptr(), out.data_ptr(), 0.125,
                                                                   luts["nn_lut"].data_ptr(), luts["mask_words"].data_ptr(),
                                                                   0, 0, batch, heads, nnz, bs, 1, 1, nqb + nnz, nqb, s),
            "copy": lambda: out.copy_(w),
        }
        flops = 2 * bs * bs * head_dim * nnz * batch * heads
        bytes_rw = 2 * w.numel() * w.element_size()
        for name, call in calls.items():
            for _ in range(3):
                call()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(20):
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            t = float(np.median(times))
            rate = f"{flops / t / 1e12:.1f} TFLOP/s" if name in ("nt", "nn") else f"{bytes_rw / t / 1e9:.0f} GB/s"
            results.append({"op": name, "bs": bs, "blocks": nnz, "ms": t * 1e3, "rate": rate})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True)
    parser.add_argument("--quick", action="store_true", help="a few cases (for compute-sanitizer)")
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args()
    launchers = Launchers(args.lib)
    rows = check_all(launchers, args.quick)
    failed = [r for r in rows if not r["ok"]]
    print(f"{'op':>16} {'dtype':>9} {'worst err':>10} {'torch err':>10}  cases  failed")
    for op in ("nt", "nn", "tn", "softmax", "softmax_grad", "nan_softmax", "nan_softmax_grad", "nan_nn", "nan_tn"):
        for dtype_name in DTYPES:
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype_name]
            worst = max(sel, key=lambda r: r["err"])
            print(f"{op:>16} {dtype_name:>9} {worst['err']:10.2e} {worst['torch_err']:10.2e} {len(sel):6d} "
                  f"{sum(not r['ok'] for r in sel):6d}")
    timings = [] if args.no_bench else bench(launchers)
    for t in timings:
        print(f"bench {t['op']:>8} bs={t['bs']:<4} blocks={t['blocks']:<7} {t['ms']:8.3f} ms  {t['rate']}")
    out = Path(os.environ.get("OUT", "."))
    (out / ("harness_quick.json" if args.quick else "harness.json")).write_text(
        json.dumps({"checks": rows, "bench": timings}, indent=1))
    for r in failed:
        print("FAILED", r)
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
