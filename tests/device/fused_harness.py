"""GPU harness of the fused attention launchers (bsattn_fused_forward / bsattn_fused_backward).

Runs on the device machine (PyTorch, no TensorFlow), with torch tensors as buffers:

  checks   every dtype x block size (8..128) x head dim (24: SIMT in every dtype; 32/64/128: tensor
           cores for float16/bfloat16 at bs >= 16) x feature variant, on fresh random inputs, outputs
           poisoned with NaN, against bsattn.reference (float64 on the CPU): out, lse, dq, dk, dv, dbias.
           Variants: plain; key padding + bias [B, H] + dropout + per-head layouts with different
           block counts + Tq != Tk; bias [1, 1] + key padding + dlse; bias [1, H] + dropout + partial
           blocks with fully masked rows + empty rows; bias [B, 1] + key padding; NaN/Inf in v, k and
           bias at padded keys and under -inf bias columns (must reach nothing) and at attended keys
           (NaN, +inf and -inf exactly where the float64 reference has them); grouped-query attention
           (heads 4, kv_heads 2 with key padding + bias [1, H] + dropout + per-head layouts; kv_heads 1
           with bias [B, 1] + dlse), packed sequences (segment ids, with key padding; with kv_heads 2 and
           bias [B, H]; with NaN q at one segment's queries, which reaches no other segment), strided_period
           (sparse_attention's 'strided' without transposes: L = 3 with random per-head tables, partial blocks
           dropping rows, key padding with NaN/Inf k, v at padded keys, dropout, dlse; L = 2 with the Strided
           pattern's tables, grouped heads 4 on 2, segment ids, key padding), against the float64 reference of the
           permuted inputs, un-permuted; also bit for bit against the launch without strided_period on the
           permuted inputs, un-permuted (out, lse, the deterministic dq, dk, dv and the atomic path's dk, dv),
           and the launchers' BSATTN_ERROR_SHAPE for the cases strided_period excludes. head_major ([B, H, T, D]
           activations: grouped heads 4 on 2, key padding, bias [B, H], dropout, dlse; head_major_strided: L = 2
           with segment ids, grouped heads, key padding, dlse) against the float64 reference of the inputs
           transposed back, and bit for bit against the default layout's launch on the [B, T, H*D] inputs (out,
           lse, dk, dv, dbias of the atomic and the deterministic backward, dq of the deterministic one, and of
           the atomic one on the SIMT path, whose dq has one writer).
           Error = max |ours - ref| / max |ref|. float32 must stay
           under 1e-4; float16/bfloat16 under twice the error of the same attention computed densely
           by torch in that dtype (autograd for the gradients) + one ulp near 1.
  decode   (variant) KV-cache decoding steps against the float64 reference, NaN in the unwritten cache
           (tests/device/fused_decode.py); --decode times one decode step against FlexAttention's decode.
  bench    bf16 forward (and forward+backward) of the fused op against FlexAttention with the same
           block mask (BlockMask.from_kv_blocks of our tables, full/partial blocks alike) and against
           dense causal SDPA (flash and cuDNN backends), for causal / local / strided / fixed layouts.

    python tests/device/fused_harness.py --lib build/device/libbsattn_cuda.so [--quick] [--no-bench] [--decode]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DTYPES, dev, error, passes, poisoned, stream

from bsattn import patterns, reference
from bsattn.fused_tables import (
    FusedTables,
    build_fused_tables,
    fused_tables_for_pattern,
)

BLOCK_SIZES = (8, 16, 32, 64, 128)
VARIANTS = ("plain", "padding_bias_dropout", "shared_bias_dlse", "dropout_masked_rows", "batch_bias", "nan_masked",
            "gqa", "mqa", "segments", "segments_gqa_bias", "segments_nan", "strided", "strided_segments", "head_major",
            "head_major_strided", "decode")
# The bias shape [Bb, Hb] of each variant (B = 2, H = 2 or 4): every broadcast combination appears.
BIAS_SHAPES = {"padding_bias_dropout": (2, 2), "shared_bias_dlse": (1, 1), "dropout_masked_rows": (1, 2),
               "batch_bias": (2, 1), "nan_masked": (2, 2), "gqa": (1, 4), "mqa": (2, 1), "segments_gqa_bias": (2, 4),
               "head_major": (2, 4)}
# (heads, kv_heads) of the grouped-query variants (the others: 2 heads, no grouping).
GROUPS = {"gqa": (4, 2), "mqa": (4, 1), "segments_gqa_bias": (4, 2), "head_major": (4, 2), "head_major_strided": (4, 2)}
SEGMENTS = ("segments", "segments_gqa_bias", "segments_nan")
# strided_period L of the strided variants (T = 6 or 4 blocks: T / L = 2 blocks per residue class).
STRIDED = {"strided": 3, "strided_segments": 2, "head_major_strided": 2}
# The variants launched on [B, H, T, D] activations (bsattn_fused_args.head_major).
HEAD_MAJOR = ("head_major", "head_major_strided")
I64, PTR = ctypes.c_int64, ctypes.c_void_p
# Checked outputs: _det = the deterministic backward (BSATTN_BACKWARD_DETERMINISTIC), det_repeat = two such runs
# bit for bit.
# strided_bits: the strided launch equals the plain one on permuted inputs bit for bit; strided_errors: the launchers
# refuse what strided_period excludes; head_major_bits: the head-major launch equals the default layout's bit for bit.
OUTPUTS = ("out", "lse", "dq", "dk", "dv", "dbias", "dq_det", "dk_det", "dv_det", "dbias_det", "det_repeat",
           "strided_bits", "strided_errors", "head_major_bits")


class FusedArgs(ctypes.Structure):
    """bsattn_fused_args of ops/cuda/bsattn_cuda.h."""

    _fields_ = [
        ("dtype", ctypes.c_int), ("batch", I64), ("heads", I64), ("head_dim", I64), ("tq", I64), ("tk", I64),
        ("block_size", I64), ("q", PTR), ("k", PTR), ("v", PTR), ("layout_heads", I64), ("row_ptr", PTR),
        ("row_entries", PTR), ("col_ptr", PTR), ("col_entries", PTR), ("masks", PTR),
        ("key_padding_mask", PTR), ("bias", PTR), ("bias_batch", I64), ("bias_heads", I64), ("scale", ctypes.c_float),
        ("dropout_rate", ctypes.c_float), ("seed", I64),
        ("kv_heads", I64), ("q_segment_ids", PTR), ("k_segment_ids", PTR),
        ("q_offset", I64), ("decode", ctypes.c_int), ("t_max", I64),
        ("strided_period", I64), ("head_major", ctypes.c_int),
    ]


class FusedLaunchers:
    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.bsattn_cuda_error_string.restype = ctypes.c_char_p
        args = ctypes.POINTER(FusedArgs)
        lib.bsattn_fused_forward.argtypes = [args, PTR, PTR, PTR]
        lib.bsattn_fused_backward_workspace.argtypes = [args, ctypes.c_int]
        lib.bsattn_fused_backward_workspace.restype = I64
        lib.bsattn_fused_backward.argtypes = [args] + [PTR] * 8 + [PTR, I64, PTR]
        if hasattr(lib, "bsattn_fused_backward_ex"):  # builds before issue 14 lack it (--compare)
            lib.bsattn_fused_backward_ex.argtypes = [args] + [PTR] * 8 + [PTR, I64, ctypes.c_int, PTR]
        self.lib = lib

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: {self.lib.bsattn_cuda_error_string(code).decode()}")


def to_head_major(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads*D] -> a contiguous [B, heads, T, D] copy."""
    batch, t, width = x.shape
    return x.view(batch, t, heads, width // heads).transpose(1, 2).contiguous()


def from_head_major(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, D] -> [B, T, heads*D] (a copy)."""
    batch, heads, t, d = x.shape
    return x.transpose(1, 2).reshape(batch, t, heads * d)


class DeviceCase:
    """One case's device buffers (kept referenced while launchers run: a freed temporary's memory would be
    reused before the kernel reads it) and its FusedArgs. q, k, v: device tensors [B, T, H*D]."""

    def __init__(self, code: int, q, k, v, tables: FusedTables, heads: int, scale: float, kpm=None, bias=None,
                 dropout_rate: float = 0.0, seed: int = 0, kv_heads: int = 0, q_ids=None, k_ids=None,
                 q_offset: int | None = None, strided_period: int = 0, head_major: bool = False):
        """q_offset (decoding): q holds the queries at [q_offset, q_offset + Tq) of tables' T_max rows.
        strided_period L: the tables address permuted positions (bsattn_fused_args.strided_period).
        head_major: the launch reads [B, H, T, D] copies of q and [B, KVH, T, D] ones of k, v (tensors["q"] etc.)."""
        batch, tq, width = q.shape
        tk = k.shape[1]
        if head_major:
            q, k, v = to_head_major(q, heads), to_head_major(k, kv_heads or heads), to_head_major(v, kv_heads or heads)
        self.tensors = {"q": q, "k": k, "v": v}
        if q_ids is not None:
            self.tensors["q_ids"], self.tensors["k_ids"] = dev(q_ids), dev(k_ids)
        for name in ("row_ptr", "row_entries", "col_ptr", "col_entries", "masks"):
            self.tensors[name] = dev(getattr(tables, name))
        if self.tensors["masks"].numel() == 0:  # a valid pointer even without partial blocks
            self.tensors["masks"] = dev(np.zeros(1, np.int32))
        if kpm is not None:
            self.tensors["kpm"] = dev(np.asarray(kpm, np.uint8))
        if bias is not None:
            self.tensors["bias"] = bias
        ptr = lambda name: self.tensors[name].data_ptr() if name in self.tensors else None
        self.args = FusedArgs(
            dtype=code, batch=batch, heads=heads, head_dim=width // heads, tq=tq, tk=tk,
            block_size=tables.block_size, q=ptr("q"), k=ptr("k"), v=ptr("v"), layout_heads=tables.lut_heads,
            row_ptr=ptr("row_ptr"), row_entries=ptr("row_entries"), col_ptr=ptr("col_ptr"),
            col_entries=ptr("col_entries"), masks=ptr("masks"), key_padding_mask=ptr("kpm"), bias=ptr("bias"),
            bias_batch=0 if bias is None else bias.shape[0], bias_heads=0 if bias is None else bias.shape[1],
            scale=scale, dropout_rate=dropout_rate, seed=seed, kv_heads=kv_heads, q_segment_ids=ptr("q_ids"),
            k_segment_ids=ptr("k_ids"), q_offset=q_offset or 0, decode=int(q_offset is not None),
            t_max=tables.n_q if q_offset is not None else 0, strided_period=strided_period, head_major=int(head_major))


def random_fused_tables(rng, bs: int, n_qb: int, n_kb: int, layouts: int, masked_rows: bool) -> FusedTables:
    """Random per-head layouts (block counts differ between heads, some rows empty) with random partial blocks;
    with masked_rows some partial blocks also drop whole query rows."""
    active = rng.random((layouts, n_qb, n_kb)) < rng.uniform(0.35, 0.75, (layouts, 1, 1))
    active[:, 0, :] = False  # an empty query-block row in every head
    active[:, -1, 0] = True
    full = active & (rng.random(active.shape) < 0.5)

    def masks(head, qb, kb):
        keep = rng.random((len(qb), bs, bs)) < 0.7
        if masked_rows:
            keep[:, rng.integers(0, bs, 2), :] = False
        return keep

    return build_fused_tables(active, bs, full, masks)


def variant_inputs(rng, variant: str, dtype, bs: int, head_dim: int) -> dict:
    """Inputs of one check (float64 arrays holding values exactly representable in dtype). The strided variants'
    inputs are in token order, their tables over the permuted positions (case["strided_period"])."""
    cast = lambda x: torch.from_numpy(x).to(dtype).double().numpy()
    batch = 2
    heads, kv_heads = GROUPS.get(variant, (2, 2))
    n_qb, n_kb = (3, 5) if variant in ("padding_bias_dropout", "dropout_masked_rows", "gqa", "segments",
                                       "head_major") else (4, 4)
    per_head = variant in ("padding_bias_dropout", "shared_bias_dlse", "nan_masked", "gqa", "segments_gqa_bias",
                           "head_major")
    if variant == "strided":  # random per-head tables, partial blocks dropping whole rows
        n_qb = n_kb = 6
        tables = random_fused_tables(rng, bs, n_qb, n_kb, heads, True)
    elif variant in ("strided_segments", "head_major_strided"):  # sparse_attention's 'strided' tables (shared)
        n_qb = n_kb = 4
        tables = fused_tables_for_pattern(patterns.Strided(STRIDED[variant]), n_qb * bs, n_kb * bs, bs)
    else:
        tables = random_fused_tables(rng, bs, n_qb, n_kb, heads if per_head else 1, variant == "dropout_masked_rows")
    tq, tk, width, kv_width = n_qb * bs, n_kb * bs, heads * head_dim, kv_heads * head_dim
    case = {
        "tables": tables, "heads": heads, "scale": float(np.float32(rng.uniform(0.5, 1.5) / math.sqrt(head_dim))),
        "q": cast(rng.uniform(-1, 1, (batch, tq, width))), "k": cast(rng.uniform(-1, 1, (batch, tk, kv_width))),
        "v": cast(rng.uniform(-1, 1, (batch, tk, kv_width))), "dout": cast(rng.uniform(-1, 1, (batch, tq, width))),
        "kpm": None, "bias": None, "dropout_rate": 0.0, "seed": int(rng.integers(0, 2**62)), "dlse": None,
        "kv_heads": kv_heads, "q_ids": None, "k_ids": None, "strided_period": STRIDED.get(variant, 0),
    }
    # packed: 3 runs per batch entry, boundaries anywhere (inside blocks too)
    if variant in SEGMENTS or variant in ("strided_segments", "head_major_strided"):
        case["q_ids"], case["k_ids"] = (np.stack([np.repeat(np.arange(3), np.diff(np.r_[0, np.sort(
            rng.choice(np.arange(1, n), 2, replace=False)), n])) for _ in range(batch)]).astype(np.int32)
            for n in (tq, tk))  # fmt: skip
    if variant in ("padding_bias_dropout", "shared_bias_dlse", "batch_bias", "nan_masked", "gqa", "segments",
                   "strided", "strided_segments", *HEAD_MAJOR):
        case["kpm"] = rng.random((batch, tk)) < 0.8
    if variant in BIAS_SHAPES:
        case["bias"] = cast(rng.normal(0, 1, (*BIAS_SHAPES[variant], tq, tk)))
    if variant == "nan_masked":
        poison_masked(rng, case, bs)
    if variant in ("padding_bias_dropout", "dropout_masked_rows", "gqa", "strided", "head_major"):
        case["dropout_rate"] = 0.25
    if variant == "strided":  # NaN/Inf k and v at padded keys (tokens): a padding read at the wrong row would leak
        case["clean"] = {n: case[n].copy() for n in ("q", "k", "v")} | {"bias": None}
        padded = np.argwhere(~case["kpm"])
        for b, j in padded[rng.permutation(len(padded))[:4]]:
            case["v"][b, j] = np.nan
            case["k"][b, j] = rng.choice([np.nan, np.inf, -np.inf])
    if variant == "segments_nan":  # NaN q at the queries of segment 1 of batch entry 0: their rows turn NaN only
        case["clean"] = {n: case[n] for n in ("q", "k", "v", "bias")}
        case["q"] = case["q"].copy()
        case["q"][0, case["q_ids"][0] == 1] = np.nan
    if variant in ("shared_bias_dlse", "mqa", "strided", *HEAD_MAJOR):
        case["dlse"] = rng.normal(0, 0.5, (batch, heads, tq)).astype(np.float32).astype(np.float64)
    return case


def poison_masked(rng, case: dict, bs: int) -> None:
    """NaN/Inf where nothing may read them: v, k and bias of padded keys, a key column under a -inf bias
    (whole for batch entry 0, the lower half of the rows for entry 1); plus a NaN v inside a partial block,
    which the rows attending it turn NaN (the reference says which). case["clean"] keeps the inputs before."""
    kpm, k, v, bias = case["kpm"], case["k"], case["v"], case["bias"]
    tq, tk = bias.shape[2:]
    kpm[:, 1] = False
    cols = rng.choice(np.flatnonzero(kpm.all(0)), 2, replace=False)
    bias[0, :, :, cols[0]] = -np.inf  # masks, not poison: part of the clean case
    bias[1, :, tq // 2 :, cols[1]] = -np.inf
    case["clean"] = {n: case[n].copy() for n in ("q", "k", "v", "bias")}
    padded = np.argwhere(~kpm)
    for b, j in padded[rng.permutation(len(padded))[:4]]:
        v[b, j] = np.nan
        k[b, j] = rng.choice([np.nan, np.inf, -np.inf])
        bias[b, :, :, j] = np.nan
    v[0, cols[0]] = np.nan
    k[0, cols[0]] = np.nan
    v[1, cols[1], rng.integers(v.shape[2])] = np.nan  # attended by the upper rows only: they turn NaN
    head = rng.integers(case["heads"])
    width = v.shape[2] // case["heads"]
    v[0, rng.integers(bs, tk), head * width : (head + 1) * width] = np.nan


def dense_baseline(c: dict, dtype) -> dict:
    """The same attention computed densely by torch in `dtype` (autograd for the gradients): the error floor."""
    heads, tables = c["heads"], c["tables"]
    c = dict(c, **c.get("clean", {}))  # the error floor of the same case without poison
    split = lambda x, n=heads: x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)
    group = heads // c["kv_heads"]
    kv = lambda x: split(x, c["kv_heads"]).repeat_interleave(group, dim=1)  # K/V head h // group at head h
    q, k, v = (dev(c[n], dtype).requires_grad_() for n in ("q", "k", "v"))
    bias = None if c["bias"] is None else dev(c["bias"], dtype).requires_grad_()
    keep = dev(tables.token_mask())[None]  # [1, L, Tq, Tk]
    if c["kpm"] is not None:
        keep = keep & dev(c["kpm"])[:, None, None, :]
    if c["q_ids"] is not None:
        keep = keep & (dev(c["q_ids"])[:, None, :, None] == dev(c["k_ids"])[:, None, None, :])
    s = (split(q) @ kv(k).transpose(-1, -2)) * c["scale"]
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~keep, -float("inf"))
    # A row with no kept key: output 0 and lse -inf, as in the fused op (computed on zeros, so that no NaN
    # reaches autograd).
    any_kept = keep.any(-1, keepdim=True)
    s = torch.where(any_kept, s, 0.0)
    lse = torch.logsumexp(s.float(), -1)
    p = torch.softmax(s, -1) * any_kept
    if c["dropout_rate"]:
        z = reference.dropout_keep_mask(c["seed"], c["dropout_rate"], *p.shape) / (1 - c["dropout_rate"])
        p = p * dev(z, dtype)
    out = (p @ kv(v)).transpose(1, 2).reshape(q.shape)
    loss = (out.float() * dev(c["dout"])).sum()
    if c["dlse"] is not None:
        loss = loss + (lse * any_kept[..., 0] * dev(c["dlse"])).sum()
    loss.backward()
    lse = torch.where(any_kept[..., 0], lse, -float("inf"))
    result = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if bias is not None:
        result["dbias"] = bias.grad
    return result


def lse_error(ours: torch.Tensor, ref: np.ndarray) -> float:
    got = ours.double().cpu().numpy()
    empty = np.isneginf(ref)
    if not np.array_equal(np.isneginf(got), empty) or not np.isfinite(got[~empty]).all():
        return float("inf")  # an empty row must give -inf exactly, every other row a finite value
    return float(np.abs(got[~empty] - ref[~empty]).max(initial=0) / max(np.abs(ref[~empty]).max(initial=0), 1e-30))


def nan_error(ours: torch.Tensor, ref: np.ndarray, pattern: bool = True) -> float:
    """error() over the entries where the reference is finite; with pattern, inf unless NaN, +inf and -inf
    sit exactly where the reference has them (masked positions must not leak, attended ones must)."""
    got = ours.double().cpu().numpy()
    finite = np.isfinite(ref)
    if pattern and not all(np.array_equal(f(got), f(ref)) for f in (np.isnan, np.isposinf, np.isneginf)):
        return float("inf")
    if not np.isfinite(got[finite]).all():
        return float("inf")
    return float(np.abs(got[finite] - ref[finite]).max(initial=0) / max(np.abs(ref[finite]).max(initial=0), 1e-30))


def run_check(launchers: FusedLaunchers, rng, dtype_name: str, bs: int, head_dim: int, variant: str) -> dict:
    if variant == "decode":  # KV-cache decoding steps, forward only (fused_decode.py)
        from fused_decode import run_decode_check

        return run_decode_check(launchers, rng, dtype_name, bs, head_dim, DeviceCase, random_fused_tables)
    dtype, code = DTYPES[dtype_name]
    c = variant_inputs(rng, variant, dtype, bs, head_dim)
    head_major = variant in HEAD_MAJOR
    case = device_case(code, dtype, c, c["strided_period"], head_major)
    batch, tq, width = c["q"].shape
    s = stream()
    out_shape = (batch, c["heads"], tq, head_dim) if head_major else (batch, tq, width)
    out, lse = poisoned(out_shape, dtype), poisoned((batch, c["heads"], tq), torch.float32)
    launchers.check(launchers.lib.bsattn_fused_forward(ctypes.byref(case.args), out.data_ptr(), lse.data_ptr(), s),
                    "fused_forward")
    # strided_period: the reference (and the dense baseline) of the permuted inputs, mapped back to token order.
    if c["strided_period"]:
        rc, perm = strided_positions(c)
        inv = np.argsort(perm)
        tokens = lambda x, axis=1: None if x is None else x[(slice(None),) * axis + (inv,)]  # noqa: E731
    else:
        rc, tokens = c, lambda x, axis=1: x  # noqa: E731
    kw = {"scale": rc["scale"], "key_padding_mask": rc["kpm"], "bias": rc["bias"], "dropout_rate": rc["dropout_rate"],
          "seed": rc["seed"], "kv_heads": rc["kv_heads"], "q_segment_ids": rc["q_ids"], "k_segment_ids": rc["k_ids"]}
    ref_out, ref_lse = reference.fused_attention(rc["q"], rc["k"], rc["v"], rc["tables"], rc["heads"], **kw)
    ref_out, ref_lse = tokens(ref_out), tokens(ref_lse, 2)

    # The backward reads the forward's own out and lse, as in training.
    dout_d = dev(c["dout"], dtype)
    if head_major:
        dout_d = to_head_major(dout_d, c["heads"])
    dlse_d = None if c["dlse"] is None else dev(c["dlse"], torch.float32)
    grads = {n: poisoned(case.tensors[n].shape, dtype) for n in ("q", "k", "v")}
    dbias = None if c["bias"] is None else poisoned(c["bias"].shape, dtype)
    with_dbias = int(dbias is not None)
    ws_bytes = launchers.lib.bsattn_fused_backward_workspace(ctypes.byref(case.args), with_dbias)
    workspace = poisoned((max(ws_bytes, 4) // 4,), torch.float32)
    launchers.check(launchers.lib.bsattn_fused_backward(
        ctypes.byref(case.args), out.data_ptr(), lse.data_ptr(), dout_d.data_ptr(),
        None if dlse_d is None else dlse_d.data_ptr(), grads["q"].data_ptr(), grads["k"].data_ptr(),
        grads["v"].data_ptr(), None if dbias is None else dbias.data_ptr(), workspace.data_ptr(), ws_bytes, s),
        "fused_backward")
    det = [backward(launchers, case, out, lse, dout_d, dlse_d, grads, dbias, ws_bytes, 1) for _ in range(2)]
    ref_grads = reference.fused_attention_grad(rc["q"], rc["k"], rc["v"], rc["tables"], rc["heads"], rc["dout"],
                                               dlse=rc["dlse"], **kw)
    ref_grads = (*(tokens(g) for g in ref_grads[:3]), ref_grads[3])  # no bias with strided_period
    base = dense_baseline(rc, dtype)
    if c["strided_period"]:
        inv_d = torch.from_numpy(inv).cuda()
        base = {n: x[:, :, inv_d] if n == "lse" else x[:, inv_d] for n, x in base.items()}
    torch.cuda.synchronize()
    if head_major:  # ours in [B, T, H*D] from here on (copies: the launch's own buffers stay as they were)
        out = from_head_major(out)
        grads = {n: from_head_major(x) for n, x in grads.items()}
        det = [{n: x if n == "dbias" or x is None else from_head_major(x) for n, x in run.items()} for run in det]
    if "clean" in c:  # poisoned inputs: NaN/Inf exactly where the reference has them
        err = lse_err = nan_error
    else:
        err, lse_err = (lambda x, ref, pattern=True: error(x, ref)), (lambda x, ref, pattern=True: lse_error(x, ref))
    errors = {"out": (err(out, ref_out), err(base["out"], ref_out, False)),
              "lse": (lse_err(lse, ref_lse), lse_err(base["lse"], ref_lse, False))}
    for name, ours, ref in zip(("dq", "dk", "dv", "dbias"), (grads["q"], grads["k"], grads["v"], dbias), ref_grads):
        if ref is not None:
            errors[name] = (err(ours, ref), err(base[name], ref, False))
            errors[name + "_det"] = (err(det[0][name], ref), err(base[name], ref, False))
    errors["det_repeat"] = (repeat_error(det), 0.0)
    if c["strided_period"]:
        ours = {"out": out, "lse": lse, "dk": grads["k"], "dv": grads["v"],
                **{f"{n}_det": det[0][n] for n in ("dq", "dk", "dv")}}
        errors["strided_bits"] = (strided_bits_error(launchers, code, dtype, rc, inv_d, ours), 0.0)
        errors["strided_errors"] = (strided_errors(launchers, case), 0.0)
    if head_major:
        # The atomic dq is deterministic on the SIMT path only (one writer per element there).
        simt = dtype_name == "float32" or head_dim not in (32, 64, 128) or bs < 16
        ours = {"out": out, "lse": lse, "dk": grads["k"], "dv": grads["v"], "dbias": dbias,
                **({"dq": grads["q"]} if simt else {}), **{f"{n}_det": det[0][n] for n in ("dq", "dk", "dv", "dbias")}}
        errors["head_major_bits"] = (head_major_bits_error(launchers, code, dtype, c, ours), 0.0)
    return errors


def device_case(code: int, dtype, c: dict, strided_period: int = 0, head_major: bool = False) -> DeviceCase:
    """The DeviceCase of variant inputs c (device copies in dtype)."""
    return DeviceCase(code, dev(c["q"], dtype), dev(c["k"], dtype), dev(c["v"], dtype), c["tables"], c["heads"],
                      c["scale"], c["kpm"], None if c["bias"] is None else dev(c["bias"], dtype), c["dropout_rate"],
                      c["seed"], c["kv_heads"], c["q_ids"], c["k_ids"], strided_period=strided_period,
                      head_major=head_major)


def same_bits(ours: dict, theirs: dict) -> bool:
    """Whether every tensor of ours (None: not produced) equals that of theirs bit for bit."""
    bits = lambda x: x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)  # noqa: E731
    return all((ours[n] is None and theirs[n] is None) or torch.equal(bits(ours[n]), bits(theirs[n])) for n in ours)


def head_major_bits_error(launchers: FusedLaunchers, code: int, dtype, c: dict, ours: dict) -> float:
    """0 if the head-major launch's results (ours, transposed to [B, T, H*D]) equal bit for bit those of the launch
    in the default layout on the same inputs (the same sums in the same order: only addresses differ), else inf.
    Runs the atomic and the deterministic backward (ours' keys: out, lse, dk, dv, dbias, maybe dq, and *_det)."""
    case = device_case(code, dtype, c, c["strided_period"])
    batch, tq, width = c["q"].shape
    out, lse = poisoned((batch, tq, width), dtype), poisoned((batch, c["heads"], tq), torch.float32)
    launchers.check(launchers.lib.bsattn_fused_forward(ctypes.byref(case.args), out.data_ptr(), lse.data_ptr(),
                                                       stream()), "fused_forward (token-major)")
    dout = dev(c["dout"], dtype)
    dlse = None if c["dlse"] is None else dev(c["dlse"], torch.float32)
    like = {n: case.tensors[n] for n in ("q", "k", "v")}
    dbias_like = case.tensors.get("bias")
    ws_bytes = launchers.lib.bsattn_fused_backward_workspace(ctypes.byref(case.args), int(dbias_like is not None))
    atomic = backward(launchers, case, out, lse, dout, dlse, like, dbias_like, ws_bytes, 0)
    det = backward(launchers, case, out, lse, dout, dlse, like, dbias_like, ws_bytes, 1)
    theirs = {"out": out, "lse": lse, **atomic, **{f"{n}_det": x for n, x in det.items()}}
    return 0.0 if same_bits(ours, theirs) else float("inf")


def strided_positions(c: dict) -> tuple[dict, np.ndarray]:
    """A strided case (inputs in token order) as the plain op sees it after sparse_attention's strided_transpose:
    every token-indexed input permuted to the positions (position p holds token perm[p]) → (case, perm)."""
    perm = patterns.strided_permutation(c["q"].shape[1], c["strided_period"])
    at = lambda x, axis=1: None if x is None else x[(slice(None),) * axis + (perm,)]  # noqa: E731
    rc = dict(c, strided_period=0, dlse=at(c["dlse"], 2))
    for name in ("q", "k", "v", "dout", "kpm", "q_ids", "k_ids"):
        rc[name] = at(c[name])
    if "clean" in c:
        rc["clean"] = {n: at(x) for n, x in c["clean"].items()}
    return rc, perm


def strided_bits_error(launchers: FusedLaunchers, code: int, dtype, rc: dict, inv, ours: dict) -> float:
    """0 if the strided launch's results (ours: token order) equal bit for bit those of the launch without
    strided_period on the permuted inputs rc, mapped back to token order (the same sums in the same order),
    else inf. The atomic path's dq is left out (its order of additions varies between runs)."""
    case = device_case(code, dtype, rc)
    batch, tq, width = rc["q"].shape
    out, lse = poisoned((batch, tq, width), dtype), poisoned((batch, rc["heads"], tq), torch.float32)
    launchers.check(launchers.lib.bsattn_fused_forward(ctypes.byref(case.args), out.data_ptr(), lse.data_ptr(),
                                                       stream()), "fused_forward (permuted)")
    dout = dev(rc["dout"], dtype)
    dlse = None if rc["dlse"] is None else dev(rc["dlse"], torch.float32)
    like = {n: case.tensors[n] for n in ("q", "k", "v")}
    ws_bytes = launchers.lib.bsattn_fused_backward_workspace(ctypes.byref(case.args), 0)
    atomic = backward(launchers, case, out, lse, dout, dlse, like, None, ws_bytes, 0)
    det = backward(launchers, case, out, lse, dout, dlse, like, None, ws_bytes, 1)
    theirs = {"out": out[:, inv], "lse": lse[:, :, inv], "dk": atomic["dk"][:, inv], "dv": atomic["dv"][:, inv],
              **{f"{n}_det": det[n][:, inv] for n in ("dq", "dk", "dv")}}
    return 0.0 if same_bits(ours, theirs) else float("inf")


def strided_errors(launchers: FusedLaunchers, case: DeviceCase) -> float:
    """0 if both launchers return BSATTN_ERROR_SHAPE (launching nothing) for what strided_period excludes:
    L < 0, T % L != 0, (T / L) % block_size != 0, Tq != Tk, a bias, decoding; else inf."""
    t, bs = case.args.tq, case.args.block_size
    not_dividing = next(n for n in (5, 7, 9, 11) if t % n)
    # T / L = bs / 2: L divides T, T / L not a multiple of the block size.
    bad = [{"strided_period": -1}, {"strided_period": not_dividing}, {"strided_period": 2 * t // bs}, {"tk": t - bs},
           {"bias": case.args.q, "bias_batch": 1, "bias_heads": 1}, {"decode": 1, "t_max": t, "q_offset": 0}]
    codes = []
    for change in bad:
        args = FusedArgs.from_buffer_copy(case.args)
        for name, value in change.items():
            setattr(args, name, value)
        codes.append(launchers.lib.bsattn_fused_forward(ctypes.byref(args), None, None, None))
        codes.append(launchers.lib.bsattn_fused_backward(ctypes.byref(args), *[None] * 8, None, 0, None))
    return 0.0 if all(code == 10003 for code in codes) else float("inf")  # BSATTN_ERROR_SHAPE


def backward(launchers: FusedLaunchers, case: DeviceCase, out, lse, dout, dlse, like: dict, dbias_like, ws_bytes: int,
             flags: int) -> dict:
    """One bsattn_fused_backward_ex into fresh poisoned buffers shaped like `like` (q, k, v) / dbias_like."""
    grads = {n: poisoned(like[n].shape, like[n].dtype) for n in ("q", "k", "v")}
    dbias = None if dbias_like is None else poisoned(dbias_like.shape, dbias_like.dtype)
    workspace = poisoned((max(ws_bytes, 4) // 4,), torch.float32)
    launchers.check(launchers.lib.bsattn_fused_backward_ex(
        ctypes.byref(case.args), out.data_ptr(), lse.data_ptr(), dout.data_ptr(),
        None if dlse is None else dlse.data_ptr(), grads["q"].data_ptr(), grads["k"].data_ptr(),
        grads["v"].data_ptr(), None if dbias is None else dbias.data_ptr(), workspace.data_ptr(), ws_bytes, flags,
        stream()), "fused_backward_ex")
    result = {"d" + n: grads[n] for n in grads}
    result["dbias"] = dbias
    return result


def repeat_error(runs: list[dict]) -> float:
    """0 if the runs gave the same bits in every gradient, else inf."""
    same = all(a is None or torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                        b.view(torch.int16 if b.element_size() == 2 else torch.int32))
               for a, b in zip(runs[0].values(), runs[1].values()))
    return 0.0 if same else float("inf")


def check_all(launchers: FusedLaunchers, quick: bool, variants: tuple = (), dtypes: tuple = (),
              block_sizes: tuple = ()) -> list[dict]:
    """variants, dtypes, block_sizes: the subsets to run (empty: all; block sizes 16 and 64 under quick)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    rows = []
    for dtype_name in dtypes or DTYPES:
        for bs in block_sizes or ((16, 64) if quick else BLOCK_SIZES):
            for head_dim in (24, 64) if quick else (24, 32, 64, 128):
                for variant in variants or VARIANTS:
                    for out_name, (ours, base) in run_check(launchers, rng, dtype_name, bs, head_dim, variant).items():
                        rows.append({"out": out_name, "dtype": dtype_name, "bs": bs, "D": head_dim, "variant": variant,
                                     "err": ours, "torch_err": base, "ok": passes(dtype_name, ours, base, 1e-4)})
            done = [r for r in rows if r["dtype"] == dtype_name and r["bs"] == bs]
            print(f"  {dtype_name} bs={bs}: {len(done)} checks, {sum(not r['ok'] for r in done)} failed", flush=True)
    return rows


# ---- benchmark -----------------------------------------------------------------------------------------------


def bench_patterns(n_ctx: int, heads: int) -> dict:
    """The benchmark layouts: our pattern and the same predicate as a FlexAttention mask_mod."""
    seg = n_ctx // 128  # strided after the strided transpose: causal within segments of T/128 tokens

    def causal(b, h, q, kv):
        return kv <= q

    def local(b, h, q, kv):
        return (kv <= q) & (q - kv < 1024)

    def local256(b, h, q, kv):
        return (kv <= q) & (q - kv < 256)

    def strided(b, h, q, kv):
        return (kv <= q) & (q // seg == kv // seg)

    def fixed(b, h, q, kv):  # own 512-window + the last 128 tokens of every earlier window
        return (kv <= q) & ((q // 512 == kv // 512) | (kv % 512 >= 384))

    return {
        "causal": (patterns.Causal(), causal),
        "local": (patterns.Local(1024), local),
        "local256": (patterns.Local(256), local256),
        "strided": (patterns.Strided(128), strided),
        "fixed": (patterns.Fixed(512, 1, 1, heads, 128), fixed),
    }


def flex_block_mask(tables: FusedTables, mask_mod, n_ctx: int):
    """FlexAttention's BlockMask of exactly our active blocks (partial ones evaluate mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    layout = tables.layout[0]
    full = np.zeros_like(layout)
    qb, kb, mask_id = tables.block_coords(0)
    full[qb[mask_id < 0], kb[mask_id < 0]] = True
    partial = layout & ~full

    def ordered(m):
        m = torch.from_numpy(m).cuda()
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int32), dim=-1, stable=True).to(torch.int32)
        return num[None, None].contiguous(), idx[None, None].contiguous()

    kn, ki = ordered(partial)
    fn, fi = ordered(full)
    return BlockMask.from_kv_blocks(kn, ki, fn, fi, BLOCK_SIZE=tables.block_size, mask_mod=mask_mod,
                                    seq_lengths=(n_ctx, n_ctx))


def median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench(launchers: FusedLaunchers, lengths, dims, with_backward: bool, others: dict | None = None,
          only: tuple = ()) -> list[dict]:
    """others: name -> FusedLaunchers of other builds, timed on the same inputs (forward only); only: rows
    "D:pattern" (or "pattern" for every D) to run (default all)."""
    import torch._dynamo
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    # Every (pattern, length, head dim) is a new mask_mod closure and shape: one compile each.
    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.cache_size_limit = 512
    flex = torch.compile(flex_attention, dynamic=False)
    results = []
    batch, heads, bs = 1, 16, 128
    for n_ctx in lengths:
        for head_dim in dims:
            width = heads * head_dim
            q, k, v = (torch.randn(batch, n_ctx, width, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            qh, kh, vh = (x.view(batch, n_ctx, heads, head_dim).transpose(1, 2).contiguous() for x in (q, k, v))
            dense = {}
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        dense[name] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                            qh, kh, vh, is_causal=True))
                except Exception as exc:  # a backend this build lacks: say so in the table
                    dense[name] = float("nan")
                    print(f"sdpa {name}: {type(exc).__name__}: {str(exc)[:120]}")
            for pname, (pattern, mask_mod) in bench_patterns(n_ctx, heads).items():
                if only and pname not in only and f"{head_dim}:{pname}" not in only:
                    continue
                tables = fused_tables_for_pattern(pattern, n_ctx, n_ctx, bs)
                token_pairs = attended_pairs(tables)
                case = DeviceCase(2, q, k, v, tables, heads, 1.0 / math.sqrt(head_dim))
                args = case.args
                out = torch.empty_like(q)
                lse = torch.empty(batch, heads, n_ctx, device="cuda", dtype=torch.float32)
                s = stream()
                ours = median_ms(lambda: launchers.lib.bsattn_fused_forward(ctypes.byref(args), out.data_ptr(),
                                                                            lse.data_ptr(), s))
                variants = {}
                for name, other in (others or {}).items():
                    row_other = median_ms(lambda: other.lib.bsattn_fused_forward(ctypes.byref(args), out.data_ptr(),
                                                                                 lse.data_ptr(), s))
                    print(f"  variant {name}: {row_other:.3f} ms (this build {ours:.3f} ms)", flush=True)
                    variants[name] = {"fwd_ms": row_other}
                    if with_backward:  # bsattn_fused_backward (flags 0): older builds lack the _ex entry
                        fb = fused_fwd_bwd_ms(other, case, q, out, lse, None)
                        variants[name]["fwd_bwd_ms"] = fb
                        print(f"  variant {name}: fwd+bwd {fb:.3f} ms", flush=True)
                block_mask = flex_block_mask(tables, mask_mod, n_ctx)
                flex(qh, kh, vh, block_mask=block_mask)  # compile
                flex_ms = median_ms(lambda: flex(qh, kh, vh, block_mask=block_mask))
                ref = flex(qh, kh, vh, block_mask=block_mask).transpose(1, 2).reshape(batch, n_ctx, width)
                agree = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
                flops = 4.0 * batch * heads * head_dim * token_pairs
                row = {"T": n_ctx, "D": head_dim, "pattern": pname, "density": tables.density,
                       "ours_ms": ours, "flex_ms": flex_ms, "ours_tflops": flops / ours / 1e9,
                       "flex_tflops": flops / flex_ms / 1e9, "ours_vs_flex": flex_ms / ours,
                       "sdpa_flash_causal_ms": dense["flash"], "sdpa_cudnn_causal_ms": dense["cudnn"],
                       "max_diff_vs_flex": agree, "variants": variants}
                if with_backward:
                    row["ours_fwd_bwd_ms"] = fused_fwd_bwd_ms(launchers, case, q, out, lse, 0)
                    row["ours_fwd_bwd_det_ms"] = fused_fwd_bwd_ms(launchers, case, q, out, lse, 1)
                    row["flex_fwd_bwd_ms"] = flex_fwd_bwd_ms(flex, qh, kh, vh, block_mask)
                    row["fwd_bwd_vs_flex"] = row["flex_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
                    row["fwd_bwd_over_fwd"] = row["ours_fwd_bwd_ms"] / ours
                if pname == "strided":  # the same tables on token-order inputs (strided_period: no transposes)
                    strided = DeviceCase(2, q, k, v, tables, heads, 1.0 / math.sqrt(head_dim),
                                         strided_period=pattern.local_attn_ctx)
                    row["ours_strided_period_ms"] = median_ms(lambda: launchers.lib.bsattn_fused_forward(
                        ctypes.byref(strided.args), out.data_ptr(), lse.data_ptr(), s))
                    if with_backward:
                        row["ours_strided_period_fwd_bwd_ms"] = fused_fwd_bwd_ms(launchers, strided, q, out, lse, 0)
                    print(f"  strided_period={pattern.local_attn_ctx} (token order): fwd "
                          f"{row['ours_strided_period_ms']:.3f} ms" + (f", fwd+bwd "
                          f"{row['ours_strided_period_fwd_bwd_ms']:.3f} ms" if with_backward else ""), flush=True)
                results.append(row)
                extra = (f"  fwd+bwd ours {row['ours_fwd_bwd_ms']:.3f} (det {row['ours_fwd_bwd_det_ms']:.3f}) flex "
                         f"{row['flex_fwd_bwd_ms']:.3f} ms" if with_backward else "")
                print(f"bench T={n_ctx} D={head_dim} {pname:8s} ours {ours:8.3f} ms  flex {flex_ms:8.3f} ms  "
                      f"ratio {flex_ms / ours:5.2f}  ({row['ours_tflops']:.0f} vs {row['flex_tflops']:.0f} TFLOP/s)"
                      + extra, flush=True)
    return results


def attended_pairs(tables: FusedTables) -> int:
    """Attended (query, key) pairs of layout head 0: bs^2 per full block, the kept bits of each partial one."""
    _, _, mask_id = tables.block_coords(0)
    kept = tables.unpacked_masks().sum(axis=(1, 2))
    return int((mask_id < 0).sum()) * tables.block_size**2 + int(kept[mask_id[mask_id >= 0]].sum())


def flex_fwd_bwd_ms(flex, qh, kh, vh, block_mask) -> float:
    """FlexAttention forward + backward (autograd, dq/dk/dv) on the same block mask."""
    q, k, v = (x.detach().requires_grad_() for x in (qh, kh, vh))
    dout = torch.randn_like(qh)

    def step():
        flex(q, k, v, block_mask=block_mask).backward(dout)

    step()  # compile the backward
    return median_ms(step)


def fused_fwd_bwd_ms(launchers: FusedLaunchers, case: DeviceCase, q, out, lse, flags: int | None) -> float:
    """Forward + backward of `launchers` (flags: bsattn_fused_backward_ex's; None: bsattn_fused_backward)."""
    args = case.args
    dout = torch.randn_like(q)
    grads = [torch.empty_like(q) for _ in range(3)]
    ws_bytes = launchers.lib.bsattn_fused_backward_workspace(ctypes.byref(args), 0)
    workspace = torch.empty(max(ws_bytes, 4) // 4, dtype=torch.float32, device="cuda")
    s = stream()

    def step():
        launchers.lib.bsattn_fused_forward(ctypes.byref(args), out.data_ptr(), lse.data_ptr(), s)
        pointers = (out.data_ptr(), lse.data_ptr(), dout.data_ptr(), None, *(g.data_ptr() for g in grads), None,
                    workspace.data_ptr(), ws_bytes)
        if flags is None:  # the plain entry (older builds have no _ex)
            launchers.lib.bsattn_fused_backward(ctypes.byref(args), *pointers, s)
        else:
            launchers.lib.bsattn_fused_backward_ex(ctypes.byref(args), *pointers, flags, s)

    return median_ms(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True)
    parser.add_argument("--quick", action="store_true", help="a few cases (for compute-sanitizer)")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--dtypes", default="", help="comma list of check dtypes (default: all)")
    parser.add_argument("--only", default="", help="comma list of bench rows D:pattern or pattern (default: all)")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--compare", default="", help="comma list of other builds (.so) to time against --lib")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of the check variants to run")
    parser.add_argument("--block-sizes", default="", help="comma list of check block sizes (default: all, 16,64 quick)")
    parser.add_argument("--decode", action="store_true", help="time one decode step against FlexAttention's decode")
    parser.add_argument("--decode-batches", default="1,4,8")
    parser.add_argument("--decode-budget", type=float, default=150.0, help="seconds of decode timing at most")
    args = parser.parse_args()
    launchers = FusedLaunchers(args.lib)
    start = time.time()
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    dtypes = tuple(x for x in args.dtypes.split(",") if x)
    block_sizes = tuple(int(x) for x in args.block_sizes.split(",") if x)
    rows = [] if args.no_check else check_all(launchers, args.quick, variants, dtypes, block_sizes)
    failed = [r for r in rows if not r["ok"]]
    if rows:
        print(f"checks: {len(rows)} in {time.time() - start:.0f} s")
        print(f"{'output':>6} {'dtype':>9} {'worst err':>10} {'torch err':>10}  cases  failed")
        for out_name in OUTPUTS:
            for dtype_name in DTYPES:
                sel = [r for r in rows if r["out"] == out_name and r["dtype"] == dtype_name]
                if not sel:
                    continue
                worst = max(sel, key=lambda r: r["err"])
                print(f"{out_name:>6} {dtype_name:>9} {worst['err']:10.2e} {worst['torch_err']:10.2e} {len(sel):6d} "
                      f"{sum(not r['ok'] for r in sel):6d}")
    timings = []
    if not args.no_bench:
        others = {Path(path).stem: FusedLaunchers(path) for path in args.compare.split(",") if path}
        timings = bench(launchers, [int(x) for x in args.lengths.split(",")], [int(x) for x in args.dims.split(",")],
                        args.backward, others, tuple(x for x in args.only.split(",") if x))
        print(f"{'T':>6} {'D':>4} {'pattern':>8} {'density':>8} {'ours ms':>9} {'flex ms':>9} {'ours/flex':>9} "
              f"{'TFLOP/s':>8} {'flash causal':>12} {'cudnn causal':>12}")
        for t in timings:
            print(f"{t['T']:6d} {t['D']:4d} {t['pattern']:>8} {t['density']:8.4f} {t['ours_ms']:9.3f} {t['flex_ms']:9.3f} "
                  f"{t['ours_vs_flex']:9.2f} {t['ours_tflops']:8.0f} {t['sdpa_flash_causal_ms']:12.3f} "
                  f"{t['sdpa_cudnn_causal_ms']:12.3f}")
        if args.backward:  # forward+backward: ours (atomic dQ, default), ours deterministic, Flex
            print(f"{'T':>6} {'D':>4} {'pattern':>8} {'fwd+bwd ms':>10} {'det ms':>8} {'flex ms':>9} "
                  f"{'flex/ours':>9} {'ours/fwd':>8} {'det/atomic':>10}")
            for t in timings:
                print(f"{t['T']:6d} {t['D']:4d} {t['pattern']:>8} {t['ours_fwd_bwd_ms']:10.3f} "
                      f"{t['ours_fwd_bwd_det_ms']:8.3f} {t['flex_fwd_bwd_ms']:9.3f} {t['fwd_bwd_vs_flex']:9.2f} "
                      f"{t['fwd_bwd_over_fwd']:8.2f} {t['ours_fwd_bwd_det_ms'] / t['ours_fwd_bwd_ms']:10.2f}")
    decode_rows = []
    if args.decode:
        from fused_decode import decode_bench, print_decode_table

        decode_rows = decode_bench(launchers, [int(x) for x in args.decode_batches.split(",")],
                                   [int(x) for x in args.dims.split(",")], [int(x) for x in args.lengths.split(",")],
                                   args.decode_budget, DeviceCase, median_ms)
        print_decode_table(decode_rows)
    out = Path(os.environ.get("OUT", "."))
    (out / ("fused_quick.json" if args.quick else "fused.json")).write_text(
        json.dumps({"checks": rows, "bench": timings, "decode_bench": decode_rows}, indent=1))
    for r in failed:
        print("FAILED", r)
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
