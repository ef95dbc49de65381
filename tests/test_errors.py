"""Bad input → a clear error naming the argument.

Kernel checks are reached by calling the raw ops (``bsattn._loader.load_ops()``) eagerly with hand-made
tensors; each case starts from valid inputs and breaks exactly one thing, so it fails if that check is
removed (the ``match`` pins the message of the check meant, not of a later one). Python checks raise
``ValueError`` / ``TypeError`` before any op runs.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf
from conftest import causal_callback

from bsattn import (
    BlocksparseTransformer,
    attention_impl,
    blocksparse_attention_impl,
    get_attn_mask,
)
from bsattn import blocksparse_ops as ops
from bsattn._loader import load_ops
from bsattn.tables import build_tables

pytestmark = pytest.mark.ops

BS, HEADS, D = 8, 2, 4
# Valid inputs: 2 x 2 blocks of 8, layout [[1, 0], [1, 1]] shared by 2 heads of width 4.
LAYOUT = np.array([[1, 0], [1, 1]])
NT_LUT = np.array([[[0, 0], [1, 0], [1, 1]]], np.int32)  # (Qb, Kb) of blocks 0, 1, 2
NN_LUT = np.array([[[2, 1], [3, 2], [0, 0], [1, 0], [2, 1]]], np.int32)  # rows: block 0 | blocks 1, 2
TN_LUT = np.array([[[2, 2], [4, 1], [0, 0], [1, 1], [2, 1]]], np.int32)  # columns: blocks 0, 1 | block 2
MASK = np.full((1, 3, BS, 1), 0xFF, np.int32)  # every key of every row kept
NNZ = 3


def dense(shape=(1, 16, HEADS * D)):
    return tf.ones(shape)


def blocks(shape=(1, HEADS, NNZ, BS, BS)):
    return tf.fill(shape, 0.5)


def raises_invalid(match):
    return pytest.raises(tf.errors.InvalidArgumentError, match=match)


def test_valid_inputs_run():
    """The baseline of every case below runs without error."""
    raw = load_ops()
    raw.bsattn_nt(dense(), dense(), NT_LUT, heads=HEADS, block_size=BS, q_blocks=2, k_blocks=2)
    raw.bsattn_nn(blocks(), dense(), NN_LUT, k_blocks=2)
    raw.bsattn_tn(blocks(), dense(), TN_LUT, q_blocks=2)
    y = raw.bsattn_masked_softmax(blocks(), 1.0, NN_LUT, MASK, 0, autoregressive=True)
    raw.bsattn_masked_softmax_grad(blocks(), y, 1.0, NN_LUT)
    tables = build_tables(LAYOUT, BS)
    np.testing.assert_array_equal(tables.nt_lut, NT_LUT)
    np.testing.assert_array_equal(tables.nn_lut, NN_LUT)
    np.testing.assert_array_equal(tables.tn_lut, TN_LUT)


# ---- BsattnNt -----------------------------------------------------------------------------------------------

NT_CASES = {
    "a_rank": ({"a": dense((16, 8))}, r"a must be \[batch, time, heads\*head_dim\], got shape \[16,8\]"),
    "b_rank": ({"b": dense((1, 16, 8, 1))}, r"b must be \[batch, time, heads\*head_dim\]"),
    "a_length": ({"a": dense((1, 20, 8))}, r"a length 20 is not a multiple of block_size 8"),
    "b_length": ({"b": dense((1, 12, 8))}, r"b length 12 is not a multiple of block_size 8"),
    "width_heads": ({"a": dense((1, 16, 9)), "b": dense((1, 16, 9))}, r"a width 9 is not divisible by heads 2"),
    "batch": ({"a": dense((2, 16, 8))}, r"a and b must have the same batch and width"),
    "width": ({"b": dense((1, 16, 12))}, r"a and b must have the same batch and width"),
    "lut_rank": ({"lut": NT_LUT[0, :, 0]}, r"nt_lut must have shape \[L, blocks, 2\]"),
    "lut_pairs": ({"lut": np.zeros((1, 3, 3), np.int32)}, r"nt_lut must have shape \[L, n, 2\], got \[1,3,3\]"),
    "lut_heads": ({"lut": np.repeat(NT_LUT, 3, axis=0)}, r"nt_lut has 3 layouts; expected 1 \(shared\) or heads = 2"),
    "lut_qb": ({"lut": np.array([[[0, 0], [2, 0], [1, 1]]])}, r"nt_lut\[0, 1\] = \(2, 0\) is outside the block grid"),
    "lut_kb_negative": ({"lut": np.array([[[0, -1], [1, 0], [1, 1]]])}, r"nt_lut\[0, 0\] = \(0, -1\) is outside"),
    "lut_kb_short_b": (
        {"b": dense((1, 8, 8)), "k_blocks": 1},
        r"nt_lut\[0, 2\] = \(1, 1\) is outside the block grid \[2, 1\]",
    ),
    "a_layout_length": ({"a": dense((1, 24, 8))}, r"a has length 24 but the layout covers 16 tokens \(q_blocks = 2"),
    "b_layout_length": ({"b": dense((1, 8, 8))}, r"b has length 8 but the layout covers 16 tokens \(k_blocks = 2"),
    "lut_empty": ({"lut": np.zeros((1, 0, 2), np.int32)}, r"nt_lut is empty.*no active block"),
    "block_size": ({"block_size": 12}, r"block_size = 12 is not a supported block size"),
}


@pytest.mark.parametrize("case", sorted(NT_CASES))
def test_nt_kernel_checks(case):
    change, match = NT_CASES[case]
    args = {"a": dense(), "b": dense(), "lut": NT_LUT, "heads": HEADS, "block_size": BS, "q_blocks": 2, "k_blocks": 2}
    args |= change
    lut = tf.constant(args.pop("lut"), tf.int32)
    with raises_invalid(match):
        load_ops().bsattn_nt(args.pop("a"), args.pop("b"), lut, **args)


# ---- BsattnNn / BsattnTn ------------------------------------------------------------------------------------


def _with(lut, index, value):
    lut = np.array(lut)
    lut[(0,) + index] = value
    return lut


# The same checks on both row tables; "{lut}" is nn_lut or tn_lut. Luts given as f(valid lut).
DSD_CASES = {
    "w_rank": ({"w": blocks((1, HEADS, NNZ, BS))}, r"w must be \[batch, heads, blocks, bs, bs\]"),
    "w_not_square": ({"w": blocks((1, HEADS, NNZ, BS, 4))}, r"w must be \[batch, heads, blocks, bs, bs\]"),
    "w_block_size": ({"w": blocks((1, HEADS, NNZ, 12, 12))}, r"w = 12 is not a supported block size"),
    "w_no_heads": ({"w": blocks((1, 0, NNZ, BS, BS))}, r"w needs at least one head and one block"),
    "b_rank": ({"b": dense((16, 8))}, r"b must be \[batch, time, heads\*head_dim\]"),
    "b_length": ({"b": dense((1, 12, 8))}, r"b length 12 is not a multiple of block_size 8"),
    "b_width_heads": ({"b": dense((1, 16, 9))}, r"b width 9 is not divisible by heads 2"),
    "batch": ({"b": dense((2, 16, 8))}, r"b batch 2 does not match w batch 1"),
    "b_layout_length": ({"b": dense((1, 24, 8))}, r"b has length 24 but the layout covers 16 tokens \({blocks} = 2"),
    "lut_pairs": ({"lut": lambda lut: np.zeros((1, 5, 3), np.int32)}, r"{lut} must have shape \[L, n, 2\]"),
    "lut_heads": ({"lut": lambda lut: np.repeat(lut, 3, axis=0)}, r"{lut} has 3 layouts; expected 1 \(shared\)"),
    "lut_no_header": ({"lut": lambda lut: lut[:, 2:]}, r"{lut} has 3 entries; expected a header"),
    "header_in_header": ({"lut": lambda lut: _with(lut, (0,), [1, 1])}, r"{lut}\[0, 0\] = \(1, 1\) is not a valid"),
    "header_negative": ({"lut": lambda lut: _with(lut, (1, 1), -1)}, r"{lut}\[0, 1\] = \(\d, -1\) is not a valid"),
    "header_past_end": ({"lut": lambda lut: _with(lut, (1, 1), 4)}, r"{lut}\[0, 1\] = \(\d, 4\) is not a valid"),
    "block_id": (
        {"lut": lambda lut: _with(lut, (2, 0), 3)},
        r"{lut}\[0, 2\] = \(3, 0\) is out of range: block ids < 3",
    ),
    "block_id_negative": ({"lut": lambda lut: _with(lut, (3, 0), -1)}, r"{lut}\[0, 3\] = \(-1, \d\) is out of range"),
    "partner": (
        {"lut": lambda lut: _with(lut, (4, 1), 2)},
        r"{lut}\[0, 4\] = \(2, 2\) is out of range.*partner blocks < 2",
    ),
    "twice": ({"lut": lambda lut: _with(lut, (3, 0), 2)}, r"{lut} lists block 2 of layout 0 twice"),
    "never": ({"lut": lambda lut: _with(lut, (1, 1), lut[0, 1, 1] - 1)}, r"{lut} never lists block 2 of layout 0"),
}


@pytest.mark.parametrize("case", sorted(DSD_CASES))
@pytest.mark.parametrize("op", ["nn", "tn"])
def test_nn_tn_kernel_checks(op, case):
    change, match = DSD_CASES[case]
    valid_lut, name = (NN_LUT, "nn_lut") if op == "nn" else (TN_LUT, "tn_lut")
    args = {"w": blocks(), "b": dense(), "lut": valid_lut} | change
    lut = args["lut"](valid_lut) if callable(args["lut"]) else args["lut"]
    raw, attr = (load_ops().bsattn_nn, "k_blocks") if op == "nn" else (load_ops().bsattn_tn, "q_blocks")
    with raises_invalid(match.format(lut=name, blocks=attr)):
        raw(args["w"], args["b"], tf.constant(lut, tf.int32), **{attr: 2})


# ---- BsattnMaskedSoftmax / BsattnMaskedSoftmaxGrad ----------------------------------------------------------

SOFTMAX_CASES = {
    "scale_vector": ({"scale": [1.0, 2.0]}, r"scale must be a scalar, got shape \[2\]"),
    "scale_inf": ({"scale": np.inf}, r"scale must be finite"),
    "scale_nan": ({"scale": np.nan}, r"scale must be finite"),
    "x_rank": ({"x": blocks((1, HEADS, NNZ, BS))}, r"x must be \[batch, heads, blocks, bs, bs\]"),
    "lut_twice": ({"lut": _with(NN_LUT, (3, 0), 2)}, r"nn_lut lists block 2 of layout 0 twice"),
    "lut_heads": ({"lut": np.repeat(NN_LUT, 3, axis=0)}, r"nn_lut has 3 layouts"),
    "mask_words": (
        {"mask": np.zeros((1, 3, BS, 2), np.int32)},
        r"mask must have shape \[1 or 2, 3, 8, 1\], got \[1,3,8,2\]",
    ),
    "mask_heads": ({"mask": np.zeros((3, 3, BS, 1), np.int32)}, r"mask must have shape \[1 or 2, 3, 8, 1\]"),
    "mask_blocks": ({"mask": np.zeros((1, 2, BS, 1), np.int32)}, r"mask must have shape \[1 or 2, 3, 8, 1\]"),
    "mask_rank": ({"mask": np.zeros((1, 3, BS), np.int32)}, r"mask must have shape"),
    "key_vector": ({"key": [0, 1]}, r"autoregress_at_key must be a scalar, got shape \[2\]"),
    "key_negative": ({"key": -1}, r"autoregress_at_key must be >= 0, got -1"),
}


@pytest.mark.parametrize("case", sorted(SOFTMAX_CASES))
def test_masked_softmax_kernel_checks(case):
    change, match = SOFTMAX_CASES[case]
    args = {"x": blocks(), "scale": 1.0, "lut": NN_LUT, "mask": MASK, "key": 3} | change
    with raises_invalid(match):
        load_ops().bsattn_masked_softmax(
            args["x"],
            tf.constant(args["scale"], tf.float32),
            tf.constant(args["lut"], tf.int32),
            tf.constant(args["mask"], tf.int32),
            tf.constant(args["key"], tf.int32),
            autoregressive=True,
        )


SOFTMAX_GRAD_CASES = {
    "scale_vector": ({"scale": [1.0]}, r"scale must be a scalar"),
    "scale_inf": ({"scale": -np.inf}, r"scale must be finite"),
    "y_rank": ({"y": blocks((1, HEADS, NNZ, BS)), "dy": blocks((1, HEADS, NNZ, BS))}, r"y must be \[batch, heads"),
    "dy_shape": ({"dy": blocks((1, HEADS, 2, BS, BS))}, r"dy shape \[1,2,2,8,8\] does not match y shape \[1,2,3,8,8\]"),
    "lut_never": ({"lut": _with(NN_LUT, (1, 1), 1)}, r"nn_lut never lists block 2"),
}


@pytest.mark.parametrize("case", sorted(SOFTMAX_GRAD_CASES))
def test_masked_softmax_grad_kernel_checks(case):
    change, match = SOFTMAX_GRAD_CASES[case]
    args = {"dy": blocks(), "y": blocks(), "scale": 1.0, "lut": NN_LUT} | change
    with raises_invalid(match):
        load_ops().bsattn_masked_softmax_grad(
            args["dy"], args["y"], tf.constant(args["scale"], tf.float32), tf.constant(args["lut"], tf.int32)
        )


# ---- shape functions (graph construction) -------------------------------------------------------------------


def test_shape_functions_check_ranks_at_trace_time():
    raw = load_ops()
    lut = tf.constant(NT_LUT)

    nt = functools.partial(raw.bsattn_nt, heads=HEADS, block_size=BS, q_blocks=2, k_blocks=2)
    with pytest.raises(ValueError, match=r"a must be \[batch, time, heads\*head_dim\] \(rank 3\), got shape \[16,8\]"):
        tf.function(lambda a: nt(a, a, lut)).get_concrete_function(tf.TensorSpec([16, 8]))
    with pytest.raises(ValueError, match=r"b must be \[batch, time, heads\*head_dim\] \(rank 3\)"):
        tf.function(lambda b: nt(dense(), b, lut)).get_concrete_function(tf.TensorSpec([1, 16, 8, 1]))
    with pytest.raises(ValueError, match=r"nt_lut must be \[L, n, 2\] \(rank 3\)"):
        tf.function(lambda t: nt(dense(), dense(), t)).get_concrete_function(tf.TensorSpec([3, 2], tf.int32))
    with pytest.raises(ValueError, match=r"w must be \[batch, heads, blocks, bs, bs\] \(rank 5\), got shape \[1,2,3,8\]"):
        tf.function(lambda w: raw.bsattn_nn(w, dense(), tf.constant(NN_LUT), k_blocks=2)).get_concrete_function(
            tf.TensorSpec([1, 2, 3, 8])
        )
    with pytest.raises(ValueError, match=r"x must be \[batch, heads, blocks, bs, bs\] \(rank 5\)"):
        tf.function(
            lambda x: raw.bsattn_masked_softmax(x, 1.0, tf.constant(NN_LUT), tf.constant(MASK), 0)
        ).get_concrete_function(tf.TensorSpec([1, 2, 3, 8]))
    with pytest.raises(ValueError, match=r"dy must be \[batch, heads, blocks, bs, bs\] \(rank 5\)"):
        tf.function(
            lambda dy: raw.bsattn_masked_softmax_grad(dy, blocks(), 1.0, tf.constant(NN_LUT))
        ).get_concrete_function(tf.TensorSpec([1, 2, 3, 8]))
    with pytest.raises(ValueError, match=r"a has length 24; expected 16 \(the layout's q_blocks \* block_size\)"):
        tf.function(lambda a: nt(a, dense(), lut)).get_concrete_function(tf.TensorSpec([1, 24, 8]))
    with pytest.raises(ValueError, match=r"b has length 24; expected 16 \(the layout's k_blocks \* bs\)"):
        tf.function(lambda b: raw.bsattn_nn(blocks(), b, tf.constant(NN_LUT), k_blocks=2)).get_concrete_function(
            tf.TensorSpec([1, 24, 8])
        )
    with pytest.raises(ValueError, match=r"Dimensions must be equal"):
        tf.function(lambda a: nt(a, dense(), lut)).get_concrete_function(tf.TensorSpec([2, 16, 8]))


# ---- Python wrappers ----------------------------------------------------------------------------------------


@pytest.fixture
def tables():
    return build_tables(LAYOUT, BS)


@pytest.mark.parametrize("op", ["nt", "nn", "tn"])
def test_dtype_mismatch(tables, op):
    if op == "nt":
        call, match = (lambda: ops.nt(dense(), tf.ones([1, 16, 8], tf.float16), tables, HEADS),
                       "inputs must share one dtype, got a: float32, b: float16")  # fmt: skip
    else:  # reduced-precision weights with float32 activations are allowed; not the other way round
        fn = getattr(ops, op)
        call, match = (lambda: fn(blocks(), tf.cast(dense(), tf.bfloat16), tables),
                       "with a float32 b; got w: float32, b: bfloat16")  # fmt: skip
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("key", [-1, 16, 100])
def test_autoregress_at_key_out_of_range_python(key):
    tables = build_tables(LAYOUT, BS)
    with pytest.raises(ValueError, match=rf"autoregress_at_key must be in \[0, 16\), got {key}"):
        ops.masked_softmax(blocks(), tables, 1.0, autoregress_at_key=key)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_autoregress_at_key_tensor_out_of_range(tables, mode):
    def run(key):
        return ops.masked_softmax(blocks(), tables, 1.0, autoregress_at_key=key)

    fn = tf.function(run) if mode == "function" else run
    with raises_invalid(r"autoregress_at_key out of range"):
        fn(tf.constant(16))
    with raises_invalid(r"autoregress_at_key must be >= 0, got -2"):
        fn(tf.constant(-2))


def test_scale_checked_through_wrapper(tables):
    with raises_invalid(r"scale must be a scalar"):
        ops.masked_softmax(blocks(), tables, [0.5, 0.5])
    with raises_invalid(r"scale must be finite"):
        ops.masked_softmax(blocks(), tables, float("nan"))


# ---- BlocksparseTransformer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layout": LAYOUT, "block_size": 12, "heads": 2}, r"block_size must be one of \(8, 16, 32, 64, 128\), got 12"),
        ({"layout": LAYOUT, "block_size": 256, "heads": 2}, r"block_size must be one of .* got 256"),
        ({"layout": LAYOUT}, r"heads must be explicitly specified"),
        (
            {"layout": np.array([[[1, 0], [1, 1]], [[1, 1], [1, 1]]])},
            r"number of layout blocks must be equal across heads",
        ),
        ({"layout": np.zeros((2, 2)), "heads": 2}, r"have no active block"),
        ({"layout": np.array([LAYOUT, LAYOUT, LAYOUT]), "heads": 2}, r"layout has 3 heads; expected 1 or heads = 2"),
        ({"layout": np.ones(4), "heads": 2}, r"layout must be \[q_blocks, k_blocks\] or \[heads, q_blocks, k_blocks\]"),
        (
            {"layout": LAYOUT, "heads": 2, "block_size": 8, "mask_callback": lambda *a: np.ones((4, 4), bool)},
            r"mask_callback returned",
        ),
    ],
    ids=["block_size", "block_size_256", "no_heads", "unequal_counts", "empty", "head_count", "rank", "callback_shape"],
)
def test_transformer_constructor_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlocksparseTransformer(**kwargs)


def test_transformer_autoregress_needs_callback():
    bst = BlocksparseTransformer(LAYOUT, block_size=BS, heads=HEADS)
    with pytest.raises(ValueError, match=r"autoregress_at_key requires a mask_callback"):
        bst.masked_softmax(blocks(), autoregress_at_key=3)
    masked = BlocksparseTransformer(LAYOUT, block_size=BS, heads=HEADS, mask_callback=causal_callback)
    masked.masked_softmax(blocks(), autoregress_at_key=3)  # fine with a callback


def test_transformer_width_not_divisible_by_heads():
    bst = BlocksparseTransformer(LAYOUT, block_size=BS, heads=3)
    with pytest.raises(ValueError, match=r"a width 8 is not divisible by heads 3"):
        bst.query_key_op(dense(), dense())


# ---- sparse_attention ---------------------------------------------------------------------------------------


def qkv(t=32, width=16):
    return [tf.ones([1, t, width])] * 3


def test_attention_heads_not_dividing_width():
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=r"width 30 is not divisible by heads 4"):
        blocksparse_attention_impl(*qkv(width=30), 4, "all", blocksize=8)


@pytest.mark.parametrize("fn", [blocksparse_attention_impl, attention_impl], ids=["blocksparse", "dense"])
def test_unknown_attn_mode(fn):
    with pytest.raises(ValueError, match=r"attn_mode.*'diagonal'"):
        fn(*qkv(), 2, "diagonal", local_attn_ctx=8)


def test_get_attn_mask_unknown_mode():
    with pytest.raises(ValueError, match=r"attn_mode.*'diagonal'"):
        get_attn_mask(16, "diagonal")


@pytest.mark.parametrize(
    "t, mode, kwargs, match",
    [
        (20, "all", {"blocksize": 8}, r"n_q=20 must be a multiple of block_size=8"),
        (32, "local", {"blocksize": 8}, r"needs local_attn_ctx"),
        (32, "local", {"local_attn_ctx": 12, "blocksize": 8}, r"local_attn_ctx=12 must be a multiple of block_size=8"),
        (32, "strided", {"local_attn_ctx": 3, "blocksize": 8}, r"must be a multiple of local_attn_ctx=3"),
        (
            32,
            "strided",
            {"local_attn_ctx": 8, "blocksize": 8},
            r"n_ctx / local_attn_ctx = 4 must be a multiple of blocksize=8",
        ),
        (
            32,
            "fixed",
            {"local_attn_ctx": 16, "blocksize": 8, "num_verts": 3},
            r"num_heads=2 must be a multiple of num_verts=3",
        ),
        (32, "fixed", {"local_attn_ctx": 16, "blocksize": 8, "vertsize": 3}, r"vertsize=3 must divide"),
        (32, "fixed", {"local_attn_ctx": 16, "blocksize": 8, "num_verts": 2, "vertsize": 2}, r"num_verts=2 must be <="),
    ],
    ids=[
        "T_block",
        "local_no_ctx",
        "local_ctx_block",
        "strided_ctx",
        "strided_block",
        "fixed_heads",
        "fixed_vertsize",
        "fixed_num_verts",
    ],
)
def test_attention_size_checks(t, mode, kwargs, match):
    with pytest.raises(ValueError, match=match):
        blocksparse_attention_impl(*qkv(t), 2, mode, **kwargs)
