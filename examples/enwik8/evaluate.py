"""Bits per byte on a split, and sampling a continuation.

As a script, it restores the latest checkpoint of a run and reports valid/test bits per byte and a
sample (the settings are read from ``--model_dir/config.json``; without ``--model_dir``: the run trained
last under ``$BSATTN_ENWIK8_RUNS``, default ``/tmp/bsattn_enwik8``)::

    python -m examples.enwik8.evaluate --sample_prompt="def main(" --sample_bytes=500 --sample_top_k=40
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from examples.enwik8 import data as data_lib
from examples.enwik8.model import SparseTransformer, token_losses

LN2 = math.log(2.0)


def make_eval_fn(model: SparseTransformer) -> Callable:
    """``f(x, y)`` -> the summed cross-entropy in nats (float64 scalar) of int32 ``[b, T]`` windows, no dropout."""

    @tf.function(autograph=False, reduce_retracing=True)
    def eval_fn(x, y):
        return tf.reduce_sum(tf.cast(token_losses(model(x), y), tf.float64))

    return eval_fn


def bits_per_byte(
    model: SparseTransformer,
    split: np.ndarray,
    n_batch: int,
    max_bytes: int = 0,
    eval_fn: Callable | None = None,
) -> tuple[float, int]:
    """``(bits per byte, bytes predicted)`` over the sequential, non-overlapping windows of ``split``.

    bits per byte = mean cross-entropy in nats / ln 2. ``max_bytes > 0`` evaluates only a prefix.
    """
    eval_fn = eval_fn or make_eval_fn(model)
    total, count = 0.0, 0
    for x, y in data_lib.eval_dataset(split, model.cfg.n_timesteps, n_batch, max_bytes):
        total += float(eval_fn(x, y))
        count += int(np.prod(y.shape))
    return total / count / LN2, count


def pick(logits: tf.Tensor, temperature: float, top_k: int, seed: tf.Tensor) -> tf.Tensor:
    """The next byte from ``logits [B, 256]`` → int32 ``[B]``: argmax when ``temperature <= 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest (0 = all), seeded by ``seed [2]``."""
    if temperature <= 0:
        return tf.argmax(logits, axis=-1, output_type=tf.int32)
    if top_k:
        kth = tf.math.top_k(logits, top_k).values[:, -1:]
        logits = tf.where(logits < kth, tf.constant(-float("inf"), logits.dtype), logits)
    return tf.random.stateless_categorical(logits / temperature, 1, seed, dtype=tf.int32)[:, 0]


def make_sampler(model: SparseTransformer, temperature: float, top_k: int = 0) -> Callable:
    """``f(window [1, T] int32, position, seed [2] int64)`` -> the next byte after ``window[0, position]``."""

    @tf.function(autograph=False)
    def next_byte(window, position, seed):
        return pick(model(window)[:, position], temperature, top_k, seed)[0]

    return next_byte


def window_start(n: int, n_timesteps: int, shift: int) -> int:
    """The first byte of the window that predicts byte ``n`` (the window holds bytes ``[start, n)``): 0 while
    ``n <= T``, then it moves by multiples of ``shift`` bytes (1: the sliding window of the last ``T`` bytes)."""
    return 0 if n <= n_timesteps else -(-(n - n_timesteps) // shift) * shift


def sample(
    model: SparseTransformer,
    prompt: bytes,
    n_bytes: int,
    temperature: float = 0.8,
    seed: int = 0,
    top_k: int = 0,
    cache: bool | None = None,
    window_shift: int = 1,
) -> bytes:
    """``n_bytes`` sampled after ``prompt`` (temperature 0: greedy; ``top_k > 0``: from the ``top_k`` likeliest).

    The model sees a window of at most ``T`` bytes (``window_start``): a shorter context sits at the start of the
    window, the rest zeros (causal attention never reads them); past ``T`` bytes the window moves by
    ``window_shift`` bytes. With ``cache`` (None: when the model has one, i.e. not ``--block=colt5``) each window
    is run once (the prefill: the normal fused op) and every further byte is one decoding step at its position
    (``examples.enwik8.decode``); without, every byte re-runs its window. Both give the same bytes (up to float
    rounding of near ties); the cache saves the work only while the window does not move, so a long sample wants a
    large ``window_shift`` (e.g. ``T // 2``).
    """
    from examples.enwik8.decode import KVCache, decode, supports_cache

    n_timesteps = model.cfg.n_timesteps
    if isinstance(window_shift, bool) or not isinstance(window_shift, int) or not 1 <= window_shift <= n_timesteps:
        raise ValueError(f"window_shift must be an integer in [1, n_timesteps={n_timesteps}], got {window_shift!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= 256:
        raise ValueError(f"top_k must be an integer in [0, 256], got {top_k!r}")
    cache = supports_cache(model) if cache is None else cache
    context = list(prompt) or [ord("\n")]
    if not cache:
        next_byte = make_sampler(model, temperature, top_k)
    else:
        kv = KVCache(model, 1)

        @tf.function(autograph=False)
        def prefill(window, position, seed):
            return pick(tf.gather(decode(model, window, 0, kv), position, axis=1), temperature, top_k, seed)[0]

        @tf.function(autograph=False)
        def step(token, position, seed):
            return pick(decode(model, token, position, kv)[:, 0], temperature, top_k, seed)[0]

        window_of = None
    for i in range(n_bytes):
        n = len(context)
        start = window_start(n, n_timesteps, window_shift)
        seed_i = tf.constant([seed, i], tf.int64)
        window = context[start:]
        position = tf.constant(len(window) - 1, tf.int32)
        padded = np.array([window + [0] * (n_timesteps - len(window))], dtype=np.int32)
        if not cache:
            context.append(int(next_byte(padded, position, seed_i)))
        elif start != window_of:  # a new window: run it whole
            context.append(int(prefill(padded, position, seed_i)))
            window_of = start
        else:
            context.append(int(step(np.array([[context[-1]]], np.int32), position, seed_i)))
    return bytes(context[len(prompt or b"\n") :])


def sample_with_settings(model: SparseTransformer, prompt: bytes, cfg) -> bytes:
    """``sample`` with the ``--sample_*`` settings of ``cfg`` (a ``Config``)."""
    cache = None if cfg.sample_cache else False  # None: the cache where the model has one (not colt5)
    return sample(model, prompt, cfg.sample_bytes, cfg.sample_temperature, cfg.seed, top_k=cfg.sample_top_k,
                  cache=cache, window_shift=cfg.sample_window_shift)  # fmt: skip


def printable(text: bytes) -> str:
    return text.decode("utf-8", errors="replace")


def main(argv: list[str]) -> None:
    from absl import flags

    from examples.enwik8 import config as config_lib
    from examples.enwik8.train import restore_model

    del argv
    fl = flags.FLAGS
    model_dir = fl.model_dir or config_lib.latest_run_dir()
    if model_dir is None:
        raise SystemExit(f"no run under {config_lib.runs_dir()} (train one first, or pass --model_dir)")
    saved = config_lib.load_saved(model_dir)
    if saved is None:
        raise SystemExit(f"--model_dir={model_dir}: no config.json (was a run trained there?)")
    overrides = {"model_dir": str(model_dir), "eval_batch": fl.eval_batch, "sample_bytes": fl.sample_bytes}
    overrides.update(sample_prompt=fl.sample_prompt, sample_temperature=fl.sample_temperature,
                     sample_top_k=fl.sample_top_k, sample_cache=fl.sample_cache,
                     sample_window_shift=fl.sample_window_shift)  # fmt: skip
    if fl["data_path"].present:
        overrides["data_path"] = fl.data_path
    cfg = config_lib.Config(**{**saved, **overrides})
    model, step = restore_model(cfg)
    corpus = data_lib.load_bytes(cfg.data_path)
    splits = data_lib.split(corpus)
    print(f"{model_dir}: checkpoint at step {step}; {data_lib.describe(corpus, cfg.data_path)}")
    eval_fn = make_eval_fn(model)
    for name in ("valid", "test"):
        start = time.perf_counter()
        bpb, count = bits_per_byte(model, getattr(splits, name), cfg.eval_batch, eval_fn=eval_fn)
        print(f"{name}: {bpb:.4f} bits per byte over {count:,} bytes ({time.perf_counter() - start:.0f} s)")
    if cfg.sample_bytes:
        prompt = cfg.sample_prompt.encode() or bytes(splits.test[:120])
        text = sample_with_settings(model, prompt, cfg)
        print(f"--- prompt ---\n{printable(prompt)}\n--- sample ---\n{printable(text)}\n---")
    sys.stdout.flush()


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model_dir", "", "the run to evaluate (its config.json and checkpoints); empty: the latest")
    flags.DEFINE_string("data_path", "", "override the run's data (enwik8 or enwik8.zip; empty: the run's)")
    flags.DEFINE_integer("eval_batch", 16, "evaluation batch size")
    flags.DEFINE_integer("sample_bytes", 200, "bytes to sample (0 = none)")
    flags.DEFINE_string("sample_prompt", "", "prompt; empty: the first 120 bytes of the test split")
    flags.DEFINE_float("sample_temperature", 0.8, "sampling temperature (0 = greedy)")
    flags.DEFINE_integer("sample_top_k", 0, "sample from the k likeliest bytes only (0 = all 256)")
    flags.DEFINE_bool("sample_cache", True, "sample with a key/value cache (off: re-run the window per byte)")
    flags.DEFINE_integer("sample_window_shift", 1, "bytes the window moves once the context exceeds n_timesteps")
    from examples.enwik8 import config as config_lib

    app.run(main, flags_parser=config_lib.parse_flags)
