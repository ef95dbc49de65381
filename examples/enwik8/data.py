"""Corpora, the 90/5/5 split and the ``tf.data`` pipelines. Bytes are the tokens (vocabulary 256).

- ``load_bytes(path)``: enwik8 as the raw 100,000,000-byte file or as ``enwik8.zip`` (the archive of
  http://mattmahoney.net/dc/enwik8.zip); with no path, ``builtin_corpus()``.
- ``split(data)``: the first 90% for training, the next 5% for validation, the last 5% for test;
  for enwik8 exactly 90M / 5M / 5M bytes, as in the paper and blocksparse's example.
- ``train_dataset``: random windows whose order is a function of ``(seed, step)`` only, so a run
  restarted from a checkpoint at step ``s`` sees exactly the batches it would have seen.
- ``eval_dataset``: the sequential, non-overlapping windows of a split.

The built-in corpus is real text that every CPython installation carries: ``pydoc_data/topics.py``
(the prose of the language reference's topics) followed by the sources, docstrings included, of the
standard library's top-level modules and of a fixed list of packages, in sorted order, each preceded by
a one-line header, cut at ``BUILTIN_BYTES``. The bytes depend only on those files: they are the same on
every machine with the same CPython release (patch releases, and the few distribution patches to the
standard library, can change some files; the run prints the corpus's SHA-256 so runs can be compared).
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf

ENWIK8_BYTES = 100_000_000
BUILTIN_BYTES = 5_000_000
MIN_BYTES = 1000
SPLIT_PERCENT = (90, 5, 5)

# Standard-library packages shipped by every CPython build (Debian/Ubuntu split out test, idlelib, tkinter,
# lib2to3, distutils, ensurepip, turtledemo, so those are left out; a package a version lacks is skipped).
_BUILTIN_PACKAGES = (
    "asyncio",
    "collections",
    "concurrent",
    "email",
    "encodings",
    "html",
    "http",
    "importlib",
    "json",
    "logging",
    "multiprocessing",
    "re",
    "sqlite3",
    "tomllib",
    "unittest",
    "urllib",
    "wsgiref",
    "xml",
    "xmlrpc",
    "zoneinfo",
)


class Splits(NamedTuple):
    """uint8 arrays ``[n]`` of the three parts (views of one buffer)."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


# ---- corpora -----------------------------------------------------------------------------------------------


def _stdlib_dir() -> Path:
    return Path(os.__file__).resolve().parent


def builtin_files() -> list[Path]:
    """The files of the built-in corpus, in corpus order."""
    stdlib = _stdlib_dir()
    files = [stdlib / "pydoc_data" / "topics.py"]
    # _sysconfigdata_* describes the build machine, so it differs between installations.
    files += sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_sysconfigdata"))
    for package in _BUILTIN_PACKAGES:
        sources = (stdlib / package).rglob("*.py")
        files += sorted((p for p in sources if not {"test", "tests"} & set(p.parts)), key=lambda p: p.as_posix())
    return [p for p in files if p.is_file()]


def builtin_corpus(max_bytes: int = BUILTIN_BYTES) -> bytes:
    """The built-in corpus (see the module docstring): at most ``max_bytes`` bytes, no download."""
    stdlib = _stdlib_dir()
    parts, size = [], 0
    for path in builtin_files():
        part = f"\n# ---- {path.relative_to(stdlib).as_posix()} ----\n".encode() + path.read_bytes()
        parts.append(part)
        size += len(part)
        if size >= max_bytes:
            break
    corpus = b"".join(parts)[:max_bytes]
    if len(corpus) < MIN_BYTES:
        raise RuntimeError(f"the standard library at {stdlib} gave only {len(corpus)} bytes of text")
    return corpus


def describe_builtin() -> str:
    return f"built-in corpus (CPython {sys.version.split()[0]} standard library text)"


def _read_zip(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if "enwik8" in names:
                member = "enwik8"
            elif len(names) == 1:
                member = names[0]
            else:
                raise ValueError(f"{path}: expected a zip archive holding 'enwik8' (or one file), found {names[:5]}")
            return archive.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise ValueError(f"{path}: corrupt or unreadable zip archive ({err}); download enwik8.zip again") from err


def load_bytes(path: str | os.PathLike | None = None) -> np.ndarray:
    """The corpus as uint8 ``[n]``: enwik8 (raw or zipped; a directory holding either also works) or, for an
    empty ``path``, the built-in corpus. Raises ``FileNotFoundError``/``ValueError`` with the reason."""
    if not path:
        return np.frombuffer(builtin_corpus(), dtype=np.uint8)
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in ("enwik8", "enwik8.zip") if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"--data_path={str(path)!r} is a directory without 'enwik8' or 'enwik8.zip'")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"--data_path={str(path)!r}: no such file. Give enwik8 (100,000,000 bytes) or enwik8.zip "
            "(http://mattmahoney.net/dc/enwik8.zip), or leave --data_path empty for the built-in corpus."
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix.lower() == ".zip" or magic == b"PK\x03\x04":
        data = np.frombuffer(_read_zip(path), dtype=np.uint8)
    else:
        data = np.fromfile(path, dtype=np.uint8)
    if data.size < MIN_BYTES:
        raise ValueError(f"--data_path={str(path)!r}: {data.size} bytes is too small to split 90/5/5")
    return data


def describe(data: np.ndarray, path: str | None) -> str:
    """One line naming the corpus, its size and its SHA-256 prefix."""
    digest = hashlib.sha256(data.tobytes()).hexdigest()[:16]
    if not path:
        name = describe_builtin()
    elif data.size == ENWIK8_BYTES:
        name = f"enwik8 ({path})"
    else:
        name = f"{path} (not the {ENWIK8_BYTES:,}-byte enwik8: split 90/5/5 by size)"
    return f"{name}: {data.size:,} bytes, sha256 {digest}"


def split_sizes(n: int) -> tuple[int, int, int]:
    """``(train, valid, test)`` sizes: 90% / 5% / the rest (90M / 5M / 5M for enwik8)."""
    n_train = n * SPLIT_PERCENT[0] // 100
    n_valid = n * SPLIT_PERCENT[1] // 100
    return n_train, n_valid, n - n_train - n_valid


def split(data: np.ndarray) -> Splits:
    """The train / valid / test parts of ``data`` (contiguous, in that order)."""
    n_train, n_valid, _ = split_sizes(data.size)
    return Splits(data[:n_train], data[n_train : n_train + n_valid], data[n_train + n_valid :])


def load_splits(path: str | None = None) -> Splits:
    return split(load_bytes(path))


# ---- tf.data pipelines ---------------------------------------------------------------------------------------


def window_offsets(n_bytes: int, n_timesteps: int, n_batch: int, seed: int, step) -> tf.Tensor:
    """Start offsets int64 ``[n_batch]`` of the training windows of ``step``: uniform over every start whose
    window of ``n_timesteps + 1`` bytes fits, a pure function of ``(seed, step)``."""
    n_starts = n_bytes - n_timesteps
    if n_starts < 1:
        raise ValueError(f"a split of {n_bytes} bytes is shorter than a window of n_timesteps + 1 = {n_timesteps + 1}")
    stream = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.stateless_uniform([n_batch], seed=stream, minval=0, maxval=n_starts, dtype=tf.int64)


def train_dataset(
    data: np.ndarray,
    n_timesteps: int,
    n_batch: int,
    seed: int,
    start_step: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    context_parallel: int = 1,
) -> tf.data.Dataset:
    """Random training windows, one global batch of ``n_batch`` per step, from ``start_step`` on.

    Elements are dicts: ``x`` int32 ``[b, T]`` (the bytes), ``y`` int32 ``[b, T]`` (the next bytes) and ``step``
    int64 ``[b]``. Without ``input_context``, ``b = n_batch``. With one (``distribute_datasets_from_function``),
    this worker keeps its contiguous share of each global batch and emits it as per-replica batches, so the
    replicas of all workers together see exactly the global batch of the single-device run.

    ``context_parallel = N > 1`` (with an ``input_context`` of ``N`` replicas): every replica gets the whole
    global batch, cut to its shard of the sequence: ``x``, ``y`` ``[n_batch, T/N]`` (tokens ``[r T/N, (r+1) T/N)``
    for replica ``r``); this worker emits the shards of its local replicas, in replica order.
    """
    buffer = tf.constant(data)
    if context_parallel > 1:
        return _context_parallel_dataset(buffer, data.size, n_timesteps, n_batch, seed, start_step, input_context,
                                         context_parallel)  # fmt: skip
    if input_context is None:
        first, count, per_replica = 0, n_batch, n_batch
    else:
        per_replica = input_context.get_per_replica_batch_size(n_batch)
        count = n_batch // input_context.num_input_pipelines
        if count * input_context.num_input_pipelines != n_batch:
            raise ValueError(
                f"--n_batch={n_batch} must be a multiple of the {input_context.num_input_pipelines} workers"
            )
        first = count * input_context.input_pipeline_id
    span = tf.range(n_timesteps + 1, dtype=tf.int64)

    def windows(step):
        offsets = window_offsets(data.size, n_timesteps, n_batch, seed, step)[first : first + count]
        w = tf.cast(tf.gather(buffer, offsets[:, None] + span), tf.int32)  # [count, T + 1]
        return {"x": w[:, :-1], "y": w[:, 1:], "step": tf.fill([count], tf.cast(step, tf.int64))}

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).map(windows)
    if per_replica != count:
        ds = ds.rebatch(per_replica, drop_remainder=True)
    return ds.prefetch(2)


def _context_parallel_dataset(
    buffer: tf.Tensor, size: int, n_timesteps: int, n_batch: int, seed: int, start_step: int,
    input_context: tf.distribute.InputContext | None, n_shards: int,
) -> tf.data.Dataset:  # fmt: skip
    if input_context is None or input_context.num_replicas_in_sync != n_shards:
        replicas = 1 if input_context is None else input_context.num_replicas_in_sync
        raise ValueError(f"--context_parallel={n_shards} needs {n_shards} replicas in sync, got {replicas}")
    local = n_shards // input_context.num_input_pipelines  # replicas of this worker
    first = local * input_context.input_pipeline_id
    span = tf.range(n_timesteps + 1, dtype=tf.int64)
    length = n_timesteps // n_shards

    def shards(step):
        offsets = window_offsets(size, n_timesteps, n_batch, seed, step)
        w = tf.cast(tf.gather(buffer, offsets[:, None] + span), tf.int32)  # [n_batch, T + 1]
        def cut(t):  # [n_batch, T] -> [local, n_batch, T/N]: this worker's replicas' shards
            return tf.stack([t[:, (first + j) * length : (first + j + 1) * length] for j in range(local)])

        step_ids = tf.fill([local, n_batch], tf.cast(step, tf.int64))
        return {"x": cut(w[:, :-1]), "y": cut(w[:, 1:]), "step": step_ids}  # [local, n_batch, T/N]

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).map(shards).unbatch()
    return ds.prefetch(2)


def eval_windows(data: np.ndarray, n_timesteps: int, max_bytes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The sequential, non-overlapping windows of a split: ``x, y`` int32 ``[n, T]``, ``y`` shifted by one.

    ``n = (len - 1) // T``: every byte but the first is predicted once, except the last ``(len - 1) % T``.
    ``max_bytes > 0`` keeps the first ``max(1, max_bytes // T)`` windows.
    """
    n = (data.size - 1) // n_timesteps
    if n < 1:
        raise ValueError(
            f"a split of {data.size} bytes is shorter than a window of n_timesteps + 1 = {n_timesteps + 1}"
        )
    if max_bytes:
        n = min(n, max(1, max_bytes // n_timesteps))
    x = data[: n * n_timesteps].reshape(n, n_timesteps).astype(np.int32)
    y = data[1 : n * n_timesteps + 1].reshape(n, n_timesteps).astype(np.int32)
    return x, y


def eval_dataset(data: np.ndarray, n_timesteps: int, n_batch: int, max_bytes: int = 0) -> tf.data.Dataset:
    """``eval_windows`` in batches of ``n_batch`` (the last one may be smaller): ``(x, y)`` int32 ``[b, T]``."""
    return tf.data.Dataset.from_tensor_slices(eval_windows(data, n_timesteps, max_bytes)).batch(n_batch)
