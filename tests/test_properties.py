"""Property-based tests (hypothesis): generated bad and edge inputs for the raw ops and the public API.

Every generated case must end in one of two ways: a clear error (ValueError / TypeError / InvalidArgumentError
whose message names the argument), or a result equal to the float64 reference (``bsattn.reference``). On top:
NaN/Inf placed at masked positions (masked keys, fully masked queries, padded keys) never reaches a result;
fully masked rows are exactly 0 with finite gradients; a NaN/+inf attended score propagates to its row (as
dense TF); forward and backward are bitwise deterministic with 2 threads.

The budget is bounded and seeded (``derandomize``): ``BSATTN_PROPERTY_EXAMPLES`` examples per family (default
200). Families that could crash the process (hostile tables reaching the kernels, batch 0, the thread-count
setting) run in a child process, so a crash fails the test instead of killing the run.
``BSATTN_PROPERTY_REPORT=path`` writes the number of cases per family as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_rel
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bsattn import (
    BlocksparseTransformer,
    attention_impl,
    blocksparse_attention_impl,
    patterns,
    reference,
)
from bsattn import blocksparse_ops as ops
from bsattn._loader import load_ops
from bsattn.fused_attention import fused_attention
from bsattn.fused_tables import (
    FusedTables,
    build_fused_tables,
    from_block_tables,
    fused_tables_for_layout,
    fused_tables_for_pattern,
)
from bsattn.tables import BlockTables, build_tables, tables_for_pattern

pytestmark = pytest.mark.ops

EXAMPLES = int(os.environ.get("BSATTN_PROPERTY_EXAMPLES", "200"))
BUDGET = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # seeded: the same cases on every run
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no database, no explain phase (slow)
)
CASES: dict[str, int] = {}
ERRORS = (ValueError, TypeError, tf.errors.InvalidArgumentError)


def count(family: str) -> None:
    CASES[family] = CASES.get(family, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if path := os.environ.get("BSATTN_PROPERTY_REPORT"):
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        Path(path).write_text(json.dumps(old | CASES, indent=1, sort_keys=True) + "\n")


def assert_names(error: Exception, names) -> None:
    """The message of ``error`` names one of ``names`` (whole word) and is not a bare Python internal error."""
    message = str(error)
    assert any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) for n in names), (
        f"{type(error).__name__} does not name any of {sorted(names)}: {message[:300]}"
    )


# ---- strategies --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A random block-sparse configuration: tables with fully masked queries ``dead_q`` and keys nobody attends
    ``dead_k`` (masked in every block), plus the sizes."""

    tables: BlockTables
    heads: int
    batch: int
    head_dim: int
    dead_q: tuple[int, ...]
    dead_k: tuple[int, ...]
    seed: int


def make_case(bs, n_qb, n_kb, heads, lut_heads, seed, count_, dead_q, dead_k, keep_rate, batch, head_dim) -> Case:
    rng = np.random.default_rng(seed)
    layout = np.zeros((lut_heads, n_qb * n_kb), np.int32)
    for h in range(lut_heads):
        layout[h, rng.choice(n_qb * n_kb, count_, replace=False)] = 1
    layout = layout.reshape(lut_heads, n_qb, n_kb)

    def mask_fn(head, q_blocks, k_blocks):
        keep = np.random.default_rng([seed, head]).random((len(q_blocks), bs, bs)) < keep_rate
        for t in dead_q:
            keep[q_blocks == t // bs, t % bs, :] = False
        for t in dead_k:
            keep[k_blocks == t // bs, :, t % bs] = False
        return keep

    masked = keep_rate < 1 or dead_q or dead_k
    tables = build_tables(layout, bs, mask_fn=mask_fn if masked else None)
    return Case(tables, heads, batch, head_dim, tuple(dead_q), tuple(dead_k), seed)


def seeded_case(seed: int) -> Case:
    """A case drawn with NumPy from ``seed`` (outside hypothesis: for pools built once)."""
    rng = np.random.default_rng(seed)
    bs, n_qb, n_kb, heads = int(rng.choice((8, 16))), int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
    dead_q = tuple(int(t) for t in rng.choice(n_qb * bs, int(rng.integers(0, 3)), replace=False))
    dead_k = tuple(int(t) for t in rng.choice(n_kb * bs, int(rng.integers(0, 3)), replace=False))
    return make_case(bs, n_qb, n_kb, heads, int(rng.choice(sorted({1, heads}))), seed,
                     int(rng.integers(1, n_qb * n_kb + 1)), dead_q, dead_k, float(rng.choice((0.4, 0.8, 1.0))),
                     int(rng.integers(1, 3)), int(rng.integers(1, 5)))


BATCHES = st.integers(1, 2)


@st.composite
def cases(draw, batch=BATCHES) -> Case:
    bs = draw(st.sampled_from((8, 16)))
    n_qb, n_kb = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    heads = draw(st.sampled_from((1, 2)))
    lut_heads = draw(st.sampled_from(sorted({1, heads})))
    seed = draw(st.integers(0, 2**31 - 1))
    count_ = draw(st.integers(1, n_qb * n_kb))
    dead_q = tuple(sorted(draw(st.sets(st.integers(0, n_qb * bs - 1), max_size=3))))
    dead_k = tuple(sorted(draw(st.sets(st.integers(0, n_kb * bs - 1), max_size=3))))
    keep_rate = draw(st.sampled_from((0.4, 0.8, 1.0)))
    return make_case(bs, n_qb, n_kb, heads, lut_heads, seed, count_, dead_q, dead_k, keep_rate, draw(batch),
                     draw(st.integers(1, 4)))


def inputs(case: Case, dtype=np.float64):
    rng = np.random.default_rng(case.seed + 1)
    t = case.tables
    width = case.heads * case.head_dim
    q = rng.uniform(-1, 1, (case.batch, t.ctx_blks_q * t.block_size, width)).astype(dtype)
    k = rng.uniform(-1, 1, (case.batch, t.ctx_blks_k * t.block_size, width)).astype(dtype)
    v = rng.uniform(-1, 1, k.shape).astype(dtype)
    dout = rng.uniform(-1, 1, q.shape).astype(dtype)
    return q, k, v, dout


def poison(x: np.ndarray, rows, value=np.nan) -> np.ndarray:
    x = x.copy()
    x[:, list(rows)] = value
    return x


def chain_reference(q, k, v, dout, tables, heads, scale):
    """nt → masked softmax → nn and its gradients, all float64 NumPy (``bsattn.reference``)."""
    s = reference.nt(q, k, tables, heads)
    p = reference.masked_softmax(s, tables, scale)
    out = reference.nn(p, v, tables)
    dp = reference.nt(dout, v, tables, heads)
    ds = reference.masked_softmax_grad(dp, p, tables, scale)
    return out, reference.nn(ds, k, tables), reference.tn(ds, q, tables), reference.tn(p, dout, tables)


def chain_ours(q, k, v, dout, tables, heads, scale):
    q, k, v, dout = (tf.constant(x) for x in (q, k, v, dout))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = ops.nn(ops.masked_softmax(ops.nt(q, k, tables, heads), tables, scale), v, tables)
    return (out, *tape.gradient(out, [q, k, v], output_gradients=dout))


# ---- in-process families -----------------------------------------------------------------------------------


@BUDGET
@given(case=cases(), dtype=st.sampled_from((np.float32, np.float64)), scale=st.floats(-2, 2, width=32))
def test_unfused_chain_ignores_nan_at_masked_positions(case, dtype, scale):
    """NaN in q at fully masked queries and in k, v at keys nobody attends: every result equals the reference
    (computed without the NaN), masked query rows are exactly 0 and every gradient is finite."""
    count("unfused_chain_nan_masked")
    q, k, v, dout = inputs(case, dtype)
    want = chain_reference(q, k, v, dout, case.tables, case.heads, scale)
    q, k, v = poison(q, case.dead_q), poison(k, case.dead_k), poison(v, case.dead_k, np.inf)
    got = chain_ours(q, k, v, dout, case.tables, case.heads, scale)
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_rel(ours, ref, name=name)
    for t in case.dead_q:
        assert (got[0].numpy()[:, t] == 0).all() and (got[1].numpy()[:, t] == 0).all()
    for t in case.dead_k:
        assert (got[2].numpy()[:, t] == 0).all() and (got[3].numpy()[:, t] == 0).all()


@BUDGET
@given(
    case=cases(),
    dtype=st.sampled_from((np.float32, np.float64)),
    scale=st.floats(-2, 2, width=32),  # the op's scale is float32
    specials=st.lists(st.tuples(st.floats(0, 1), st.sampled_from((np.nan, np.inf, -np.inf))), max_size=3),
    autoregress=st.booleans(),
)
def test_masked_softmax_nan_rule(case, dtype, scale, specials, autoregress):
    """NaN / ±inf at random entries (kept or masked): ours equals the reference entry for entry, NaN exactly where
    the reference has NaN (a NaN / +inf attended score poisons its row, -inf counts as masked, masked entries
    never matter); the gradient with NaN upstream at every y = 0 entry is NaN-free outside poisoned rows."""
    count("masked_softmax_nan_rule")
    t = case.tables
    rng = np.random.default_rng(case.seed + 2)
    x = rng.normal(0, 2, (case.batch, case.heads, t.blocks, t.block_size, t.block_size)).astype(dtype)
    flat = x.reshape(-1)
    for where, value in specials:
        flat[int(where * (flat.size - 1))] = value
    key = int(rng.integers(t.ctx_blks_k * t.block_size)) if autoregress else None
    y = ops.masked_softmax(tf.constant(x), t, scale, key).numpy()
    ref = reference.masked_softmax(x, t, scale, key)
    assert (np.isnan(y) == np.isnan(ref)).all(), "NaN positions differ from the reference"
    finite = ~np.isnan(ref)
    assert_close_rel(np.where(finite, y, 0), np.where(finite, ref, 0), dtype=tf.as_dtype(dtype), name="y")
    y_in = np.where(finite, ref, 0).astype(dtype)
    dy = np.where(y_in == 0, np.nan, rng.uniform(-1, 1, x.shape)).astype(dtype)
    dx = ops._masked_softmax_grad(tf.constant(dy), tf.constant(y_in), tf.constant(scale, tf.float32), t).numpy()
    ref_dx = reference.masked_softmax_grad(dy, y_in, t, scale)
    tiny = np.finfo(dtype).tiny  # TF's CPU threads flush subnormal results to 0
    assert_close_rel(np.where(np.abs(dx) < tiny, 0, dx), np.where(np.abs(ref_dx) < tiny, 0, ref_dx),
                     dtype=tf.as_dtype(dtype), name="dx")


# Public functions: valid keyword arguments, and per argument the names its error may use.
def _api_calls():
    q = tf.ones([1, 32, 8])
    t_fused = fused_tables_for_pattern(patterns.Causal(), 32, 32, 16)
    t_block = tables_for_pattern(patterns.Causal(), 32, 32, 16)
    bst = BlocksparseTransformer(np.tril(np.ones((2, 2))), 16, heads=2)
    w = bst.nt_op(q, q)
    return {
        "fused_attention": (
            fused_attention,
            {"q": q, "k": q, "v": q, "tables": t_fused, "heads": 2, "scale": None, "key_padding_mask": None, "dropout_rate": 0.0,
                 "seed": None, "return_lse": False},
        ),
        "blocksparse_attention_impl": (
            blocksparse_attention_impl,
            {"q": q, "k": q, "v": q, "heads": 2, "attn_mode": "local", "local_attn_ctx": 16, "blocksize": 16, "engine": "fused"},
        ),
        "attention_impl": (attention_impl, {"q": q, "k": q, "v": q, "heads": 2, "attn_mode": "local", "local_attn_ctx": 16}),
        "nt": (ops.nt, {"a": q, "b": q, "tables": t_block, "heads": 2}),
        "nn": (ops.nn, {"w": w, "b": q, "tables": t_block}),
        "tn": (ops.tn, {"w": w, "b": q, "tables": t_block}),
        "masked_softmax": (ops.masked_softmax, {"x": w, "tables": t_block, "scale": 1.0, "autoregress_at_key": None}),
        "build_tables": (build_tables, {"layout": np.tril(np.ones((2, 2))), "block_size": 16, "heads": None}),
        "build_fused_tables": (build_fused_tables, {"active": np.tril(np.ones((2, 2))), "block_size": 16}),
        "fused_tables_for_layout": (fused_tables_for_layout, {"layout": np.tril(np.ones((2, 2))), "block_size": 16}),
        "from_block_tables": (from_block_tables, {"tables": t_block}),
        "BlocksparseTransformer": (
            BlocksparseTransformer,
            {"layout": np.tril(np.ones((2, 2))), "block_size": 16, "heads": 2, "mask_callback": None},
        ),
    }


HOSTILE = st.one_of(
    st.sampled_from([None, 0, -1, 2.5, "abc", [1.0], True, 2**40, float("nan"), float("inf"), -0.5, 1e30]),
    st.sampled_from([(8,), (1, 32), (1, 31, 8), (2, 32, 8), (1, 32, 7), (0, 32, 8), (1, 48, 8), (1, 32, 8, 1)]).map(
        lambda shape: np.ones(shape, np.float32)
    ),
    st.sampled_from([np.zeros((0, 2)), np.ones((2, 3, 4, 5)), np.array([[1.5, 0], [1, 1]]), np.ones((2, 2), bool)]),
    st.sampled_from([tf.int32, tf.float16, tf.float64]).map(lambda dtype: tf.ones([1, 32, 8], dtype)),
)


@BUDGET
@given(which=st.sampled_from(sorted(_api_calls())), data=st.data())
def test_public_api_bad_arguments(which, data):
    """One argument of a public function replaced by a hostile value: it works, or the error names it."""
    count("public_api_bad_arguments")
    fn, kwargs = _api_calls()[which]
    name = data.draw(st.sampled_from(sorted(kwargs)))
    kwargs = kwargs | {name: data.draw(HOSTILE)}
    try:
        fn(**kwargs)
    except ERRORS as e:
        assert_names(e, {name, *_ALIASES.get(name, ())})


# What an argument is called in messages raised below the public function (e.g. activations in the raw ops).
_ALIASES = {
    "layout": ("active",),
    "active": ("layout",),
    "w": ("x",),
    "tables": ("tables", "nt_lut", "nn_lut", "tn_lut"),
    "blocksize": ("block_size", "n_ctx", "local_attn_ctx"),
    "local_attn_ctx": ("n_ctx",),
}


@BUDGET
@given(
    field=st.sampled_from(("nt_lut", "nn_lut", "tn_lut", "mask_words", "row_ptr", "row_entries", "col_ptr",
                           "col_entries", "masks")),
    value=st.sampled_from((2**31, 2**33 + 1, -(2**31) - 1, 0.5, 1.0, True)),
    kind=st.sampled_from(("int64", "float", "bool")),
)
def test_hand_built_tables_rejected(field, value, kind):
    """Hand-built tables with entries that do not fit int32 (or are not integers) raise, naming the table."""
    count("hand_built_tables")
    block = tables_for_pattern(patterns.Causal(), 32, 32, 16)
    tables = from_block_tables(block) if field in ("row_ptr", "row_entries", "col_ptr", "col_entries", "masks") else block
    array = np.array(getattr(tables, field))
    if kind == "int64":
        array = array.astype(np.int64)
        if array.size and isinstance(value, int) and not isinstance(value, bool):
            array.reshape(-1)[0] = value
        else:
            array = array.astype(np.float64) + 0.5
    else:
        array = array.astype(np.float64 if kind == "float" else bool)
    with pytest.raises(ValueError) as info:
        dataclasses.replace(tables, **{field: array})
    assert_names(info.value, {field})


# ---- families in a child process ---------------------------------------------------------------------------


class _Recorder:
    """A stand-in for the op module that records each raw op call (name, args, kwargs) and runs it."""

    def __init__(self, real, calls: list):
        self._real, self._calls = real, calls

    def __getattr__(self, name):
        op = getattr(self._real, name)

        def call(*args, **kwargs):
            self._calls.append((name, args, kwargs))
            return op(*args, **kwargs)

        return call


def _raw_calls(case: Case) -> list:
    """The raw op calls (with their exact inputs) of the unfused chain and of the fused op, fwd + bwd."""
    import bsattn.blocksparse_ops as bso
    import bsattn.fused_attention as fa

    calls: list = []
    real = bso.load_ops()
    q, k, v, dout = (tf.constant(x, tf.float32) for x in inputs(case))
    fused = from_block_tables(case.tables)
    saved = bso.load_ops, fa.load_ops
    bso.load_ops = fa.load_ops = lambda: _Recorder(real, calls)
    try:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([q, k, v])
            out = ops.nn(ops.masked_softmax(ops.nt(q, k, case.tables, case.heads), case.tables, 0.5), v, case.tables)
            out2 = fused_attention(q, k, v, fused, case.heads, key_padding_mask=tf.ones(k.shape[:2], tf.bool),
                                   dropout_rate=0.25, seed=3)
        tape.gradient([out, out2], [q, k, v], output_gradients=[dout, dout])
    finally:
        bso.load_ops, fa.load_ops = saved
    return calls


def _hostile_value(draw, x):
    """A replacement for one raw-op input ``x``: another shape, dtype, rank, or (for int tables) entries."""
    x = np.asarray(x)
    choice = draw(st.integers(0, 5 if x.dtype.kind == "i" and x.size else 3))
    if choice == 0:  # another rank
        return np.ones(draw(st.lists(st.integers(0, 3), max_size=6)), x.dtype)
    if choice == 1:  # one dimension changed
        shape = list(x.shape) or [1]
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 40))
        return np.ones(shape, x.dtype) if x.dtype.kind != "i" else np.zeros(shape, x.dtype)
    if choice == 2:  # another dtype
        return x.astype(draw(st.sampled_from((np.float16, np.float64, np.int32, np.int64, bool))))
    if choice == 3:  # empty
        return np.zeros((0,) * max(x.ndim, 1), x.dtype)
    y = x.copy()  # table entries: one set to a hostile int32 value
    y.reshape(-1)[draw(st.integers(0, x.size - 1))] = draw(
        st.sampled_from((-(2**31), -1, 0, 1, 2, 3, 7, 64, 2**16, 2**31 - 1))
    )
    return y


_RAW_NAMES = {  # the argument names the raw ops' errors may use
    "bsattn_nt": ("a", "b", "nt_lut", "heads", "block_size", "q_blocks", "k_blocks", "T"),
    "bsattn_nn": ("w", "b", "nn_lut", "k_blocks", "T"),
    "bsattn_tn": ("w", "b", "tn_lut", "q_blocks", "T"),
    "bsattn_masked_softmax": ("x", "scale", "nn_lut", "mask", "autoregress_at_key", "T"),
    "bsattn_masked_softmax_grad": ("dy", "y", "scale", "nn_lut", "T"),
}


def _op_arg_names(op_name: str) -> tuple[str, ...]:
    """The input and attr names of a raw op (``bsattn_nt`` → ``BsattnNt``'s)."""
    from tensorflow.python.framework import op_def_registry

    op = op_def_registry.get("".join(p.capitalize() for p in op_name.split("_")))
    return tuple(a.name for a in op.input_arg) + tuple(a.name for a in op.attr)


def family_hostile_raw_ops():
    """Raw op calls of real workloads with one input replaced by a hostile value (other rank, shape, dtype, empty,
    hostile table entry): each runs or raises an error that names an input or attr of that op."""

    pool = {}  # the raw calls of a few cases, recorded once: the hostile replacement is what varies

    @BUDGET
    @given(index=st.integers(0, 7), data=st.data())
    def run(index, data):
        count("hostile_raw_ops")
        if index not in pool:
            pool[index] = _raw_calls(seeded_case(index))
        calls = pool[index]
        name, args, kwargs = calls[data.draw(st.integers(0, len(calls) - 1))]
        args = list(args)
        i = data.draw(st.integers(0, len(args) - 1))
        args[i] = _hostile_value(data.draw, args[i].numpy() if tf.is_tensor(args[i]) else args[i])
        op = getattr(load_ops(), name)
        try:
            op(*args, **kwargs)
        # NotFoundError: no kernel for that dtype combination (TF's message names the T / TW attrs).
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, TypeError, ValueError) as e:
            assert_names(e, set(_op_arg_names(name)) | set(_RAW_NAMES.get(name, ())))

    run()


def family_hostile_tables():
    """Hand-built tables with in-range but wrong int32 entries reach the kernels: each call raises an error that
    names a table (or the call is valid and matches the reference)."""

    @BUDGET
    @given(case=cases(), data=st.data())
    def run(case, data):
        count("hostile_tables")
        q, k, v, _ = inputs(case, np.float32)
        fused = from_block_tables(case.tables)
        target = data.draw(st.sampled_from(("block", "fused")))
        tables = case.tables if target == "block" else fused
        fields = ("nt_lut", "nn_lut", "tn_lut", "mask_words") if target == "block" else (
            "row_ptr", "row_entries", "col_ptr", "col_entries", "masks")
        field = data.draw(st.sampled_from(fields))
        array = np.array(getattr(tables, field))
        if not array.size:
            return
        array.reshape(-1)[data.draw(st.integers(0, array.size - 1))] = data.draw(
            st.sampled_from((-(2**31), -1, 1, 2, 5, 2**20, 2**31 - 1)))
        bad = dataclasses.replace(tables, **{field: array})
        try:
            if target == "block":
                out = ops.nn(ops.masked_softmax(ops.nt(q, k, bad, case.heads), bad, 0.5), v, bad).numpy()
            else:
                out = fused_attention(q, k, v, bad, case.heads).numpy()
        except tf.errors.InvalidArgumentError as e:
            assert_names(e, {*fields, "mask", "nt_lut", "nn_lut", "tn_lut"})
        else:
            assert out.shape == q.shape

    run()


def family_determinism():
    """With 2 intra-op threads, the unfused chain and the fused op (key padding, dropout) give bitwise equal
    forward and backward results on a second run."""

    @BUDGET
    @given(case=cases(), fused=st.booleans())
    def run(case, fused):
        count("determinism_2_threads")
        q, k, v, dout = (tf.constant(x, tf.float32) for x in inputs(case))
        fused_tables = from_block_tables(case.tables)
        padding = tf.constant(np.random.default_rng(case.seed).random(k.shape[:2]) < 0.8)

        def once():
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                if fused:
                    out = fused_attention(q, k, v, fused_tables, case.heads, key_padding_mask=padding,
                                          dropout_rate=0.2, seed=7)
                else:
                    out = ops.nn(ops.masked_softmax(ops.nt(q, k, case.tables, case.heads), case.tables, 0.5), v,
                                 case.tables)
            return [x.numpy() for x in (out, *tape.gradient(out, [q, k, v], output_gradients=dout))]

        for first, second in zip(once(), once()):
            assert first.tobytes() == second.tobytes()

    run()


def family_fused_batch_zero():
    """The fused op (forward and gradient, with and without key padding / dropout) on batch 0 returns empty
    results (no division by zero)."""

    @BUDGET
    @given(case=cases(batch=st.just(0)), padding=st.booleans(), dropout=st.sampled_from((0.0, 0.3)))
    def run(case, padding, dropout):
        count("fused_batch_zero")
        q, k, v, dout = (tf.constant(x, tf.float32) for x in inputs(case))
        fused = from_block_tables(case.tables)
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = fused_attention(q, k, v, fused, case.heads, dropout_rate=dropout, seed=1,
                                  key_padding_mask=tf.ones(k.shape[:2], tf.bool) if padding else None)
        grads = tape.gradient(out, [q, k, v], output_gradients=dout)
        assert out.shape == q.shape and all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))

    run()


CHILD_FAMILIES = {  # the families of one child process, run in order
    "kernels": (family_hostile_raw_ops, family_hostile_tables, family_determinism),
    "fused_batch_zero": (family_fused_batch_zero,),
}


@pytest.mark.parametrize("group", sorted(CHILD_FAMILIES))
def test_in_child_process(group):
    """Runs crash-prone families in a fresh process with 2 intra-op threads; a crash fails here (the last
    "FAMILY" line of the output names the one running)."""
    tests = Path(__file__).resolve().parent
    code = (
        "import sys, json, tensorflow as tf\n"
        "tf.config.threading.set_intra_op_parallelism_threads(2)\n"
        "tf.config.threading.set_inter_op_parallelism_threads(1)\n"
        f"sys.path[:0] = [{str(tests)!r}, {str(tests.parent)!r}]\n"
        "import test_properties as t\n"
        f"for family in t.CHILD_FAMILIES[{group!r}]:\n"
        "    print('FAMILY', family.__name__, flush=True)\n"
        "    family()\n"
        "print('CASES ' + json.dumps(t.CASES))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode < 0:
        pytest.fail(f"{group}: the child process died of signal {-proc.returncode}:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{group} failed:\n{output[-6000:]}"
    CASES.update(json.loads(re.search(r"^CASES (.*)$", proc.stdout, re.MULTILINE).group(1)))


# ---- the fused op's NaN rules (fixed on the fused-op branch) -----------------------------------------------


@st.composite
def fused_cases(draw):
    case = draw(cases())
    tables = from_block_tables(case.tables)
    rng = np.random.default_rng(case.seed + 3)
    padding = rng.random((case.batch, tables.n_k)) < 0.7
    return case, tables, padding


def _attends(tables: FusedTables, heads: int, padding: np.ndarray) -> np.ndarray:
    """bool ``[B, H, Tq, Tk]``: query i of head h attends key j."""
    mask = np.broadcast_to(tables.token_mask()[None], (1, heads, tables.n_q, tables.n_k))
    return mask & padding[:, None, None, :]


def _fused_nan_masked(case, dtype, poison_q: bool, poison_kv: bool):
    """NaN in k and v at padded keys and keys nobody attends (poison_kv), NaN in q at queries with no kept key
    (poison_q): output, lse and gradients equal the reference computed without those NaN, all finite."""
    case, tables, padding = case
    q, k, v, dout = inputs(case, dtype)
    attends = _attends(tables, case.heads, padding)
    dead_k = ~attends.any(axis=(1, 2))  # [B, Tk]
    dead_q = ~attends.any(axis=(1, 3))  # [B, Tq]
    want_out, _ = reference.fused_attention(q, k, v, tables, case.heads, key_padding_mask=padding)
    want = reference.fused_attention_grad(q, k, v, tables, case.heads, dout, key_padding_mask=padding)[:3]
    if poison_q:
        q = np.where(dead_q[..., None], np.nan, q)
    if poison_kv:
        k, v = np.where(dead_k[..., None], np.nan, k), np.where(dead_k[..., None], np.inf, v)
    qt, kt, vt = (tf.constant(x) for x in (q, k, v))
    with tf.GradientTape() as tape:
        tape.watch([qt, kt, vt])
        out, lse = fused_attention(qt, kt, vt, tables, case.heads, key_padding_mask=padding, return_lse=True)
    grads = tape.gradient(out, [qt, kt, vt], output_gradients=tf.constant(dout))
    assert_close_rel(out, want_out, name="out")
    assert (lse.numpy()[np.broadcast_to(dead_q[:, None], lse.shape)] == -np.inf).all()
    for name, ours, ref in zip(("dq", "dk", "dv"), grads, want):
        assert_close_rel(ours, ref, name=name)


@BUDGET
@given(case=fused_cases(), dtype=st.sampled_from((np.float32, np.float64)))
def test_fused_ignores_nan_at_padded_and_unattended_keys(case, dtype):
    """NaN k and +inf v at padded keys and at keys nobody attends never reach a result (fwd and bwd)."""
    count("fused_nan_masked_keys")
    _fused_nan_masked(case, dtype, poison_q=False, poison_kv=True)


@BUDGET
@given(case=fused_cases(), dtype=st.sampled_from((np.float32, np.float64)))
def test_fused_ignores_nan_q_of_fully_masked_queries(case, dtype):
    """NaN in q at queries with no kept key (padded queries) reaches no result: their output is 0, dk finite."""
    count("fused_nan_masked_queries")
    _fused_nan_masked(case, dtype, poison_q=True, poison_kv=True)


@BUDGET
@given(case=fused_cases(), dtype=st.sampled_from((np.float32, np.float64)))
def test_fused_nan_query_row_propagates(case, dtype):
    """A NaN query with kept keys gives a NaN output row and a NaN lse (not -inf, the "no kept key" marker); the
    other rows equal the reference."""
    count("fused_nan_row")
    case, tables, padding = case
    q, k, v, _ = inputs(case, dtype)
    attends = _attends(tables, case.heads, padding)  # [B, H, Tq, Tk]
    live = attends.any(axis=-1)  # [B, H, Tq]
    if not live.all(axis=1).any():
        return
    b, i = (int(x[0]) for x in np.nonzero(live.all(axis=1)))
    want_out, _ = reference.fused_attention(q, k, v, tables, case.heads, key_padding_mask=padding)
    q[b, i] = np.nan
    out, lse = fused_attention(tf.constant(q), tf.constant(k), tf.constant(v), tables, case.heads,
                               key_padding_mask=padding, return_lse=True)
    out, lse = out.numpy(), lse.numpy()
    assert np.isnan(out[b, i]).all() and np.isnan(lse[b, :, i]).all()
    rows = np.ones(out.shape[:2], bool)
    rows[b, i] = False
    assert_close_rel(out[rows], want_out[rows], dtype=tf.as_dtype(dtype), name="other rows")
