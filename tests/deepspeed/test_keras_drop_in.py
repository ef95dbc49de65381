"""SparseMultiHeadAttention as a drop-in for keras.layers.MultiHeadAttention.

Part 1, ``KerasCasesTest``: the cases of Keras 3's ``multi_head_attention_test.py`` that concern the sequence axis,
restated (same shapes, arguments and assertions) with ``SparseMultiHeadAttention`` in place of Keras's class; the
cases that need attention over several axes (rank > 3 inputs) assert the clear error instead. Keras's
flash-attention cases are skipped for the TensorFlow backend by Keras itself and are left out.

Part 2: value tests against ``keras.layers.MultiHeadAttention`` with copied weights.
"""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from keras.src import backend, testing
from keras.src.backend.config import disable_flash_attention, enable_flash_attention

from bsattn.deepspeed.layers import SparseGroupedQueryAttention, SparseMultiHeadAttention
from bsattn.deepspeed.sparsity_config import BigBirdSparsityConfig, FixedSparsityConfig

MHA = SparseMultiHeadAttention
RANK_ERROR = r"rank 3"


class KerasCasesTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        disable_flash_attention()

    def tearDown(self):
        super().tearDown()
        enable_flash_attention()

    def _layer_test(self, init_kwargs, trainable, seed_generators, query_shape=(2, 8, 16), value_shape=(2, 4, 16)):
        self.run_layer_test(
            MHA, init_kwargs=init_kwargs, input_shape={"query_shape": query_shape, "value_shape": value_shape},
            expected_output_shape=query_shape, expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=0, expected_num_seed_generators=seed_generators,
            expected_num_losses=0, supports_masking=True, run_training_check=False,
        )  # fmt: skip

    def test_basics(self):  # T=8 queries, S=4 keys
        self._layer_test({"num_heads": 2, "key_dim": 2}, 8, 0)
        self._layer_test({"num_heads": 2, "key_dim": 2, "value_dim": 4, "use_bias": False, "dropout": 0.5}, 4, 1)
        self._layer_test({"num_heads": 2, "key_dim": 2, "use_gate": True}, 10, 0)
        kwargs = {"num_heads": 2, "key_dim": 2, "value_dim": 4, "use_bias": False, "dropout": 0.5, "use_gate": True}
        self._layer_test(kwargs, 5, 1)

    @parameterized.named_parameters(
        ("4d_inputs_1freebatch", (3, 4), (3, 2), (2,)),
        ("4d_inputs_2d_attention", (3, 4), (3, 2), (1, 2)),
        ("5d_inputs_2d_attention", (5, 3, 4), (5, 3, 2), (2, 3)),
    )
    def test_high_dim_attention_is_a_clear_error(self, q_dims, v_dims, attention_axes):
        query, value = np.ones((3,) + q_dims + (8,)), np.ones((3,) + v_dims + (8,))
        with self.assertRaisesRegex(ValueError, "attention_axes"):
            MHA(num_heads=2, key_dim=2, attention_axes=attention_axes)
        with self.assertRaisesRegex(ValueError, RANK_ERROR):
            MHA(num_heads=2, key_dim=2)(query, value)

    def test_attention_axes_negative_indexing(self):
        x = np.random.normal(size=(2, 8, 4))
        for gate in (False, True):
            pos = MHA(num_heads=2, key_dim=4, attention_axes=1, use_gate=gate)
            neg = MHA(num_heads=2, key_dim=4, attention_axes=-2, use_gate=gate)
            pos(x, x), neg(x, x)
            neg.set_weights(pos.get_weights())
            (z_pos, a_pos), (z_neg, a_neg) = (m(x, x, return_attention_scores=True) for m in (pos, neg))
            self.assertEqual(a_pos.shape, a_neg.shape)
            self.assertAllClose(z_pos, z_neg, rtol=1e-5, atol=1e-5)
            self.assertAllClose(a_pos, a_neg, rtol=1e-5, atol=1e-5)
        with self.assertRaisesRegex(ValueError, RANK_ERROR):  # Keras's own case: a free axis in a rank-4 input
            MHA(num_heads=2, key_dim=4)(np.ones((2, 3, 8, 4)), np.ones((2, 3, 8, 4)))

    @parameterized.named_parameters(
        ("without_key_same_proj", (4, 8), (2, 8), None, None),
        ("with_key_same_proj", (4, 8), (2, 8), (2, 3), None),
        ("without_key_different_proj", (4, 8), (2, 8), None, (3, 4)),
        ("with_key_different_proj", (4, 8), (2, 8), (2, 3), (1, 5)),
        ("high_dim_same_proj", (4, 2, 3, 8), (1, 1, 5, 8), (1, 1, 5, 2), None),
        ("different_qv_last_dims", (4, 2, 3, 8), (4, 2, 3, 7), (4, 2, 3, 8), None),
    )
    def test_compute_output_shape(self, query_dims, value_dims, key_dims, output_shape):
        layer = MHA(num_heads=2, key_dim=2, value_dim=2, output_shape=output_shape)
        query_shape, value_shape = (7,) + query_dims, (7,) + value_dims
        key_shape = (7,) + key_dims if key_dims else None
        query, value = np.ones(query_shape), np.ones(value_shape)
        key = np.ones(key_shape) if key_shape else None
        if len(query_shape) != 3:
            with self.assertRaisesRegex(ValueError, RANK_ERROR):
                layer(query=query, value=value, key=key)
            return
        output = layer(query=query, value=value, key=key)
        self.assertEqual(output.shape, layer.compute_output_shape(query_shape, value_shape, key_shape))
        as_lists = (list(query_shape), list(value_shape), list(key_shape) if key_shape else None)
        self.assertEqual(output.shape, layer.compute_output_shape(*as_lists))

    @parameterized.named_parameters(
        ("query_value_dim_mismatch", (2, 4, 8), (2, 2, 7), (2,)),
        ("key_value_dim_mismatch", (2, 4, 8), (2, 2, 8), (2, 1, 7)),
        ("key_value_dim_mismatch_high_dim", (2, 4, 2, 3, 8), (2, 1, 1, 5, 8), (2, 1, 15, 5, 2)),
    )
    def test_shape_mismatch_error(self, query_shape, value_shape, key_shape):
        layer = MHA(num_heads=4, key_dim=2, value_dim=2)
        with self.assertRaisesRegex(ValueError, r"must be equal"):
            layer.compute_output_shape(query_shape, value_shape, key_shape)
        with self.assertRaisesRegex(ValueError, r"must be equal"):
            layer(np.ones(query_shape), np.ones(value_shape), np.ones(key_shape))

    def test_invalid_scalar_args_rejected(self):
        for bad in (0, -2, 1.5):
            for name, kwargs in (("num_heads", {"num_heads": bad, "key_dim": 4}),
                                 ("key_dim", {"num_heads": 4, "key_dim": bad}),
                                 ("value_dim", {"num_heads": 4, "key_dim": 4, "value_dim": bad})):  # fmt: skip
                with self.assertRaisesRegex(ValueError, f"argument `{name}`"):
                    MHA(**kwargs)
        MHA(num_heads=4, key_dim=4, value_dim=None)

    def test_initializer(self):
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        layer = MHA(num_heads=12, key_dim=64, use_gate=True, kernel_initializer=init)
        layer.build((2, 4, 8), (2, 4, 8))
        for other in (layer._key_dense, layer._value_dense, layer._output_dense, layer._gate_dense):
            self.assertNotAllClose(layer._query_dense.kernel, other.kernel)

    def test_query_mask_propagation(self):
        layer = MHA(num_heads=2, key_dim=2)
        self.assertTrue(layer.supports_masking)
        query = np.array([[1, 2, 3, 0, 0], [3, 3, 1, 1, 2], [1, 0, 0, 0, 0]])
        masked_query = keras.layers.Embedding(4, 8, mask_zero=True)(query)
        query_mask = backend.get_keras_mask(masked_query)
        output = layer(query=masked_query, value=np.random.normal(size=(3, 3, 8)))
        self.assertAllClose(query_mask, backend.get_keras_mask(output))

    @parameterized.named_parameters(("causal", True), ("not_causal", 0))
    def test_masking(self, use_causal_mask):  # T=5 queries, S=3 keys, implicit masks vs the same explicit mask
        layer = MHA(num_heads=2, key_dim=2)
        masked_query = keras.layers.Embedding(4, 8, mask_zero=True)(
            np.array([[1, 2, 3, 0, 0], [3, 3, 1, 1, 2], [1, 0, 0, 0, 0]]))  # fmt: skip
        masked_value = keras.layers.Embedding(6, 8, mask_zero=True)(np.array([[5, 4, 0], [3, 0, 0], [2, 1, 1]]))
        output = layer(query=masked_query, value=masked_value, use_causal_mask=use_causal_mask)
        mask = np.array([[[1, 1, 0]] * 3 + [[0, 0, 0]] * 2] + [[[1, 0, 0]] * 5] + [[[1, 1, 1]] + [[0, 0, 0]] * 4])
        if use_causal_mask:
            mask = mask & np.array([[[1, 0, 0], [1, 1, 0]] + [[1, 1, 1]] * 3])
        backend.set_keras_mask(masked_query, None)
        backend.set_keras_mask(masked_value, None)
        self.assertAllClose(output, layer(query=masked_query, value=masked_value, attention_mask=mask))

    def test_masking_with_different_shapes(self):
        x = keras.random.uniform(shape=(2, 5, 8))
        layer = MHA(num_heads=2, key_dim=4)
        mask = keras.ops.tril(keras.ops.ones((5, 5)))
        batch_mask = keras.ops.tile(mask[None], (2, 1, 1))
        head_mask = keras.ops.tile(batch_mask[:, None], (1, 2, 1, 1))
        outputs = [layer(query=x, value=x, attention_mask=m) for m in (mask, batch_mask, head_mask)]
        self.assertAllClose(outputs[0], outputs[1])
        self.assertAllClose(outputs[0], outputs[2])

    def test_no_warning_with_keras_mask(self):
        layer = MHA(num_heads=2, key_dim=2)
        query = keras.layers.Embedding(4, 8, mask_zero=True)(np.array([[1, 2, 3, 0, 0], [3, 3, 1, 1, 2]]))
        value = keras.layers.Embedding(6, 8, mask_zero=True)(np.array([[5, 4, 0], [3, 0, 0]]))
        with warnings.catch_warnings(record=True) as logs:
            layer(query=query, value=value)
            self.assertLen(logs, 0)

    def test_sliding_window(self):
        x = np.random.RandomState(0).randn(1, 6, 8).astype("float32")
        for causal in (True, False):
            layer = MHA(num_heads=2, key_dim=4, sliding_window=3)
            _, scores = layer(x, x, use_causal_mask=causal, return_attention_scores=True)
            scores = keras.ops.convert_to_numpy(scores)[0, 0]
            i, j = np.indices(scores.shape)
            window = (abs(i - j) < 3) & ((j <= i) | (not causal))
            self.assertTrue((scores[window] > 0).all())
            self.assertTrue((scores[~window] == 0).all())

    def test_causal_only_fast_path(self):
        layer = MHA(num_heads=2, key_dim=4)
        x = np.random.RandomState(0).randn(2, 5, 8).astype("float32")
        fast = layer(x, x, use_causal_mask=True)
        slow = layer(x, x, attention_mask=np.tril(np.ones((1, 5, 5), dtype="bool")))
        self.assertAllClose(fast, slow, atol=1e-5)

    def test_causal_only_skipped_for_subclass(self):
        seen = {}

        class Sub(MHA):
            def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                                   return_attention_scores=False):  # fmt: skip
                seen["mask_is_none"] = attention_mask is None
                return super()._compute_attention(query, key, value, attention_mask, training, return_attention_scores)

        Sub(num_heads=2, key_dim=4)(np.random.RandomState(0).randn(2, 5, 8).astype("float32"), use_causal_mask=True,
                                    value=np.random.RandomState(1).randn(2, 5, 8).astype("float32"))  # fmt: skip
        self.assertFalse(seen["mask_is_none"])

    def test_causal_only_with_other_mask_falls_back(self):
        layer = MHA(num_heads=2, key_dim=4)
        x = np.random.RandomState(0).randn(2, 5, 8).astype("float32")
        layer.build(query_shape=x.shape, value_shape=x.shape)
        extra = np.ones((2, 5, 5), dtype="bool")
        extra[:, 2, 3] = False
        merged = extra & np.tril(np.ones((5, 5), dtype="bool"))
        out1 = layer(x, x, attention_mask=extra, use_causal_mask=True)
        self.assertEqual(tuple(out1.shape), (2, 5, 8))
        self.assertAllClose(out1, layer(x, x, attention_mask=merged, use_causal_mask=False), atol=1e-5)

    @parameterized.named_parameters(
        ("scores_only", 0.0, True), ("dropout_only", 0.1, False), ("dropout_and_scores", 0.1, True)
    )
    def test_causal_only_masks_when_fused_path_disabled(self, dropout, return_attention_scores):
        future = np.triu(np.ones((6, 6)), k=1).astype(bool)
        x = np.random.RandomState(0).randn(1, 6, 8).astype("float32")
        layer = MHA(num_heads=2, key_dim=4, dropout=dropout)
        if return_attention_scores:
            _, scores = layer(x, x, use_causal_mask=True, return_attention_scores=True, training=False)
            self.assertLess(backend.convert_to_numpy(scores)[..., future].sum(), 1e-6)
        else:
            out_causal = layer(x, x, use_causal_mask=True, training=False)
            self.assertAllClose(out_causal, layer(x, x, attention_mask=(~future)[None], training=False), atol=1e-5)

    def test_causal_only_masks_non_4d_inputs_is_a_clear_error(self):
        x = np.random.RandomState(0).randn(1, 5, 3, 8).astype("float32")
        with self.assertRaisesRegex(ValueError, RANK_ERROR):
            MHA(num_heads=2, key_dim=4, attention_axes=1)(x, x, use_causal_mask=True, return_attention_scores=True)

    @parameterized.named_parameters(("fused_fallback", False), ("manual_path", True))
    def test_compute_attention_combines_causal_and_explicit_mask(self, return_attention_scores):
        layer = MHA(num_heads=2, key_dim=4)
        layer.build(query_shape=(1, 5, 8), value_shape=(1, 5, 8))
        rng = np.random.RandomState(0)
        query, key, value = (rng.randn(1, 5, 2, 4).astype("float32") for _ in range(3))
        extra = np.ones((1, 5, 5), dtype="bool")
        extra[:, 3, 1] = False
        merged = extra & np.tril(np.ones((5, 5), dtype="bool"))[None]
        out_both, _ = layer._compute_attention(query, key, value, attention_mask=extra, use_causal_mask=True,
                                               return_attention_scores=return_attention_scores)  # fmt: skip
        out_merged, _ = layer._compute_attention(query, key, value, attention_mask=merged, use_causal_mask=False,
                                                 return_attention_scores=return_attention_scores)  # fmt: skip
        self.assertAllClose(out_both, out_merged, atol=1e-5)

    def test_sliding_window_validation_and_serialization(self):
        for bad in (0, -3):
            with self.assertRaisesRegex(ValueError, "sliding_window"):
                MHA(num_heads=2, key_dim=4, sliding_window=bad)
        config = MHA(num_heads=2, key_dim=4, sliding_window=5).get_config()
        self.assertEqual(config["sliding_window"], 5)
        self.assertEqual(MHA.from_config(config)._sliding_window, 5)

    @parameterized.named_parameters(("disable_flash_attention", False), ("enable_flash_attention", True))
    def test_correctness(self, flash_attention):
        if flash_attention:
            enable_flash_attention()
        num_heads, key_dim = 8, 8
        query = key = np.identity(key_dim)[None]
        value = np.reshape(np.arange(key_dim * key_dim), (1, key_dim, key_dim)) / 100.0
        layer = MHA(num_heads=num_heads, key_dim=key_dim, dtype="float16")
        layer.build(query.shape, key.shape, value.shape)
        kernel = np.repeat(np.identity(key_dim)[:, None, :], num_heads, axis=1)
        layer.set_weights([kernel, np.zeros((num_heads, key_dim))] * 3 + [kernel, np.zeros((key_dim,))])
        row = np.array([2.406, 2.440, 2.473, 2.504, 2.535, 2.568, 2.602, 2.633])
        expected_output = np.tile(row[None, :, None], (1, 1, key_dim))
        expected_score = np.where(np.identity(key_dim, dtype=bool), 0.1691, 0.1187)
        expected_score = np.tile(expected_score[None, None], (1, key_dim, 1, 1))
        if flash_attention:
            self.assertAllClose(layer(query=query, value=value, key=key), expected_output, atol=1e-2)
        else:
            output, scores = layer(query=query, value=value, key=key, return_attention_scores=True)
            self.assertAllClose(output, expected_output, atol=1e-2)
            self.assertAllClose(scores, expected_score, atol=1e-2)

    def test_mha_constraints(self):
        shape = (1, 2, 2)
        for arg, attr in (("kernel_constraint", "kernel"), ("bias_constraint", "bias")):
            layer = MHA(num_heads=2, key_dim=2, use_gate=True, **{arg: "non_neg"})
            layer.build(shape, shape, shape)
            for sub in (layer._query_dense, layer._value_dense, layer._key_dense, layer._gate_dense):
                self.assertIsInstance(getattr(sub, attr).constraint, keras.constraints.NonNeg)

    def _adapter_round_trip(self, enable):
        query = np.array([[[1.0, 0.0], [0.0, 1.0]]])
        key = np.array([[[0.0, 1.0], [1.0, 0.0]]])
        value = np.array([[[1.0, 2.0], [3.0, 4.0]]])
        layer = MHA(num_heads=3, key_dim=8, use_bias=False, use_gate=True)
        layer.build(query.shape, key.shape, value.shape)
        for dense in (layer.query_dense, layer.key_dense, layer.value_dense):
            getattr(dense, enable)(2)
        x = {"query": query, "key": key, "value": value}
        layer(**x)
        inputs = {name: keras.layers.Input((2, 2)) for name in ("query", "key", "value")}
        model = keras.Model(inputs, layer(inputs["query"], inputs["key"], inputs["value"]))
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, np.random.random((1, 2, 2)), verbose=0)
        path = os.path.join(self.get_temp_dir(), "adapter.keras")
        model.save(path)
        self.assertAllClose(model.predict(x, verbose=0), keras.saving.load_model(path).predict(x, verbose=0))
        path = os.path.join(self.get_temp_dir(), "adapter.weights.h5")
        model.save_weights(path)
        inputs = {name: keras.layers.Input((2, 2)) for name in ("query", "key", "value")}
        plain = MHA(num_heads=3, key_dim=8, use_bias=False, use_gate=True)
        plain_model = keras.Model(inputs, plain(inputs["query"], inputs["key"], inputs["value"]))
        plain_model.load_weights(path)
        self.assertAllClose(model.predict(x, verbose=0), plain_model.predict(x, verbose=0))
        plain_model.save_weights(path)
        model.load_weights(path)
        self.assertAllClose(model.predict(x, verbose=0), plain_model.predict(x, verbose=0))

    def test_lora(self):
        self._adapter_round_trip("enable_lora")

    @pytest.mark.skipif(not hasattr(keras.layers.EinsumDense, "enable_dora"), reason="DoRA: newer Keras")
    def test_dora(self):
        self._adapter_round_trip("enable_dora")

    @parameterized.parameters([((1, 2, 3),), ((2, 3, 5),)])
    def test_symbolic_return_attention_scores(self, shape):
        mha = MHA(num_heads=4, key_dim=2)
        symbolic = mha(keras.layers.Input(batch_shape=shape), keras.layers.Input(batch_shape=shape),
                       return_attention_scores=True)  # fmt: skip
        self.assertLen(symbolic, 2)
        out = mha(np.random.random(shape), np.random.random(shape), return_attention_scores=True)
        self.assertLen(out, 2)
        self.assertEqual(symbolic[0].shape, out[0].shape)
        self.assertEqual(symbolic[1].shape, out[1].shape)

    def test_dtype_policy_map(self):
        policy_map = keras.dtype_policies.DTypePolicyMap()
        for name in ("query", "key", "value"):
            policy_map[f"mha/{name}"] = keras.dtype_policies.QuantizedDTypePolicy("int8", "float32")
        layer = MHA(num_heads=3, key_dim=8, use_bias=False, dtype=policy_map, name="mha")
        layer.build((1, 2, 2), (1, 2, 2), (1, 2, 2))
        for dense in (layer._query_dense, layer._key_dense, layer._value_dense):
            self.assertDType(dense._kernel, "int8")

    def test_output_shape(self):
        query, value = keras.random.uniform((2, 4, 16)), keras.random.uniform((2, 4, 16))
        self.assertEqual(MHA(num_heads=2, key_dim=16, output_shape=8)(query=query, value=value).shape, (2, 4, 8))
        out = MHA(num_heads=2, key_dim=16, output_shape=(8, 8))(query=query, value=value)
        self.assertEqual(out.shape, (2, 4, 8, 8))
        with self.assertRaisesRegex(ValueError, r"Invalid `output_shape`"):
            MHA(num_heads=2, key_dim=16, output_shape=8.0)

    def test_quantize_int8(self):
        keras.utils.set_random_seed(1347)
        query = np.array([[[1.0, 0.0], [0.0, 1.0]]])
        key = np.array([[[0.0, 1.0], [1.0, 0.0]]])
        value = np.array([[[1.0, 2.0], [3.0, 4.0]]])
        for gate in (False, True):
            layer = MHA(num_heads=3, key_dim=8, use_bias=False, use_gate=gate)
            layer.build(query.shape, value.shape, key.shape)
            output_float = layer(query, key, value)
            for sub in (layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense) + (
                (layer._gate_dense,) if gate else ()
            ):
                sub.quantize("int8")
                self.assertDType(sub._kernel, "int8")
            mse = keras.ops.mean(keras.ops.square(output_float - layer(query, key, value)))
            self.assertLess(mse, 1e-2)


# ---- value tests against Keras's layer with copied weights -------------------------------------------------


def pair(rng, t, s, dim=8, **kwargs):
    """A built Keras layer and a SparseMultiHeadAttention with its weights, and inputs ``[2, t, dim]``,
    ``[2, s, dim]``."""
    sparse_kwargs = {k: kwargs.pop(k) for k in ("sparsity_config", "max_seq_length") if k in kwargs}
    q = rng.normal(size=(2, t, dim)).astype("float32")
    v = rng.normal(size=(2, s, dim)).astype("float32")
    ref = keras.layers.MultiHeadAttention(**kwargs)
    ref(q, v)
    sparse = SparseMultiHeadAttention.from_multi_head_attention(ref, **sparse_kwargs)
    return ref, sparse, q, v


@pytest.mark.parametrize("t, s", [(5, 5), (13, 7), (9, 21)])
@pytest.mark.parametrize("key_dim, value_dim, dropout", [(4, 4, 0.0), (3, 6, 0.2)])
def test_masks_match_keras(rng, t, s, key_dim, value_dim, dropout):
    # Every row, padded queries and queries with no key included (Keras: the mean of the values without
    # dropout, 0 with; its dropout only applies under training).
    ref, sparse, q, v = pair(rng, t, s, num_heads=2, key_dim=key_dim, value_dim=value_dim, dropout=dropout)
    key_mask = np.arange(s)[None] < np.array([[s], [s - 3]])  # batch 1: three padded keys
    query_mask = np.arange(t)[None] < np.array([[t], [t - 2]])
    full = rng.random((2, t, s)) > 0.3
    full[0, 1] = False  # a query with no key
    for kwargs in ({}, {"use_causal_mask": True}, {"attention_mask": full}, {"attention_mask": full[0]},
                   {"attention_mask": full, "use_causal_mask": True}, {"attention_mask": key_mask[:, None]}):  # fmt: skip
        np.testing.assert_allclose(sparse(q, v, **kwargs), ref(q, v, **kwargs), atol=2e-6, err_msg=str(kwargs))
    # implicit masks: Masking layers on the inputs
    mq = np.where(query_mask[..., None], q, 0.0)
    mv = np.where(key_mask[..., None], v, 0.0)
    masking = keras.layers.Masking(0.0)
    for causal in (False, True):
        a = sparse(masking(mq), masking(mv), use_causal_mask=causal)
        np.testing.assert_allclose(a, ref(masking(mq), masking(mv), use_causal_mask=causal), atol=2e-6)
        np.testing.assert_array_equal(backend.get_keras_mask(a), query_mask)


def test_implicit_masks_from_embedding_in_a_model(rng):
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(10, 8, mask_zero=True)(tokens)
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(tokens, mha(x, x))
    ids = rng.integers(1, 10, (3, 11))
    ids[1, 7:] = 0
    ids[2, 2:] = 0
    expected = model(ids)
    sparse = keras.Model(tokens, SparseMultiHeadAttention.from_multi_head_attention(mha)(x, x))
    np.testing.assert_allclose(sparse(ids), expected, atol=2e-6)


def test_sparse_config_matches_keras_with_the_pattern_as_mask(rng):
    config = BigBirdSparsityConfig(2, block=8, different_layout_per_head=True, num_random_blocks=1,
                                   num_sliding_window_blocks=3, num_global_blocks=1)  # fmt: skip
    ref, sparse, q, v = pair(rng, 29, 40, num_heads=2, key_dim=4, sparsity_config=config)
    allowed = config.token_mask(32, 40)[:, :29, :40]  # the pattern of the padded lengths, real corner
    out = sparse(q, v)
    np.testing.assert_allclose(out, ref(q, v, attention_mask=np.broadcast_to(allowed[None], (2, 2, 29, 40))),
                               atol=2e-6)  # fmt: skip
    uni = FixedSparsityConfig(2, block=8, num_local_blocks=2, attention="unidirectional")
    _, causal, _, _ = pair(rng, 29, 40, num_heads=2, key_dim=4, sparsity_config=uni)
    causal.set_weights(ref.get_weights())
    keep = uni.token_mask(32, 40)[0, :29, :40]
    np.testing.assert_allclose(causal(q, v, use_causal_mask=True), ref(q, v, attention_mask=keep[None]), atol=2e-6)


def test_dropout_statistics_under_training(rng):
    # Identity projections and values one-hot per key: the output of a query is its kept, rescaled
    # probabilities, whose mean and spread must match Keras's dropout.
    t = s = 24
    ref, sparse, q, _ = pair(rng, t, s, dim=s, num_heads=1, key_dim=s, dropout=0.25)
    eye = np.eye(s, dtype="float32")
    weights = [eye[:, None, :] * 0.1, np.zeros((1, s)), eye[:, None, :] * 0.1, np.zeros((1, s)),
               eye[:, None, :], np.zeros((1, s)), eye[None, :, :], np.zeros((s,))]  # fmt: skip
    for layer in (ref, sparse):
        layer.set_weights(weights)
    q = np.repeat(q[:1], 64, axis=0)
    v = np.repeat(eye[None], 64, axis=0)
    probs = np.asarray(ref(q, v, training=False))
    np.testing.assert_allclose(sparse(q, v, training=False), probs, atol=1e-6)
    outs = {name: np.asarray(layer(q, v, training=True)) for name, layer in (("keras", ref), ("sparse", sparse))}
    for name, out in outs.items():
        dropped = (out == 0).mean()
        assert abs(dropped - 0.25) < 0.02, (name, dropped)
        np.testing.assert_allclose(out[out != 0] / np.broadcast_to(probs, out.shape)[out != 0], 1 / 0.75, rtol=1e-4)
    assert not np.array_equal(sparse(q, v, training=True), outs["sparse"])  # a new mask per call


def test_fit_mixed_precision_and_keras_round_trip(rng, tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((13, 8))
        layer = SparseMultiHeadAttention(2, 4, dropout=0.1, sparsity_config=FixedSparsityConfig(2, block=8),
                                         name="sparse")  # fmt: skip
        model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(layer(inputs, inputs)))
        ref_layer = keras.layers.MultiHeadAttention(2, 4)
        x = rng.normal(size=(32, 13, 8)).astype("float32")
        ref_layer(x, x)
        model(x)
        ref_layer.set_weights(layer.get_weights())
        allowed = FixedSparsityConfig(2, block=8).token_mask(16)[:, :13, :13]
        out, expected = layer(x, x), ref_layer(x, x, attention_mask=allowed)
        assert out.dtype == "float16"
        np.testing.assert_allclose(np.float32(out), np.float32(expected), atol=4e-3)
        y = np.cumsum(x[..., :1], axis=1) / 4  # a toy task that needs attention along the sequence
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
        history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
        assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]
        model.save(tmp_path / "m.keras")
        reloaded = keras.saving.load_model(tmp_path / "m.keras")
        np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
        assert reloaded.get_layer("sparse").sparsity_config == FixedSparsityConfig(2, block=8)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_errors():
    with pytest.raises(ValueError, match="sparsity_config.num_heads=2 must equal num_heads=4"):
        SparseMultiHeadAttention(4, 8, sparsity_config=FixedSparsityConfig(2))
    with pytest.raises(ValueError, match="max_seq_length must be a positive integer"):
        SparseMultiHeadAttention(2, 8, max_seq_length=0)
    layer = SparseMultiHeadAttention(2, 4, max_seq_length=16)
    with pytest.raises(ValueError, match="T \\(query length\\)=20 is more than max_seq_length=16"):
        layer(np.ones((1, 20, 8)), np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(np.ones((1, 8, 8)), np.ones((1, 8, 8)), attention_mask=np.ones((8,)))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 8])])
    def dynamic(x):
        return SparseMultiHeadAttention(2, 4)(x, x)

    with pytest.raises(ValueError, match="lengths must be known while tracing"):
        dynamic.get_concrete_function()


def test_dynamic_lengths_with_max_seq_length(rng):
    ref, sparse, q, v = pair(rng, 11, 11, num_heads=2, key_dim=4, max_seq_length=24)
    run = tf.function(lambda a, b: sparse(a, b), input_signature=[tf.TensorSpec([None, None, 8])] * 2)
    np.testing.assert_allclose(run(q, v), ref(q, v), atol=2e-6)
    np.testing.assert_allclose(run(q[:, :5], v[:, :9]), ref(q[:, :5], v[:, :9]), atol=2e-6)


# ---- SparseGroupedQueryAttention (stop-gap: K/V heads repeated) vs keras.layers.GroupQueryAttention ----


@pytest.mark.parametrize("t, s, dropout", [(13, 7, 0.0), (9, 21, 0.2)])
def test_grouped_query_attention_matches_keras(rng, tmp_path, t, s, dropout):
    q = rng.normal(size=(2, t, 8)).astype("float32")
    v = rng.normal(size=(2, s, 8)).astype("float32")
    ref = keras.layers.GroupQueryAttention(4, 4, 2, dropout=dropout)
    ref(q, v)
    config = FixedSparsityConfig(4, block=8, different_layout_per_head=True, num_local_blocks=2,
                                 num_different_global_patterns=2)  # fmt: skip
    sparse = SparseGroupedQueryAttention(4, 4, 2, dropout=dropout, sparsity_config=config)
    sparse(q, v)
    sparse.set_weights(ref.get_weights())
    allowed = config.token_mask(_round(t), _round(s))[None, :, :t, :s]  # [1, 4, T, S]
    full = rng.random((2, t, s)) > 0.3
    full[0, 1] = False  # a query with no key
    key_mask = np.arange(s)[None] < np.array([[s], [s - 3]])
    for kwargs in ({}, {"use_causal_mask": True}, {"attention_mask": full}):
        want_mask = allowed & np.broadcast_to(kwargs.get("attention_mask", True), (2, t, s))[:, None]
        if kwargs.get("use_causal_mask"):
            want_mask = want_mask & np.tril(np.ones((t, s), bool))
        # A per-head pattern: the scores path (Keras's own softmax with the pattern as a mask) puts no weight
        # outside it, and the fused path gives the same output on rows with a key in every head (on the others
        # Keras's scores path gives 0, its default path and this layer the mean of the values: checked below).
        got, scores = sparse(q, v, return_attention_scores=True, **kwargs)
        assert (np.asarray(scores)[~np.broadcast_to(want_mask, scores.shape)] == 0).all()
        rows = np.broadcast_to(want_mask, scores.shape).any(-1).all(1)  # [B, T]
        np.testing.assert_allclose(np.asarray(sparse(q, v, **kwargs))[rows], np.asarray(got)[rows], atol=2e-6)
    dense = SparseGroupedQueryAttention(4, 4, 2, dropout=dropout)
    dense(q, v)
    dense.set_weights(ref.get_weights())
    masking = keras.layers.Masking(0.0)
    mv = np.where(key_mask[..., None], v, 0.0)
    for kwargs in ({}, {"use_causal_mask": True}, {"attention_mask": full}):
        np.testing.assert_allclose(dense(q, v, **kwargs), ref(q, v, **kwargs), atol=2e-6, err_msg=str(kwargs))
    np.testing.assert_allclose(dense(q, masking(mv)), ref(q, masking(mv)), atol=2e-6)
    layer_config = sparse.get_config()
    assert SparseGroupedQueryAttention.from_config(layer_config).sparsity_config == config
    inputs = keras.Input((t, 8))
    model = keras.Model(inputs, sparse(inputs, inputs))
    model.save(tmp_path / "gqa.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "gqa.keras")(q), model(q))


def _round(n, bs=8):
    return -(-n // bs) * bs
