"""DeepSpeed's sparsity configs (``deepspeed.ops.sparse_attention``), each one also a bsattn ``Pattern``.

The classes keep DeepSpeed's names, constructor parameters, defaults, validation errors and
``make_layout(seq_len) -> int64 [num_heads, nb, nb]`` (``nb = seq_len // block``; ``layout[h, i, j] = 1``: query
block-row ``i`` of head ``h`` attends key block-column ``j``). Being patterns, they also give the exact token mask
(``token_mask``), block classes and index tables of every op in this package, at the *actual* sequence length.

Differences from DeepSpeed (all deliberate, listed in the README):

- ``attention='unidirectional'`` is causal per token: inside a diagonal block query ``i`` attends keys ``j <= i``
  only (DeepSpeed computes the whole diagonal block), and every unidirectional ``make_layout`` is lower
  triangular at block level (DeepSpeed's Fixed with ``num_global_blocks > 1`` and Variable with global ranges
  set blocks above the diagonal).
- Random blocks come from a seeded generator (``seed``, default 0, per layout head), so every process builds the
  same layout without broadcasting it; in unidirectional mode they are drawn from the causal blocks only (Variable
  ignored the direction), and BigBird with ``num_random_blocks > 1`` works in unidirectional mode (DeepSpeed
  crashed): a row with fewer causal blocks than ``num_random_blocks`` takes them all.
- ``attention`` is validated by every config (BSLongformer and LocalSlidingWindow accepted any string); argument
  types and ranges are checked, naming the argument.
- Configs compare and hash by class and parameters, so any cache keyed by a config (layouts, tables) can never
  hand one config's pattern to another.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import numbers
import os

import numpy as np

from bsattn.patterns import Pattern

ATTENTION_TYPES = ("unidirectional", "bidirectional")


# ---- argument checks ---------------------------------------------------------------------------------------


def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _int_list(name: str, value, minimum: int, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
    items = tuple(_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return items


def _attention(value, allowed=ATTENTION_TYPES) -> str:
    if value not in allowed:
        raise NotImplementedError('only "uni/bi-directional" attentions are supported for now!')
    return value


def _global_ranges(starts, ends) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    starts = _int_list("global_block_indices", starts, minimum=0, allow_empty=True)
    if ends is None:
        return starts, None
    ends = _int_list("global_block_end_indices", ends, minimum=0, allow_empty=True)
    if len(starts) != len(ends):
        raise ValueError(
            f"Global block start indices length, {len(starts)}, must be same as global block end indices length, "
            f"{len(ends)}!"
        )
    for start, end in zip(starts, ends, strict=True):
        if start >= end:
            raise ValueError(f"Global block start index, {start}, must be smaller than global block end index, {end}!")
    return starts, ends


def _not_more_than_blocks(what: str, count: int, nb: int) -> None:
    # DeepSpeed's layout-time checks (strict '<': count == nb is allowed).
    if nb < count:
        raise ValueError(f"Number of {what}, {count}, must be smaller than overall number of blocks in a row, {nb}!")


def _freeze(value):
    """A hashable stand-in for a config attribute (lists → tuples, arrays → bytes)."""
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@functools.lru_cache(maxsize=64)
def _cached_layout(config: SparsityConfig, seq_len: int) -> np.ndarray:
    """``config.make_layout(seq_len)`` as a read-only bool array ``[num_heads, nb, nb]`` (cached by value)."""
    nb = seq_len // config.block
    layout = np.asarray(config.make_layout(seq_len))
    if layout.shape != (config.num_heads, nb, nb):
        raise ValueError(
            f"{type(config).__name__}.make_layout({seq_len}) returned shape {layout.shape}; "
            f"expected [num_heads, nb, nb] = {(config.num_heads, nb, nb)}"
        )
    layout = layout != 0
    layout.flags.writeable = False
    return layout


# ---- the base class ----------------------------------------------------------------------------------------


class SparsityConfig(Pattern):
    """DeepSpeed's abstract base: ``SparsityConfig(num_heads, block=16, different_layout_per_head=False)``.

    Subclass it and implement ``make_layout(seq_len) -> [num_heads, nb, nb]`` (nonzero = active block) to add a
    pattern; set ``self.attention = 'unidirectional'`` to make it causal per token. The subclass is then a bsattn
    pattern too: ``token_mask``, ``block_layout`` and the tables of every op follow from ``make_layout``.
    As a pattern it also serves cross-attention (``n_q != n_k``): queries and keys share one position axis and the
    pattern is the top-left ``[n_q, n_k]`` corner of the square one of ``max(n_q, n_k)`` tokens (block rows
    ``< n_q / block`` of ``make_layout(max(n_q, n_k))``, columns ``< n_k / block``; unidirectional: ``k <= q``).
    Any op block size works (the layout's own ``block`` gives the analytic block classes, another size is derived
    token by token).
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False):
        self.num_heads = _int("num_heads", num_heads)
        self.block = _int("block", block)
        self.different_layout_per_head = _flag("different_layout_per_head", different_layout_per_head)
        self.num_layout_heads = self.num_heads if self.different_layout_per_head else 1

    # ---- DeepSpeed's API -----------------------------------------------------------------------------------

    def setup_layout(self, seq_len: int) -> np.ndarray:
        """All-zero int64 layout ``[num_heads, nb, nb]``; ValueError unless ``seq_len % block == 0``."""
        seq_len = _int("seq_len", seq_len)
        if seq_len % self.block != 0:
            raise ValueError(f"Sequence Length, {seq_len}, needs to be dividable by Block size {self.block}!")
        nb = seq_len // self.block
        return np.zeros((self.num_heads, nb, nb), dtype=np.int64)

    def check_and_propagate_first_head_layout(self, layout: np.ndarray) -> np.ndarray:
        """Copy head 0 to every head unless ``different_layout_per_head``."""
        if not self.different_layout_per_head:
            layout[1:] = layout[0]
        return layout

    def make_layout(self, seq_len: int) -> np.ndarray:
        """int64 ``[num_heads, seq_len // block, seq_len // block]``, 1 = active block."""
        raise NotImplementedError(
            f"{type(self).__name__} has no make_layout; SparsityConfig is abstract: use one of the concrete configs "
            "or subclass it and implement make_layout(seq_len) -> [num_heads, nb, nb]"
        )

    def get_config(self) -> dict:
        """The constructor arguments (read back from the attributes of the same names)."""
        out = {}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if not hasattr(self, name):
                raise NotImplementedError(
                    f"{type(self).__name__}.get_config: constructor argument {name!r} is not stored as an attribute "
                    "of the same name; override get_config"
                )
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_config(cls, config: dict) -> SparsityConfig:
        return cls(**config)

    # ---- value semantics -----------------------------------------------------------------------------------

    def _key(self) -> tuple:
        return (type(self), _freeze(vars(self)))

    def __eq__(self, other):
        return isinstance(other, SparsityConfig) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "num_layout_heads")
        return f"{type(self).__name__}({args})"

    # ---- the Pattern view ----------------------------------------------------------------------------------

    @property
    def unidirectional(self) -> bool:
        return getattr(self, "attention", "bidirectional") == "unidirectional"

    @property
    def num_layouts(self) -> int:
        return self.num_layout_heads

    def layout(self, seq_len: int) -> np.ndarray:
        """``make_layout(seq_len)`` as read-only bool ``[num_heads, nb, nb]``, cached by the config's value."""
        self.setup_layout(seq_len)  # the argument checks
        return _cached_layout(self, int(seq_len))

    def validate(self, n_q, n_k, block_size=None):
        super().validate(n_q, n_k, block_size)
        for name, n in (("n_q", n_q), ("n_k", n_k)):
            if n % self.block:
                raise ValueError(f"Sequence Length, {n} ({name}), needs to be dividable by Block size {self.block}!")

    def _corner(self, n_q: int, n_k: int) -> np.ndarray:
        """The layout's top-left ``[num_heads, n_q / block, n_k / block]`` corner at ``max(n_q, n_k)`` tokens."""
        return self.layout(max(n_q, n_k))[:, : n_q // self.block, : n_k // self.block]

    def allowed(self, head, q, k, n_q, n_k):
        layout = self._corner(n_q, n_k)[self.layout_index(head)]
        keep = layout[q // self.block, k // self.block]
        return keep & (k <= q) if self.unidirectional else keep

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        if block_size != self.block:
            return None  # derived token by token (Pattern._scan_block_rows)
        active = self._corner(n_q, n_k)[head]
        # Unidirectional: diagonal blocks keep their lower triangle only; the layout is lower triangular.
        full = active & (kb < qb) if self.unidirectional else active
        return active, full

    # ---- helpers of the concrete configs -------------------------------------------------------------------

    def _finish(self, layout: np.ndarray) -> np.ndarray:
        """Propagate head 0 if needed; unidirectional layouts are lower triangular at block level."""
        layout = self.check_and_propagate_first_head_layout(layout)
        if self.unidirectional:
            layout = np.tril(layout)
        return layout

    def _rng(self, h: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, h])

    def _random_columns(self, h: int, layout: np.ndarray, num_random_blocks: int) -> np.ndarray:
        """``num_random_blocks`` distinct random columns per row of head ``h`` (causal ones if unidirectional)."""
        nb = layout.shape[1]
        rng = self._rng(h)
        for row in range(nb):
            population = row + 1 if self.unidirectional else nb
            cols = rng.choice(population, size=min(num_random_blocks, population), replace=False)
            layout[h, row, cols] = 1
        return layout

    def _sliding_window(self, h: int, layout: np.ndarray, num_sliding_window_blocks: int) -> np.ndarray:
        nb = layout.shape[1]
        _not_more_than_blocks("sliding window blocks", num_sliding_window_blocks, nb)
        w = num_sliding_window_blocks // 2
        for row in range(nb):
            layout[h, row, max(0, row - w) : min(row + w + 1, nb)] = 1
        return layout

    def _global_index_ranges(self, nb: int) -> list[tuple[int, int]]:
        """``[start, end)`` of every global block range below ``nb`` (indices >= nb are skipped, as in DeepSpeed)."""
        ends = self.global_block_end_indices
        if ends is None:
            return [(i, i + 1) for i in self.global_block_indices if i < nb]
        return [(s, min(e, nb)) for s, e in zip(self.global_block_indices, ends, strict=True) if s < nb]


# ---- the concrete configs ----------------------------------------------------------------------------------


class DenseSparsityConfig(SparsityConfig):
    """Every block active ("for comparison"); ``different_layout_per_head`` is accepted and has no effect."""

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_layout_heads = 1  # every head has the same layout anyway

    def make_layout(self, seq_len: int) -> np.ndarray:
        layout = self.setup_layout(seq_len)
        layout[:] = 1
        return layout


class FixedSparsityConfig(SparsityConfig):
    """OpenAI Sparse Transformer's "fixed" pattern as DeepSpeed customised it.

    Rows are tiled into windows of ``num_local_blocks`` blocks that attend within themselves (a triangle if
    unidirectional); in every window the blocks ``[L - (1 + h % num_different_global_patterns) * G, ... + G)``
    are global columns attended by every (later, if unidirectional) row, and with ``horizontal_global_attention``
    (bidirectional only) global rows that attend everything. A short last window gets global columns
    ``[min(end + first, nb - G), ... + G)``.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_local_blocks: int = 4,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
        num_different_global_patterns: int = 1,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_local_blocks = _int("num_local_blocks", num_local_blocks)
        self.num_global_blocks = _int("num_global_blocks", num_global_blocks)
        if self.num_local_blocks % self.num_global_blocks != 0:
            raise ValueError(
                f"Number of blocks in a local window, {num_local_blocks}, must be dividable by number of global "
                f"blocks, {num_global_blocks}!"
            )
        self.attention = _attention(attention)
        self.horizontal_global_attention = _flag("horizontal_global_attention", horizontal_global_attention)
        if attention != "bidirectional" and self.horizontal_global_attention:
            raise ValueError('only "bi-directional" attentions can support horizontal global attention!')
        self.num_different_global_patterns = _int("num_different_global_patterns", num_different_global_patterns)
        if self.num_different_global_patterns > 1 and not self.different_layout_per_head:
            raise ValueError(
                "Number of different layouts cannot be more than one when you have set a single layout for all "
                "heads! Set different_layout_per_head to True."
            )
        max_patterns = self.num_local_blocks // self.num_global_blocks
        if self.num_different_global_patterns > max_patterns:
            raise ValueError(
                f"Number of layout versions (num_different_global_patterns), {num_different_global_patterns}, "
                f"cannot be larger than number of local window blocks divided by number of global blocks, "
                f"{num_local_blocks} / {num_global_blocks} = {max_patterns}!"
            )

    def set_local_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        nb = layout.shape[1]
        for start in range(0, nb, self.num_local_blocks):
            end = min(start + self.num_local_blocks, nb)
            for row in range(start, end):
                layout[h, row, start : (row + 1 if self.unidirectional else end)] = 1
        return layout

    def set_global_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        nb = layout.shape[1]
        g = self.num_global_blocks
        first = self.num_local_blocks - (1 + h % self.num_different_global_patterns) * g
        end = nb - nb % self.num_local_blocks
        starts = [i + first for i in range(0, end, self.num_local_blocks)]
        if end < nb:  # the short last window
            starts.append(min(end + first, nb - g))
        for start in starts:
            # Unidirectional: _finish() keeps each column from its own row down (DeepSpeed: from the range's start).
            layout[h, (start if self.unidirectional else 0) :, start : start + g] = 1
            if self.horizontal_global_attention:
                layout[h, start : start + g, :] = 1
        return layout

    def make_layout(self, seq_len: int) -> np.ndarray:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_local_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self._finish(layout)


class VariableSparsityConfig(SparsityConfig):
    """Local windows of listed sizes, global blocks (indices or ``[start, end)`` ranges) and random blocks.

    Windows ``local_window_blocks`` are laid end to end from block 0, the last size repeating; global columns
    are attended by every (later, if unidirectional) row, global rows attend everything with
    ``horizontal_global_attention`` (bidirectional only); ``num_random_blocks`` random columns per row
    (``seed``: see the module docstring).
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 0,
        local_window_blocks=(4,),
        global_block_indices=(0,),
        global_block_end_indices=None,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
        *,
        seed: int = 0,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = _int("num_random_blocks", num_random_blocks, minimum=0)
        self.local_window_blocks = _int_list("local_window_blocks", local_window_blocks, minimum=1)
        self.global_block_indices, self.global_block_end_indices = _global_ranges(
            global_block_indices, global_block_end_indices
        )
        self.attention = _attention(attention)
        self.horizontal_global_attention = _flag("horizontal_global_attention", horizontal_global_attention)
        if attention != "bidirectional" and self.horizontal_global_attention:
            raise ValueError('only "bi-directional" attentions can support horizontal global attention!')
        self.seed = _int("seed", seed, minimum=0)

    def set_random_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        _not_more_than_blocks("random blocks", self.num_random_blocks, layout.shape[1])
        return self._random_columns(h, layout, self.num_random_blocks) if self.num_random_blocks else layout

    def set_local_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        nb = layout.shape[1]
        start, i = 0, 0
        while start < nb:
            size = self.local_window_blocks[min(i, len(self.local_window_blocks) - 1)]
            end = min(start + size, nb)
            for row in range(start, end):
                layout[h, row, start : (row + 1 if self.unidirectional else end)] = 1
            start, i = end, i + 1
        return layout

    def set_global_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        for start, end in self._global_index_ranges(layout.shape[1]):
            if self.horizontal_global_attention:
                layout[h, start:end, :] = 1
            layout[h, (start if self.unidirectional else 0) :, start:end] = 1
        return layout

    def make_layout(self, seq_len: int) -> np.ndarray:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_random_layout(h, layout)
            layout = self.set_local_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self._finish(layout)


class BigBirdSparsityConfig(SparsityConfig):
    """BigBird (block ITC): random blocks, a symmetric sliding window of ``num_sliding_window_blocks // 2`` blocks
    each side, and ``num_global_blocks`` global rows and columns at the start."""

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 1,
        num_sliding_window_blocks: int = 3,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
        *,
        seed: int = 0,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = _int("num_random_blocks", num_random_blocks, minimum=0)
        self.num_sliding_window_blocks = _int("num_sliding_window_blocks", num_sliding_window_blocks)
        self.num_global_blocks = _int("num_global_blocks", num_global_blocks, minimum=0)
        self.attention = _attention(attention)
        self.seed = _int("seed", seed, minimum=0)

    def set_random_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        _not_more_than_blocks("random blocks", self.num_random_blocks, layout.shape[1])
        return self._random_columns(h, layout, self.num_random_blocks) if self.num_random_blocks else layout

    def set_sliding_window_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        return self._sliding_window(h, layout, self.num_sliding_window_blocks)

    def set_global_layout_itc(self, h: int, layout: np.ndarray) -> np.ndarray:
        _not_more_than_blocks("global blocks", self.num_global_blocks, layout.shape[1])
        layout[h, : self.num_global_blocks, :] = 1
        layout[h, :, : self.num_global_blocks] = 1
        return layout

    def make_layout(self, seq_len: int) -> np.ndarray:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_random_layout(h, layout)
            layout = self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout_itc(h, layout)
        return self._finish(layout)


class BSLongformerSparsityConfig(SparsityConfig):
    """Block-sparse Longformer: a symmetric sliding window plus global blocks (rows and columns) at the given
    indices or ``[start, end)`` ranges."""

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_sliding_window_blocks: int = 3,
        global_block_indices=(0,),
        global_block_end_indices=None,
        attention: str = "bidirectional",
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_sliding_window_blocks = _int("num_sliding_window_blocks", num_sliding_window_blocks)
        self.global_block_indices, self.global_block_end_indices = _global_ranges(
            global_block_indices, global_block_end_indices
        )
        self.attention = _attention(attention)

    def set_sliding_window_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        return self._sliding_window(h, layout, self.num_sliding_window_blocks)

    def set_global_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        for start, end in self._global_index_ranges(layout.shape[1]):
            layout[h, start:end, :] = 1
            layout[h, :, start:end] = 1
        return layout

    def make_layout(self, seq_len: int) -> np.ndarray:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            layout = self.set_sliding_window_layout(h, layout)
            layout = self.set_global_layout(h, layout)
        return self._finish(layout)


class LocalSlidingWindowSparsityConfig(SparsityConfig):
    """A sliding window of ``num_sliding_window_blocks // 2`` blocks each side (bidirectional) or the previous
    ``num_sliding_window_blocks // 2`` blocks and the diagonal (unidirectional, the default). One layout for all
    heads (no ``different_layout_per_head`` argument, as in DeepSpeed)."""

    def __init__(
        self, num_heads: int, block: int = 16, num_sliding_window_blocks: int = 3, attention: str = "unidirectional"
    ):
        super().__init__(num_heads, block)
        self.num_sliding_window_blocks = _int("num_sliding_window_blocks", num_sliding_window_blocks)
        self.attention = _attention(attention)

    def set_sliding_window_layout(self, h: int, layout: np.ndarray) -> np.ndarray:
        return self._sliding_window(h, layout, self.num_sliding_window_blocks)

    def make_layout(self, seq_len: int) -> np.ndarray:
        layout = self.setup_layout(seq_len)
        layout = self.set_sliding_window_layout(0, layout)
        return self._finish(layout)


# ---- DeepSpeed's JSON "sparse_attention" section -----------------------------------------------------------

# Keys and defaults of deepspeed/runtime/{config,constants}.py (note num_random_blocks: 0 here, 1 in BigBird).
JSON_DEFAULTS = {
    "block": 16,
    "different_layout_per_head": False,
    "num_local_blocks": 4,
    "num_global_blocks": 1,
    "attention": "bidirectional",
    "horizontal_global_attention": False,
    "num_different_global_patterns": 1,
    "num_random_blocks": 0,
    "local_window_blocks": [4],
    "global_block_indices": [0],
    "global_block_end_indices": None,
    "num_sliding_window_blocks": 3,
    "seed": 0,
}

_COMMON = ("block", "different_layout_per_head")
JSON_MODES = {
    "dense": (DenseSparsityConfig, _COMMON),
    "fixed": (
        FixedSparsityConfig,
        _COMMON + ("num_local_blocks", "num_global_blocks", "attention", "horizontal_global_attention",
                   "num_different_global_patterns"),
    ),
    "variable": (
        VariableSparsityConfig,
        _COMMON + ("num_random_blocks", "local_window_blocks", "global_block_indices", "global_block_end_indices",
                   "attention", "horizontal_global_attention", "seed"),
    ),
    "bigbird": (
        BigBirdSparsityConfig,
        _COMMON + ("num_random_blocks", "num_sliding_window_blocks", "num_global_blocks", "attention", "seed"),
    ),
    "bslongformer": (
        BSLongformerSparsityConfig,
        _COMMON + ("num_sliding_window_blocks", "global_block_indices", "global_block_end_indices", "attention"),
    ),
}  # fmt: skip


def sparsity_config_from_json(section, num_heads: int) -> SparsityConfig:
    """The config of a DeepSpeed ``"sparse_attention"`` JSON section.

    Args:
      section: the section as a dict, a whole DeepSpeed config (dict) holding a ``"sparse_attention"`` key, JSON
        text, or the path of a JSON file holding either.
      num_heads: the model's number of attention heads (not part of DeepSpeed's JSON).
    Missing keys take DeepSpeed's JSON defaults (``JSON_DEFAULTS``); ``mode`` defaults to ``"fixed"``; keys of
    other modes are ignored as in DeepSpeed; keys DeepSpeed does not know raise ``ValueError``. Unlike DeepSpeed,
    the bigbird and bslongformer modes read ``attention``, and variable/bigbird read ``seed``.
    """
    if isinstance(section, (str, os.PathLike)):
        text = str(section)
        if not text.lstrip().startswith("{"):
            with open(section, encoding="utf-8") as f:
                text = f.read()
        section = json.loads(text)
    if not isinstance(section, dict):
        raise TypeError(f"section must be a dict, JSON text or a JSON file path, got {type(section).__name__}")
    if "sparse_attention" in section:
        section = section["sparse_attention"]
        if not isinstance(section, dict):
            raise ValueError(f"'sparse_attention' must be a JSON object, got {type(section).__name__}")
    mode = section.get("mode", "fixed")
    if mode not in JSON_MODES:
        raise NotImplementedError(
            f"Given sparsity mode, {mode}, has not been implemented yet! Valid modes: {', '.join(JSON_MODES)}"
        )
    unknown = sorted(set(section) - set(JSON_DEFAULTS) - {"mode"})
    if unknown:
        raise ValueError(f"unknown keys in the sparse_attention section: {unknown}")
    cls, keys = JSON_MODES[mode]
    return cls(num_heads=num_heads, **{key: section.get(key, JSON_DEFAULTS[key]) for key in keys})


# ---- serialisation (Keras get_config) ----------------------------------------------------------------------

CONFIG_CLASSES = {
    cls.__name__: cls
    for cls in (
        DenseSparsityConfig,
        FixedSparsityConfig,
        VariableSparsityConfig,
        BigBirdSparsityConfig,
        BSLongformerSparsityConfig,
        LocalSlidingWindowSparsityConfig,
    )
}


def serialize_sparsity_config(config: SparsityConfig) -> dict:
    """``{"class_name", "module", "config"}``, JSON-friendly; ``deserialize_sparsity_config`` inverts it."""
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"sparsity_config must be a SparsityConfig, got {type(config).__name__}")
    return {"class_name": type(config).__name__, "module": type(config).__module__, "config": config.get_config()}


def deserialize_sparsity_config(data: dict | SparsityConfig, custom_objects: dict | None = None) -> SparsityConfig:
    """The config described by ``serialize_sparsity_config``'s dict (a config passes through).

    The class is looked up in ``custom_objects``, then among the built-in configs, then imported from ``module``.
    """
    if isinstance(data, SparsityConfig):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"sparsity_config must be a SparsityConfig or its serialised dict, got {type(data).__name__}")
    if "class_name" not in data or "config" not in data:
        raise ValueError(f"sparsity_config must be a SparsityConfig or its serialised dict, got {data!r}")
    name = data["class_name"]
    cls = (custom_objects or {}).get(name) or CONFIG_CLASSES.get(name)
    if cls is None and data.get("module"):
        cls = getattr(importlib.import_module(data["module"]), name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, SparsityConfig)):
        raise ValueError(f"unknown sparsity config class {name!r}; pass it in custom_objects")
    return cls.from_config(dict(data["config"]))
