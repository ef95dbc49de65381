"""KV-cache decoding through bsattn_fused_forward (decode = 1): checks and timing (used by fused_harness.py).

  checks   variant "decode": per dtype x block size x head dim, steps of Tq = 1 and 3 new queries at positions
           p (0, mid-block, across a block boundary) against a cache of T_max = 6 blocks whose unwritten part
           (keys >= p + Tq) is NaN/Inf, for causal, local, fixed (grouped K/V heads) and random per-head tables
           with partial blocks (with key padding, bias [1, H], dropout), and local with segment ids; three of them
           again with head-major activations (q, out [B, H, Tq, D], the cache [B, KVH, T_max, D]), also bit for bit
           against the same step in the default layout ("head_major_bits": out, lse); against
           bsattn.reference.fused_attention(..., q_offset=p) (float64). out and lse are poisoned before the launch.
           (The tensor-core steps split over the keys unless BSATTN_DECODE_SPLITS=1: decode_run.sh runs both.)
           Error: the worst over the steps; float16/bfloat16 bounded by twice the error of the same rows computed
           densely by torch in that dtype.
  --decode timing: one decode step (Tq = 1, position p = T_max - 1, bf16, block 128) against FlexAttention's
           decode (flex_attention with q_len 1 and a BlockMask of the same blocks of that row, its mask_mod at the
           absolute position), B in 1..8, H = 16, D 64/128, T_max 16384 and 65536, local and causal.
"""

from __future__ import annotations

import ctypes
import math
import time

import numpy as np
import torch
from harness import DTYPES, dev, error, poisoned, stream

from bsattn import patterns, reference
from bsattn.fused_tables import FusedTables, fused_tables_for_pattern

B = 2
N_QB = 6  # T_max = 6 blocks in the checks


def _steps(bs: int) -> list[tuple]:
    """(pattern, heads, kv_heads, Tq, p, features) of the checks."""
    return [
        ("causal", 2, 2, 1, 0, ()),
        ("causal", 2, 2, 1, 2 * bs + bs // 2, ()),
        ("local", 2, 2, 3, bs + bs // 2 - 1, ()),
        ("fixed", 4, 2, 3, 3 * bs - 2, ()),  # across a block boundary, grouped K/V heads
        ("fixed", 4, 1, 1, 5 * bs + 3, ()),
        ("random", 2, 2, 1, 4 * bs + 1, ("kpm", "bias", "dropout")),
        ("random", 2, 2, 3, 2 * bs - 1, ("kpm", "bias", "dropout")),
        ("local", 2, 2, 3, 2 * bs + 5, ("segments",)),
        ("fixed", 4, 2, 3, 3 * bs - 2, ("head_major",)),
        ("random", 2, 2, 3, 2 * bs - 1, ("kpm", "bias", "dropout", "head_major")),
        ("local", 2, 2, 3, 2 * bs + 5, ("segments", "head_major")),
    ]


def decode_tables(rng, name: str, bs: int, heads: int, random_tables) -> FusedTables:
    t_max = N_QB * bs
    if name == "random":
        return random_tables(rng, bs, N_QB, N_QB, heads, masked_rows=True)
    pattern = {"causal": patterns.Causal(), "local": patterns.Local(2 * bs),
               "fixed": patterns.Fixed(2 * bs, 2, 1, heads, bs)}[name]  # fmt: skip
    return fused_tables_for_pattern(pattern, t_max, t_max, bs)


def _dense_rows(c: dict, dtype) -> dict:
    """The decode rows computed densely by torch in `dtype` from the clean cache: the error floor."""
    heads, kvh, p, n = c["heads"], c["kv_heads"], c["p"], c["q"].shape[1]
    split = lambda x, h: x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)
    q = split(dev(c["q"], dtype), heads)
    k, v = (split(dev(c[name], dtype), kvh).repeat_interleave(heads // kvh, dim=1) for name in ("k_clean", "v_clean"))
    keep = dev(reference._decode_keep(c["tables"], p, n))[None]
    if c["kpm"] is not None:
        keep = keep & dev(c["kpm"])[:, None, None, :]
    if c["q_ids"] is not None:
        keep = keep & (dev(c["q_ids"])[:, None, :, None] == dev(c["k_ids"])[:, None, None, :])
    s = (q @ k.transpose(-1, -2)) * c["scale"]
    if c["bias"] is not None:
        s = s + dev(c["bias"], dtype)
    any_kept = keep.any(-1, keepdim=True)
    s = torch.where(any_kept, s.masked_fill(~keep, -float("inf")), 0.0)
    lse = torch.where(any_kept[..., 0], torch.logsumexp(s.float(), -1), -float("inf"))
    prob = torch.softmax(s, -1) * any_kept
    if c["dropout_rate"]:
        z = reference._dropout_scale(np.zeros((B, heads, n, c["k"].shape[1])), c["dropout_rate"], c["seed"],
                                     (p, c["tables"].n_q))  # fmt: skip
        prob = prob * dev(z, dtype)
    out = (prob @ v).transpose(1, 2).reshape(B, n, -1)
    return {"out": out, "lse": lse}


def _lse_error(ours: torch.Tensor, ref: np.ndarray) -> float:
    got = ours.double().cpu().numpy()
    empty = np.isneginf(ref)
    if not np.array_equal(np.isneginf(got), empty) or not np.isfinite(got[~empty]).all():
        return float("inf")
    return float(np.abs(got[~empty] - ref[~empty]).max(initial=0) / max(np.abs(ref[~empty]).max(initial=0), 1e-30))


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


def run_decode_check(launchers, rng, dtype_name: str, bs: int, head_dim: int, device_case, random_tables) -> dict:
    """{"out": (worst err, torch err), "lse": (...), "head_major_bits": (0 or inf, 0)} over the steps of _steps(bs).
    device_case, random_tables: fused_harness's DeviceCase and random_fused_tables (passed in: that module runs as
    __main__, and a second import of it would make its ctypes structure a different class)."""
    dtype, code = DTYPES[dtype_name]
    cast = lambda x: torch.from_numpy(x).to(dtype).double().numpy()
    worst = {"out": (0.0, 0.0), "lse": (0.0, 0.0), "head_major_bits": (0.0, 0.0)}
    for name, heads, kvh, n, p, features in _steps(bs):
        tables = decode_tables(rng, name, bs, heads, random_tables)
        t_max, width, kv_width = tables.n_q, heads * head_dim, kvh * head_dim
        c = {"tables": tables, "heads": heads, "kv_heads": kvh, "p": p,
             "scale": float(np.float32(rng.uniform(0.5, 1.5) / math.sqrt(head_dim))),
             "q": cast(rng.uniform(-1, 1, (B, n, width))), "k_clean": cast(rng.uniform(-1, 1, (B, t_max, kv_width))),
             "v_clean": cast(rng.uniform(-1, 1, (B, t_max, kv_width))), "kpm": None, "bias": None,
             "dropout_rate": 0.25 if "dropout" in features else 0.0, "seed": int(rng.integers(0, 2**62)),
             "q_ids": None, "k_ids": None}  # fmt: skip
        c["k"], c["v"] = c["k_clean"].copy(), c["v_clean"].copy()
        c["k"][:, p + n :] = np.where(rng.random((B, t_max - p - n, 1)) < 0.5, np.nan, np.inf)  # not yet written
        c["v"][:, p + n :] = np.nan
        if "kpm" in features:
            c["kpm"] = rng.random((B, t_max)) < 0.8
        if "bias" in features:
            c["bias"] = cast(rng.normal(0, 1, (1, heads, n, t_max)))
        if "segments" in features:
            ids = np.repeat(np.arange(3), [p + 1, bs, t_max - p - 1 - bs])[None].repeat(B, 0).astype(np.int32)
            c["k_ids"], c["q_ids"] = ids, ids[:, p : p + n]
        def launch(head_major: bool):
            """out [B, n, H*D] (transposed back from [B, H, n, D] when head_major) and lse of the step."""
            case = device_case(code, dev(c["q"], dtype), dev(c["k"], dtype), dev(c["v"], dtype), tables, heads,
                              c["scale"], c["kpm"], None if c["bias"] is None else dev(c["bias"], dtype),
                              c["dropout_rate"], c["seed"], kvh, c["q_ids"], c["k_ids"], q_offset=p,
                              head_major=head_major)  # fmt: skip
            out = poisoned((B, heads, n, head_dim) if head_major else (B, n, width), dtype)
            lse = poisoned((B, heads, n), torch.float32)
            launchers.check(launchers.lib.bsattn_fused_forward(ctypes.byref(case.args), out.data_ptr(),
                                                               lse.data_ptr(), stream()), "fused_forward (decode)")
            torch.cuda.synchronize()  # case's buffers are freed on return
            return (out.transpose(1, 2).reshape(B, n, width) if head_major else out), lse

        out, lse = launch("head_major" in features)
        if "head_major" in features:  # the same step in the default layout: the same bits
            plain_out, plain_lse = launch(False)
            same = torch.equal(_bits(out), _bits(plain_out)) and torch.equal(_bits(lse), _bits(plain_lse))
            if not same:
                worst["head_major_bits"] = (float("inf"), 0.0)
        ref_out, ref_lse = reference.fused_attention(
            c["q"], c["k"], c["v"], tables, heads, scale=c["scale"], key_padding_mask=c["kpm"], bias=c["bias"],
            dropout_rate=c["dropout_rate"], seed=c["seed"], kv_heads=kvh, q_segment_ids=c["q_ids"],
            k_segment_ids=c["k_ids"], q_offset=p)
        base = _dense_rows(c, dtype)
        torch.cuda.synchronize()
        for key, ours, ref, err in (("out", out, ref_out, error), ("lse", lse, ref_lse, _lse_error)):
            got = (err(ours, ref), err(base[key], ref))
            if got[0] >= worst[key][0]:
                worst[key] = got
    return worst


# ---- timing --------------------------------------------------------------------------------------------------


def _flex_decode_mask(tables: FusedTables, mask_mod, p: int, batch: int, heads: int):
    """FlexAttention's BlockMask for one query at position p: the blocks of p's table row with keys < p + 1
    (full ones marked full), the block size our block size."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = tables.block_size
    ptr = tables.row_ptr[0]
    entries = tables.row_entries[ptr[p // bs] : ptr[p // bs + 1]]
    entries = entries[entries[:, 0] * bs < p + 1]
    n_kb = tables.n_k_blocks

    def blocks(sel):
        kb = entries[sel, 0]
        idx = np.zeros(n_kb, np.int32)
        idx[: len(kb)] = kb
        num = torch.full((batch, heads, 1), len(kb), dtype=torch.int32, device="cuda")
        return num, torch.from_numpy(idx).cuda().expand(batch, heads, 1, n_kb).contiguous()

    kn, ki = blocks(entries[:, 1] >= 0)
    fn, fi = blocks(entries[:, 1] < 0)
    return BlockMask.from_kv_blocks(kn, ki, fn, fi, BLOCK_SIZE=(bs, bs), mask_mod=mask_mod,
                                    seq_lengths=(1, tables.n_q))  # fmt: skip


def _decode_mask_mod(pname: str, p_t: torch.Tensor, window: int):
    """FlexAttention's mask_mod of a decode step: query index q_idx is the absolute position q_idx + p_t."""
    if pname == "local":
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + p_t) & (q_idx + p_t - kv_idx < window)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + p_t
    return mask_mod


def decode_bench(launchers, batches, dims, lengths, budget_s: float, device_case, median_ms) -> list[dict]:
    """One decode step of ours for every (T_max, pattern, D, B), and FlexAttention's decode on the same inputs
    (each a compile) while less than budget_s seconds have passed (NaN after that). device_case, median_ms:
    fused_harness's (see run_decode_check)."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.cache_size_limit = 512
    flex = torch.compile(flex_attention, dynamic=False)
    heads, bs, window = 16, 128, 1024
    configs = [(t, name, d, b) for t in sorted(lengths, reverse=True) for d in sorted(dims, reverse=True)
               for name in ("local", "causal") for b in batches]  # fmt: skip
    start, rows, tables_of = time.time(), [], {}
    for t_max, pname, head_dim, batch in configs:
        p = t_max - 1
        pattern = patterns.Local(window) if pname == "local" else patterns.Causal()
        tables = tables_of.setdefault((t_max, pname), fused_tables_for_pattern(pattern, t_max, t_max, bs))
        width = heads * head_dim
        q = torch.randn(batch, 1, width, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, t_max, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        case = device_case(2, q, k, v, tables, heads, 1.0 / math.sqrt(head_dim), q_offset=p)
        args = case.args
        out = torch.empty_like(q)
        lse = torch.empty(batch, heads, 1, device="cuda", dtype=torch.float32)
        s = stream()
        ours = median_ms(lambda: launchers.lib.bsattn_fused_forward(ctypes.byref(args), out.data_ptr(), lse.data_ptr(),
                                                                    s))  # fmt: skip
        kv_bytes = 2 * batch * width * 2 * (min(p + 1, window) if pname == "local" else p + 1)
        flex_ms = diff = float("nan")
        if time.time() - start < budget_s:
            mask_mod = _decode_mask_mod(pname, torch.tensor(p, device="cuda"), window)
            qh = q.view(batch, 1, heads, head_dim).transpose(1, 2)
            kh, vh = (x.view(batch, t_max, heads, head_dim).transpose(1, 2) for x in (k, v))
            try:
                block_mask = _flex_decode_mask(tables, mask_mod, p, batch, heads)
                ref = flex(qh, kh, vh, block_mask=block_mask)  # compile
                flex_ms = median_ms(lambda: flex(qh, kh, vh, block_mask=block_mask))
                diff = float((out.float() - ref.transpose(1, 2).reshape(batch, 1, width).float()).abs().max())
            except Exception as exc:  # say so in the table, keep our timing
                print(f"flex decode: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        row = {"T_max": t_max, "p": p, "B": batch, "H": heads, "D": head_dim, "pattern": pname, "ours_ms": ours,
               "flex_ms": flex_ms, "flex_over_ours": flex_ms / ours, "ours_GBps": kv_bytes / ours / 1e6,
               "max_abs_diff_vs_flex": diff}  # fmt: skip
        rows.append(row)
        print(f"decode T_max={t_max} B={batch} D={head_dim} {pname:6s} ours {ours * 1e3:8.1f} us  flex "
              f"{flex_ms * 1e3:8.1f} us  flex/ours {flex_ms / ours:5.2f}  ({row['ours_GBps']:.0f} GB/s of attended "
              f"K/V)  diff {diff:.2e}  [{time.time() - start:.0f} s]", flush=True)
        del q, k, v, out, case
    return rows


def print_decode_table(rows: list[dict]) -> None:
    print(f"{'T_max':>6} {'B':>2} {'D':>4} {'pattern':>7} {'ours us':>9} {'flex us':>9} {'flex/ours':>9} {'GB/s':>6}")
    for r in rows:
        print(f"{r['T_max']:6d} {r['B']:2d} {r['D']:4d} {r['pattern']:>7} {r['ours_ms'] * 1e3:9.1f} "
              f"{r['flex_ms'] * 1e3:9.1f} {r['flex_over_ours']:9.2f} {r['ours_GBps']:6.0f}")
