"""Context parallelism (``bsattn.context_parallel``) on 2 and 4 logical CPU devices.

Logical devices must be configured before TensorFlow initialises (and two MirroredStrategies of different
device sets in one process clash in their collective groups), so the distributed cases run in one subprocess
per ``N`` (``N`` logical CPUs, MirroredStrategy over them) that prints its results as JSON; the checks run here.
Each case: the sharded outputs and gradients (of q, k, v) concatenated over the replicas equal the single-device
op on the whole sequence, and the all-gathered buffer has exactly the tokens that the
plan's send sets give, which are checked against a brute-force reading of the token mask.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bsattn import patterns
from bsattn.context_parallel import NaturalStrided, context_parallel_plan
from bsattn.deepspeed.sparsity_config import BigBirdSparsityConfig
from bsattn.fused_tables import fused_tables_for_layout, fused_tables_for_pattern

REPO = Path(__file__).resolve().parents[1]
T, BS, H, D, B = 256, 16, 2, 8, 2

# name -> blocksparse_attention_impl arguments (mode, local_attn_ctx, extra), or "bigbird" (DeepSpeed layout).
CASES = {
    "all": ("all", None, {}),
    "local": ("local", 32, {}),
    "strided": ("strided", 8, {}),
    "fixed": ("fixed", 64, {"num_verts": 2, "vertsize": 1}),
    "gqa_causal": ("all", None, {"kv_heads": 1}),
    "bigbird": "bigbird",
    "bigbird_keras": "bigbird",  # the same layout through SparseSelfAttention(context_parallel=strategy)
}


def bigbird_config():
    return BigBirdSparsityConfig(num_heads=H, block=BS, different_layout_per_head=True, num_random_blocks=1,
                                 num_sliding_window_blocks=3, num_global_blocks=1, seed=3)  # fmt: skip


def bigbird_tables():
    return fused_tables_for_layout(bigbird_config().make_layout(T), BS)


def case_tables(name):
    if CASES[name] == "bigbird":
        return bigbird_tables()
    mode, ctx, extra = CASES[name]
    pattern = patterns.mode_pattern(mode, T, H, ctx, blocksize=BS, num_verts=extra.get("num_verts"),
                                    vertsize=extra.get("vertsize"))  # fmt: skip
    if mode == "strided":
        pattern = NaturalStrided(ctx)
    return fused_tables_for_pattern(pattern, T, T, BS)


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    n = int(sys.argv[2])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    sys.path.insert(0, sys.argv[1])
    from tests import test_context_parallel as spec
    from bsattn import SparseSelfAttention, blocksparse_attention_impl
    from bsattn.context_parallel import context_parallel_attention, context_parallel_plan, exchange_kv
    from bsattn.fused_attention import fused_attention

    T, H, D, B = spec.T, spec.H, spec.D, spec.B
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    rng = np.random.default_rng(0)
    out = {}

    def inputs(kv_heads, dtype):
        shapes = [(B, T, H * D), (B, T, kv_heads * D), (B, T, kv_heads * D), (B, T, H * D)]
        # values in ±[0.05, 1): never 0
        return [tf.constant(rng.uniform(0.05, 1, s) * rng.choice([-1, 1], s), dtype) for s in shapes]

    def attend(name, q, k, v, strategy):
        if name == "bigbird_keras":
            layer = SparseSelfAttention(spec.bigbird_config(), max_seq_length=T, context_parallel=strategy)
            heads4 = [tf.transpose(tf.reshape(x, [B, x.shape[1], -1, D]), [0, 2, 1, 3]) for x in (q, k, v)]
            out = layer(*heads4)
            return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [B, -1, H * D])
        if name == "bigbird":
            tables = spec.bigbird_tables()
            if strategy is None:
                return fused_attention(q, k, v, tables, H)
            return context_parallel_attention(q, k, v, tables, H, strategy)
        mode, ctx, extra = spec.CASES[name]
        return blocksparse_attention_impl(q, k, v, H, mode, ctx, spec.BS, context_parallel=strategy, **extra)

    def grads(name, q, k, v, g, strategy=None):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            o = attend(name, q, k, v, strategy)
            loss = tf.reduce_sum(o * g)
        return [o, *tape.gradient(loss, [q, k, v])]

    strategy = tf.distribute.MirroredStrategy(devices)
    L = T // n
    for name in spec.CASES:
        for dtype in (tf.float32, tf.float64) if name == "all" else (tf.float32,):
            kv_heads = H if spec.CASES[name] == "bigbird" else spec.CASES[name][2].get("kv_heads", H)
            full = inputs(kv_heads, dtype)
            ref = grads(name, *full)
            sharded = [strategy.experimental_distribute_values_from_function(
                lambda c, x=x: x[:, c.replica_id_in_sync_group * L:(c.replica_id_in_sync_group + 1) * L])
                for x in full]

            @tf.function(autograph=False)
            def step(*args):
                def fn(q, k, v, g):
                    r = tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group)
                    plan = context_parallel_plan(spec.case_tables(name), n)
                    gathered = exchange_kv(k, v, plan, r)
                    return grads(name, q, k, v, g, strategy) + [tf.shape(gathered)]
                return strategy.run(fn, args=args)

            res = step(*sharded)
            got = [tf.concat(strategy.experimental_local_results(r), axis=1).numpy() for r in res[:4]]
            err = [float(np.abs(a - b.numpy()).max() / np.abs(b.numpy()).max()) for a, b in zip(got, ref)]
            out[f"{name}/{n}/{dtype.name}"] = {
                "err": err, "gathered": [r.numpy().tolist() for r in strategy.experimental_local_results(res[4])]}
    errors = {}
    x = tf.ones([1, T // n, H * D])
    other = tf.distribute.OneDeviceStrategy(devices[0])
    for what, call in (
        ("other_strategy", lambda: strategy.run(
            lambda: blocksparse_attention_impl(x, x, x, H, "all", blocksize=spec.BS, context_parallel=other))),
        ("cross_replica", lambda: blocksparse_attention_impl(x, x, x, H, "all", blocksize=spec.BS,
                                                             context_parallel=strategy)),
    ):
        try:
            with strategy.scope():
                call()
            errors[what] = "no error"
        except ValueError as e:
            errors[what] = str(e)
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
    """
)


_RESULTS: dict[int, dict] = {}


def distributed_results(n: int) -> dict:
    """The subprocess's results on ``n`` logical CPUs (run once per ``n``)."""
    if n not in _RESULTS:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(n)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-4000:]
        _RESULTS[n] = json.loads(lines[0][len("RESULT ") :])
    return _RESULTS[n]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_one_device(name, n):
    distributed = distributed_results(n)
    for key, tol in ((f"{name}/{n}/float32", 1e-5), (f"{name}/{n}/float64", 1e-12)):
        if key in distributed:
            assert max(distributed[key]["err"]) <= tol, (key, distributed[key]["err"])
    assert f"{name}/{n}/float32" in distributed


def brute_force_send_sets(tables, n):
    """Per source shard: the shard-local key blocks with a token that a query of another shard attends."""
    mask = tables.token_mask().any(axis=0)  # [T, T]
    shard = tables.n_q // n
    sets = []
    for s in range(n):
        others = np.concatenate([np.arange(r * shard, (r + 1) * shard) for r in range(n) if r != s])
        keys = mask[others][:, s * shard : (s + 1) * shard].any(axis=0)
        sets.append(np.flatnonzero(keys.reshape(-1, BS).any(axis=1)))
    return sets


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_exchanged_bytes_are_what_the_layout_needs(name, n):
    distributed = distributed_results(n)
    tables = case_tables(name)
    plan = context_parallel_plan(tables, n)
    expected = brute_force_send_sets(tables, n)
    for s in range(n):
        np.testing.assert_array_equal(plan.send_blocks[s], expected[s])
    tokens = sum(max(1, e.size * BS) for e in expected)  # an empty send set contributes one placeholder token
    kv_width = H * D if name != "gqa_causal" else D
    for shape in distributed[f"{name}/{n}/float32"]["gathered"]:
        assert shape == [B, tokens, 2 * kv_width]
    counts = plan.exchange_bytes(B, kv_width, 4)
    assert counts["sent"] == tokens * B * 2 * kv_width * 4
    assert counts["received"] == (n - 1) * counts["sent"]
    assert counts["required"] <= counts["received"] <= counts["all_kv"] + n * (n - 1) * B * 2 * kv_width * 4


def test_local_sends_one_window_per_shard():
    """'local' with window L: each shard but the last sends its last L // bs blocks, nothing else."""
    tables = case_tables("local")
    plan = context_parallel_plan(tables, 4)
    window = 32 // BS
    for s in range(3):
        np.testing.assert_array_equal(plan.send_blocks[s], np.arange(T // 4 // BS - window, T // 4 // BS))
    assert plan.send_blocks[3].size == 0
    counts = plan.exchange_bytes(1, 1, 1)
    assert counts["sent"] < counts["all_kv"] / 5


def test_plan_rejects_bad_sizes():
    tables = fused_tables_for_pattern(patterns.Causal(), 48, 48, 16)  # 3 blocks
    with pytest.raises(ValueError, match="multiple of n_shards \\* block_size"):
        context_parallel_plan(tables, 2)
    cross = fused_tables_for_pattern(patterns.Dense(), 32, 64, 16)
    with pytest.raises(ValueError, match="self-attention"):
        context_parallel_plan(cross, 2)
    with pytest.raises(ValueError, match="n_shards"):
        context_parallel_plan(tables, 0)


def test_bad_arguments_are_clear_errors():
    import tensorflow as tf

    from bsattn import blocksparse_attention_impl

    x = tf.ones([1, 64, 16])
    with pytest.raises(TypeError, match="context_parallel must be a tf.distribute.Strategy"):
        blocksparse_attention_impl(x, x, x, 2, "all", blocksize=16, context_parallel="mirrored")
    strategy = tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="engine='fused'"):
        blocksparse_attention_impl(x, x, x, 2, "all", blocksize=16, engine="unfused", context_parallel=strategy)
    with pytest.raises(ValueError, match="multiple of blocksize=32"):
        blocksparse_attention_impl(tf.ones([1, 48, 16]), tf.ones([1, 48, 16]), tf.ones([1, 48, 16]), 2, "all",
                                   blocksize=32, context_parallel=strategy)  # fmt: skip
    # The default strategy is one shard: the ordinary result.
    got = blocksparse_attention_impl(x, x, x, 2, "local", 32, 16, context_parallel=strategy)
    np.testing.assert_allclose(got.numpy(), blocksparse_attention_impl(x, x, x, 2, "local", 32, 16).numpy())


def test_natural_strided_is_the_strided_mask_untransposed():
    n, ctx = 256, 8
    perm = patterns.strided_permutation(n, ctx)
    transposed = patterns.Strided(ctx).token_mask(n)[0]
    natural = NaturalStrided(ctx).token_mask(n)[0]
    np.testing.assert_array_equal(natural[np.ix_(perm, perm)], transposed)
    active, full = NaturalStrided(ctx).block_classes(n, n, BS)
    blocks = natural.reshape(n // BS, BS, n // BS, BS)
    np.testing.assert_array_equal(active[0], blocks.any(axis=(1, 3)))
    np.testing.assert_array_equal(full[0], blocks.all(axis=(1, 3)))


@pytest.mark.parametrize("n", [2])
def test_wrong_strategy_and_cross_replica_context_are_clear_errors(n):
    errors = distributed_results(n)["errors"]
    assert "pass the strategy whose strategy.run calls this" in errors["other_strategy"]
    assert "call it inside strategy.run" in errors["cross_replica"]
