"""Attention patterns: small immutable objects that say which query attends which key.

A pattern is defined by one vectorised predicate, ``allowed(head, q, k, n_q, n_k)``, over absolute token
indices (query ``q`` attends key ``k``). Everything else is derived from it:

- ``token_mask(n_q, n_k)``: bool ``[P, Tq, Tk]`` (``P = num_layouts``);
- ``block_layout(n_q, n_k, bs)``: bool ``[P, nQb, nKb]``, a block is active iff any of its token pairs is allowed;
- ``full_blocks(n_q, n_k, bs)``: bool ``[P, nQb, nKb]``, blocks whose token pairs are all allowed;
- ``block_masks(head, q_blocks, k_blocks, bs, n_q, n_k)``: the in-block masks ``[n, bs, bs]`` of given blocks;
- ``layout_ascii`` / ``token_ascii`` / ``layout_png``: pictures for the README (text, or a PNG on ``zlib``).

``P = 1`` means one layout shared by all heads; otherwise head ``h`` uses layout ``h``. Built-in patterns compute
their block classes analytically from block coordinates (no ``T x T`` array), so ``T = 65536`` at block size 64 is
cheap. Patterns combine with ``|`` (``Union``) and ``&`` (``Intersection``).

The sparse_attention modes (OpenAI's ``get_blocksparse_obj`` + ``get_callback``) map to ``Causal``, ``Local``,
``Strided`` and ``Fixed``; ``mode_pattern`` does that mapping, ``get_callback`` and ``dense_attn_mask`` reproduce
the original helpers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

MaskCallback = Callable[[tuple, int, int, int, int], np.ndarray]
"""blocksparse's ``cb(blk_shape, head_idx, qry_idx, key_idx, blk_idx) -> bool [bs, bs]`` (row = query, col = key)."""

ATTN_MODES = ("all", "local", "strided", "fixed")

# Largest number of predicate evaluations per vectorised chunk (bounds temporary memory to a few tens of MB).
_CHUNK_ELEMS = 1 << 22


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_multiple(name: str, value: int, block_size: int) -> None:
    if value % block_size:
        raise ValueError(f"{name}={value} must be a multiple of block_size={block_size}")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Base class. Subclasses implement ``allowed`` and may override ``_block_classes`` (analytic block view)."""

    @property
    def num_layouts(self) -> int:
        """1 if all heads share one layout, else the number of per-head layouts (head h uses layout h)."""
        return 1

    def allowed(self, head: int, q: np.ndarray, k: np.ndarray, n_q: int, n_k: int) -> np.ndarray:
        """Whether query ``q`` attends key ``k`` (absolute, broadcastable int arrays) → bool, broadcast shape."""
        raise NotImplementedError

    def validate(self, n_q: int, n_k: int, block_size: int | None = None) -> None:
        """Raise ``ValueError`` (naming the argument) if the sizes do not suit this pattern."""
        _check_positive_int("n_q", n_q)
        _check_positive_int("n_k", n_k)
        if block_size is not None:
            _check_positive_int("block_size", block_size)
            _check_multiple("n_q", n_q, block_size)
            _check_multiple("n_k", n_k, block_size)

    def __or__(self, other: Pattern) -> Pattern:
        return Union(self, other) if isinstance(other, Pattern) else NotImplemented

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection(self, other) if isinstance(other, Pattern) else NotImplemented

    # ---- derived views -------------------------------------------------------------------------------------

    def layout_index(self, head: int) -> int:
        """The layout used by ``head``: 0 when shared, else ``head`` (which must be < num_layouts)."""
        if self.num_layouts == 1:
            return 0
        if not 0 <= head < self.num_layouts:
            raise ValueError(f"head={head} out of range for a pattern with {self.num_layouts} per-head layouts")
        return head

    def _eval(self, head: int, q: np.ndarray, k: np.ndarray, n_q: int, n_k: int) -> np.ndarray:
        # A predicate may ignore an argument (Dense ignores both), so broadcast its result to the full shape.
        shape = np.broadcast_shapes(np.shape(q), np.shape(k))
        return np.broadcast_to(self.allowed(head, q, k, n_q, n_k), shape)

    def token_mask(self, n_q: int, n_k: int | None = None) -> np.ndarray:
        """Token-level mask → bool ``[P, n_q, n_k]`` (``n_k`` defaults to ``n_q``)."""
        n_k = n_q if n_k is None else n_k
        self.validate(n_q, n_k)
        q = np.arange(n_q)[:, None]
        k = np.arange(n_k)[None, :]
        return np.stack([self._eval(h, q, k, n_q, n_k) for h in range(self.num_layouts)])

    def block_masks(
        self,
        head: int,
        q_blocks: np.ndarray,
        k_blocks: np.ndarray,
        block_size: int,
        n_q: int,
        n_k: int,
    ) -> np.ndarray:
        """In-block masks of the blocks ``(q_blocks[b], k_blocks[b])`` → bool ``[n, bs, bs]`` (row = query offset)."""
        offsets = np.arange(block_size)
        q = np.asarray(q_blocks, dtype=np.int64).reshape(-1, 1, 1) * block_size + offsets[:, None]
        k = np.asarray(k_blocks, dtype=np.int64).reshape(-1, 1, 1) * block_size + offsets[None, :]
        return self._eval(head, q, k, n_q, n_k)

    def block_classes(self, n_q: int, n_k: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(active, full) block maps, each bool ``[P, nQb, nKb]``: any / every token pair of the block allowed."""
        self.validate(n_q, n_k, block_size)
        qb = np.arange(n_q // block_size, dtype=np.int64)[:, None]
        kb = np.arange(n_k // block_size, dtype=np.int64)[None, :]
        active, full = [], []
        for h in range(self.num_layouts):
            classes = self._block_classes(h, qb, kb, block_size, n_q, n_k)
            if classes is None:
                classes = self._scan_block_rows(h, block_size, n_q, n_k)
            a, f = (np.broadcast_to(c, (qb.size, kb.size)) for c in classes)
            active.append(a)
            full.append(f)
        return np.stack(active), np.stack(full)

    def block_layout(self, n_q: int, n_k: int, block_size: int) -> np.ndarray:
        """Active blocks → bool ``[P, n_q/bs, n_k/bs]``."""
        return self.block_classes(n_q, n_k, block_size)[0]

    def full_blocks(self, n_q: int, n_k: int, block_size: int) -> np.ndarray:
        """Blocks whose every token pair is allowed → bool ``[P, n_q/bs, n_k/bs]``."""
        return self.block_classes(n_q, n_k, block_size)[1]

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k) -> tuple[np.ndarray, np.ndarray] | None:
        """Analytic (active, full) over block coordinates ``qb [nQb, 1]``, ``kb [1, nKb]``; None = no formula."""
        return None

    def _scan_block_rows(self, head: int, block_size: int, n_q: int, n_k: int) -> tuple[np.ndarray, np.ndarray]:
        # Generic fallback: evaluate the predicate one block row ([bs, Tk] pairs) at a time.
        n_qb, n_kb = n_q // block_size, n_k // block_size
        active = np.empty((n_qb, n_kb), dtype=bool)
        full = np.empty((n_qb, n_kb), dtype=bool)
        k = np.arange(n_k)[None, :]
        for r in range(n_qb):
            q = np.arange(r * block_size, (r + 1) * block_size)[:, None]
            row = self._eval(head, q, k, n_q, n_k).reshape(block_size, n_kb, block_size)
            active[r] = row.any(axis=(0, 2))
            full[r] = row.all(axis=(0, 2))
        return active, full

    # ---- pictures ------------------------------------------------------------------------------------------

    def layout_ascii(self, n_q: int, n_k: int | None = None, block_size: int = 32, head: int = 0) -> str:
        """One line per query block: '#' full block, '+' partially kept block, '.' inactive block."""
        n_k = n_q if n_k is None else n_k
        active, full = self.block_classes(n_q, n_k, block_size)
        h = self.layout_index(head)
        grid = np.where(full[h], "#", np.where(active[h], "+", "."))
        return "\n".join("".join(row) for row in grid)

    def token_ascii(self, n_q: int, n_k: int | None = None, head: int = 0) -> str:
        """One line per query token: '#' attended key, '.' masked key (for tiny sizes)."""
        mask = self.token_mask(n_q, n_k)[self.layout_index(head)]
        return "\n".join("".join(row) for row in np.where(mask, "#", "."))

    def layout_image(
        self, n_q: int, n_k: int | None = None, block_size: int = 32, head: int = 0, scale: int | None = None
    ) -> np.ndarray:
        """The token mask drawn over the block layout → uint8 RGB ``[H, W, 3]``.

        Each token pair is a ``scale x scale`` square (default: the largest giving at most 512 pixels a side,
        at least 1): ``LAYOUT_COLOURS["kept"]`` for an attended pair, ``["masked"]`` for a masked pair in a
        computed block, ``["skipped"]`` inside a block never computed; 1-pixel ``["grid"]`` lines frame every
        block. Token ``t`` of a side starts at pixel ``1 + (t // block_size) * (block_size * scale + 1) +
        (t % block_size) * scale`` (``layout_pixel``), so ``H = n_q * scale + n_q / block_size + 1``.
        """
        n_k = n_q if n_k is None else n_k
        active = self.block_layout(n_q, n_k, block_size)[self.layout_index(head)]
        mask = self.token_mask(n_q, n_k)[self.layout_index(head)]
        scale = _check_positive_int("scale", scale) if scale is not None else max(1, 512 // max(n_q, n_k))
        kind = np.where(mask, 2, np.repeat(np.repeat(active, block_size, 0), block_size, 1).astype(np.int8))
        palette = np.array([LAYOUT_COLOURS[name] for name in ("skipped", "masked", "kept", "grid")], np.uint8)
        image = np.full((_picture_side(n_q, block_size, scale), _picture_side(n_k, block_size, scale)), 3, np.int8)
        rows, cols = layout_pixel(np.arange(n_q), block_size, scale), layout_pixel(np.arange(n_k), block_size, scale)
        offsets = np.arange(scale)
        image[(rows[:, None] + offsets).reshape(-1, 1), (cols[:, None] + offsets).reshape(1, -1)] = np.repeat(
            np.repeat(kind, scale, 0), scale, 1
        )
        return palette[image]

    def layout_png(
        self,
        path: str | Path,
        n_q: int,
        n_k: int | None = None,
        block_size: int = 32,
        head: int = 0,
        scale: int | None = None,
    ) -> Path:
        """Write ``layout_image(...)`` to ``path`` as a PNG (``zlib``, no other dependency); returns the Path."""
        from bsattn._png import write_png

        return write_png(path, self.layout_image(n_q, n_k, block_size, head, scale))


LAYOUT_COLOURS = {
    "kept": (31, 78, 153),  # an attended token pair
    "masked": (198, 216, 240),  # a masked pair inside a computed block
    "skipped": (255, 255, 255),  # a block the kernels never compute
    "grid": (160, 160, 160),  # the block boundaries
}


def layout_pixel(token: np.ndarray, block_size: int, scale: int) -> np.ndarray:
    """The first pixel (row or column) of token ``token`` in ``layout_image`` → int array, same shape."""
    token = np.asarray(token)
    return 1 + (token // block_size) * (block_size * scale + 1) + (token % block_size) * scale


def _picture_side(n: int, block_size: int, scale: int) -> int:
    return n * scale + n // block_size + 1


def _refine(pattern: Pattern, candidates: np.ndarray, n_q: int, n_k: int, block_size: int, reduce) -> np.ndarray:
    """Evaluate ``reduce(block_masks)`` (``np.any``/``np.all`` over a block) at the True entries of
    ``candidates [P, nQb, nKb]`` → bool, same shape, False elsewhere."""
    out = np.zeros(candidates.shape, dtype=bool)
    chunk = max(1, _CHUNK_ELEMS // (block_size * block_size))
    for h in range(candidates.shape[0]):
        qb, kb = np.nonzero(candidates[h])
        for s in range(0, qb.size, chunk):
            masks = pattern.block_masks(h, qb[s : s + chunk], kb[s : s + chunk], block_size, n_q, n_k)
            out[h, qb[s : s + chunk], kb[s : s + chunk]] = reduce(masks, axis=(1, 2))
    return out


@dataclasses.dataclass(frozen=True, repr=False)
class _Combination(Pattern):
    """Two patterns combined pair by pair; a per-head side and a shared side give per-head layouts."""

    left: Pattern
    right: Pattern
    _symbol = "?"

    def __post_init__(self):
        sizes = {self.left.num_layouts, self.right.num_layouts} - {1}
        if len(sizes) > 1:
            raise ValueError(f"cannot combine patterns with {sorted(sizes)} per-head layouts")

    def __repr__(self) -> str:
        return f"({self.left!r} {self._symbol} {self.right!r})"

    @property
    def num_layouts(self) -> int:
        return max(self.left.num_layouts, self.right.num_layouts)

    def validate(self, n_q, n_k, block_size=None):
        self.left.validate(n_q, n_k, block_size)
        self.right.validate(n_q, n_k, block_size)

    def _side_classes(self, n_q, n_k, block_size) -> list[tuple[np.ndarray, np.ndarray]]:
        """(active, full) of left and right, each broadcast to ``[P, nQb, nKb]``."""
        shape = (self.num_layouts, n_q // block_size, n_k // block_size)
        return [
            tuple(np.broadcast_to(x, shape) for x in side.block_classes(n_q, n_k, block_size))
            for side in (self.left, self.right)
        ]


class Union(_Combination):
    """Pairs allowed by ``left`` or ``right``."""

    _symbol = "|"

    def allowed(self, head, q, k, n_q, n_k):
        return self.left.allowed(head, q, k, n_q, n_k) | self.right.allowed(head, q, k, n_q, n_k)

    def block_classes(self, n_q, n_k, block_size):
        self.validate(n_q, n_k, block_size)
        (a_act, a_full), (b_act, b_full) = self._side_classes(n_q, n_k, block_size)
        full = a_full | b_full
        # Only blocks partially kept by both sides can become full through the union.
        full |= _refine(self, a_act & b_act & ~full, n_q, n_k, block_size, np.all)
        return a_act | b_act, full


class Intersection(_Combination):
    """Pairs allowed by both ``left`` and ``right``."""

    _symbol = "&"

    def allowed(self, head, q, k, n_q, n_k):
        return self.left.allowed(head, q, k, n_q, n_k) & self.right.allowed(head, q, k, n_q, n_k)

    def block_classes(self, n_q, n_k, block_size):
        self.validate(n_q, n_k, block_size)
        (a_act, a_full), (b_act, b_full) = self._side_classes(n_q, n_k, block_size)
        full = a_full & b_full
        # Blocks active on both sides but not full on both may or may not share a kept pair: look inside.
        active = full | _refine(self, a_act & b_act & ~full, n_q, n_k, block_size, np.any)
        return active, full


# ---- the built-in patterns ---------------------------------------------------------------------------------
# Block (Qb, Kb) holds queries i in [i0, i1] = [Qb*bs, Qb*bs+bs-1] and keys j in [j0, j1]; i - j takes every
# value in [i0 - j1, i1 - j0], which is what the analytic formulas below use.


def _block_bounds(qb, kb, block_size):
    i0, j0 = qb * block_size, kb * block_size
    return i0, i0 + block_size - 1, j0, j0 + block_size - 1


@dataclasses.dataclass(frozen=True)
class Dense(Pattern):
    """Every query attends every key (bidirectional)."""

    def allowed(self, head, q, k, n_q, n_k):
        return np.ones((), dtype=bool)

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        return np.ones((), dtype=bool), np.ones((), dtype=bool)


@dataclasses.dataclass(frozen=True)
class Causal(Pattern):
    """sparse_attention's 'all': query i attends key j iff j <= i (absolute indices, also when n_q != n_k)."""

    def allowed(self, head, q, k, n_q, n_k):
        return k <= q

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        i0, i1, j0, j1 = _block_bounds(qb, kb, block_size)
        return j0 <= i1, j1 <= i0


@dataclasses.dataclass(frozen=True)
class Local(Pattern):
    """sparse_attention's 'local': i attends j iff 0 <= i - j < local_attn_ctx (itself and L-1 previous tokens).

    Its block layout has ``L // bs + 1`` block diagonals; like sparse_attention, ``L`` must be a multiple of the
    block size.
    """

    local_attn_ctx: int

    def __post_init__(self):
        object.__setattr__(self, "local_attn_ctx", _check_positive_int("local_attn_ctx", self.local_attn_ctx))

    def validate(self, n_q, n_k, block_size=None):
        super().validate(n_q, n_k, block_size)
        if block_size is not None and self.local_attn_ctx % block_size:
            raise ValueError(f"local_attn_ctx={self.local_attn_ctx} must be a multiple of block_size={block_size}")

    def allowed(self, head, q, k, n_q, n_k):
        d = q - k
        return (d >= 0) & (d < self.local_attn_ctx)

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        i0, i1, j0, j1 = _block_bounds(qb, kb, block_size)
        d_min, d_max = i0 - j1, i1 - j0
        window = self.local_attn_ctx - 1
        return (d_max >= 0) & (d_min <= window), (d_min >= 0) & (d_max <= window)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
    """An exact band: query i attends key j iff ``i - before <= j <= i + after`` (``before + after + 1`` keys
    away from the edges). ``SlidingWindow(w, w)`` is local-attention's ``exact_windowsize`` window of CoLT5's
    light branch (``|i - j| <= w``); ``SlidingWindow(w - 1, 0)`` is ``Local(w)`` without its block-size limit.
    Any sizes (the window need not be a multiple of the block size)."""

    before: int
    after: int

    def __post_init__(self):
        for name in ("before", "after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    def allowed(self, head, q, k, n_q, n_k):
        d = q - k
        return (d <= self.before) & (d >= -self.after)

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        i0, i1, j0, j1 = _block_bounds(qb, kb, block_size)
        d_min, d_max = i0 - j1, i1 - j0
        return (d_min <= self.before) & (d_max >= -self.after), (d_max <= self.before) & (d_min >= -self.after)


@dataclasses.dataclass(frozen=True)
class WindowLookAround(Pattern):
    """local-attention's windows without ``exact_windowsize``: the sequence is cut into windows of ``window``
    tokens from position 0; a query of window ``m`` attends the keys of windows ``m - look_backward`` ..
    ``m + look_forward``, and with ``causal`` only keys ``j <= i``. CoLT5's autoregressive light branch is
    ``WindowLookAround(w, 1, 0, causal=True)``: token p sees from the start of the previous window up to p."""

    window: int
    look_backward: int = 1
    look_forward: int = 0
    causal: bool = True

    def __post_init__(self):
        object.__setattr__(self, "window", _check_positive_int("window", self.window))
        for name in ("look_backward", "look_forward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "causal", bool(self.causal))

    def allowed(self, head, q, k, n_q, n_k):
        dw = k // self.window - q // self.window
        keep = (dw >= -self.look_backward) & (dw <= self.look_forward)
        return keep & (k <= q) if self.causal else keep

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        # The window difference of a block's pairs spans [j0//w - i1//w, j1//w - i0//w]. Active is conservative
        # (both conditions satisfiable separately; blocks that keep nothing are dropped by the table builder);
        # full is exact (every pair satisfies both).
        i0, i1, j0, j1 = _block_bounds(qb, kb, block_size)
        w = self.window
        lo, hi = j0 // w - i1 // w, j1 // w - i0 // w
        active = (hi >= -self.look_backward) & (lo <= self.look_forward)
        full = (lo >= -self.look_backward) & (hi <= self.look_forward)
        if self.causal:
            active, full = active & (j0 <= i1), full & (j1 <= i0)
        return active, full


def strided_permutation(n: int, local_attn_ctx: int) -> np.ndarray:
    """sparse_attention's ``strided_transpose`` as an index array → int ``[n]``.

    ``x_transposed = x[perm]``: position ``p = b*bT + a`` holds original token ``t = a*L + b`` (``bT = n // L``),
    so tokens with equal ``t mod L`` become contiguous. ``np.argsort(perm)`` is the inverse.
    """
    n = _check_positive_int("n", n)
    local_attn_ctx = _check_positive_int("local_attn_ctx", local_attn_ctx)
    if n % local_attn_ctx:
        raise ValueError(f"n={n} must be a multiple of local_attn_ctx={local_attn_ctx}")
    return np.arange(n).reshape(n // local_attn_ctx, local_attn_ctx).T.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Strided(Pattern):
    """sparse_attention's 'strided', in the strided-transposed coordinates its kernels see.

    With ``bT = n // L``, position ``p`` attends ``p'`` iff ``p // bT == p' // bT`` (same residue class of the
    original tokens) and ``p' <= p``. Mapped back with ``strided_permutation`` this is ``j <= i`` and
    ``(i - j) % L == 0``. Self-attention only (``n_q == n_k``); needs ``n % L == 0`` and ``bT % block_size == 0``.
    """

    local_attn_ctx: int

    def __post_init__(self):
        object.__setattr__(self, "local_attn_ctx", _check_positive_int("local_attn_ctx", self.local_attn_ctx))

    def validate(self, n_q, n_k, block_size=None):
        super().validate(n_q, n_k, block_size)
        if n_k != n_q:
            raise ValueError(f"Strided is self-attention: n_k={n_k} must equal n_q={n_q}")
        if n_q % self.local_attn_ctx:
            raise ValueError(f"n_q={n_q} must be a multiple of local_attn_ctx={self.local_attn_ctx}")
        b_t = n_q // self.local_attn_ctx
        if block_size is not None and b_t % block_size:
            raise ValueError(
                f"n_q // local_attn_ctx = {b_t} must be a multiple of block_size={block_size} "
                f"(n_q={n_q}, local_attn_ctx={self.local_attn_ctx})"
            )

    def allowed(self, head, q, k, n_q, n_k):
        b_t = n_q // self.local_attn_ctx
        return (q // b_t == k // b_t) & (k <= q)

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        chunk = n_q // self.local_attn_ctx // block_size  # blocks per residue class; validate() made it exact
        same = qb // chunk == kb // chunk
        return same & (kb <= qb), same & (kb < qb)


@dataclasses.dataclass(frozen=True)
class Fixed(Pattern):
    """sparse_attention's 'fixed' (the paper's merged fixed pattern), as a token predicate.

    With ``L = local_attn_ctx``, ``c = vertsize * block_size`` and ``g = head % num_verts``:
    i attends j iff ``j <= i`` and (``j // L == i // L`` or ``j mod L`` in ``[L - (g+1)c, L - g*c - 1]``).
    sparse_attention defines this in block units (``S = L // block_size`` blocks per chunk, summary columns
    ``S-1-g*vertsize-t``, ``t < vertsize``); with its causal diagonal-block callback both agree token for token.
    ``num_layouts = num_heads`` when ``num_verts > 1`` (head h uses summary group ``h % num_verts``), else 1.
    """

    local_attn_ctx: int
    num_verts: int
    vertsize: int
    num_heads: int
    block_size: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _check_positive_int(field.name, getattr(self, field.name)))
        if self.local_attn_ctx % self.block_size:
            raise ValueError(f"local_attn_ctx={self.local_attn_ctx} must be a multiple of block_size={self.block_size}")
        stride = self.local_attn_ctx // self.block_size
        if self.num_heads % self.num_verts:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_verts={self.num_verts}")
        if self.vertsize > stride or stride % self.vertsize:
            raise ValueError(
                f"vertsize={self.vertsize} must divide local_attn_ctx // block_size = {stride} "
                f"(local_attn_ctx={self.local_attn_ctx}, block_size={self.block_size})"
            )
        if self.num_verts > stride // self.vertsize:
            raise ValueError(
                f"num_verts={self.num_verts} must be <= local_attn_ctx // block_size // vertsize = "
                f"{stride // self.vertsize}"
            )

    @property
    def num_layouts(self) -> int:
        return self.num_heads if self.num_verts > 1 else 1

    def summary_range(self, head: int) -> tuple[int, int]:
        """Inclusive ``(lo, hi)`` of the key residues ``j mod L`` that ``head`` summarises."""
        width = self.vertsize * self.block_size
        g = head % self.num_verts
        return self.local_attn_ctx - (g + 1) * width, self.local_attn_ctx - g * width - 1

    def allowed(self, head, q, k, n_q, n_k):
        span = self.local_attn_ctx
        lo, hi = self.summary_range(head)
        r = k % span
        return (k <= q) & ((k // span == q // span) | ((r >= lo) & (r <= hi)))

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        # General in block_size (the one passed here need not be self.block_size).
        span = self.local_attn_ctx
        lo, hi = self.summary_range(head)
        i0, i1, j0, j1 = _block_bounds(qb, kb, block_size)
        r = j0 % span
        # Any: a causal pair in a common chunk (given j0 <= i1 that is just "chunk ranges overlap"), or a summary
        # key j <= min(j1, i1); the first summary key at or after j0 is j0 + the distance to the window.
        first_summary = j0 + np.where(r < lo, lo - r, np.where(r <= hi, 0, span - r + lo))
        local = (j0 <= i1) & (i0 // span <= j1 // span)
        active = local | (first_summary <= np.minimum(j1, i1))
        # Full: causal for all pairs, and every non-summary key of the block lies in the single chunk holding
        # the whole query block. The first non-summary key at or after j0 is j0, or just past the window
        # (residue hi+1, or 0 of the next chunk when the window ends the chunk); none if the window is all of L.
        if lo == 0 and hi == span - 1:
            first_other = np.full_like(j0, np.iinfo(np.int64).max)
        else:
            after = hi + 1 - r if hi < span - 1 else span - r
            first_other = j0 + np.where((r < lo) | (r > hi), 0, after)
        one_chunk = (i0 // span == i1 // span) & (first_other >= (i0 // span) * span)
        full = (j1 <= i0) & ((first_other > j1) | one_chunk)
        return active, full


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout(Pattern):
    """A raw block layout plus an optional blocksparse-style mask callback (the adapter for user layouts).

    ``layout``: ``[nQb, nKb]`` (shared by all heads) or ``[H, nQb, nKb]``, nonzero = active.
    ``mask_callback(blk_shape, head_idx, qry_idx, key_idx, blk_idx) -> bool [bs, bs]`` is called once per
    (layout head, active block), ``blk_idx`` being the row-major block id in that head; None = blocks fully kept.
    The active blocks are the layout's nonzero entries even where the callback keeps nothing (blocksparse pads
    heads to equal block counts that way). Equality and hashing use the layout's content and the callback's
    identity.
    """

    layout: np.ndarray
    block_size: int
    mask_callback: MaskCallback | None = None

    def __post_init__(self):
        layout = np.asarray(self.layout)
        if layout.ndim not in (2, 3) or 0 in layout.shape or layout.dtype.kind not in "biuf":
            raise ValueError(
                f"layout must be a non-empty numeric [nQb, nKb] or [H, nQb, nKb], got {layout.dtype} {layout.shape}"
            )
        if self.mask_callback is not None and not callable(self.mask_callback):
            raise TypeError(f"mask_callback must be callable or None, got {type(self.mask_callback).__name__}")
        layout = np.array(layout != 0, dtype=bool).reshape((-1,) + layout.shape[-2:])
        layout.flags.writeable = False
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "block_size", _check_positive_int("block_size", self.block_size))

    def __repr__(self) -> str:
        return (
            f"BlockLayout(shape={self.layout.shape}, block_size={self.block_size}, "
            f"blocks={int(self.layout.sum())}, mask_callback={self.mask_callback!r})"
        )

    @functools.cached_property
    def _key(self) -> tuple:
        return (self.layout.shape, self.layout.tobytes(), self.block_size, self.mask_callback)

    def __eq__(self, other):
        return isinstance(other, BlockLayout) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    @property
    def num_layouts(self) -> int:
        return self.layout.shape[0]

    def validate(self, n_q, n_k, block_size=None):
        super().validate(n_q, n_k, block_size)
        if block_size is not None and block_size != self.block_size:
            raise ValueError(f"block_size={block_size} differs from the layout's block_size={self.block_size}")
        for name, n, blocks in (("n_q", n_q, self.layout.shape[1]), ("n_k", n_k, self.layout.shape[2])):
            if n != blocks * self.block_size:
                raise ValueError(f"{name}={n} must be {blocks} blocks * block_size {self.block_size}")

    @functools.cached_property
    def _block_ids(self) -> np.ndarray:
        """Row-major block id of each active block, -1 elsewhere → int64 ``[P, nQb, nKb]``."""
        flat = self.layout.reshape(self.layout.shape[0], -1)
        ids = np.cumsum(flat, axis=1) - 1
        return np.where(flat, ids, -1).reshape(self.layout.shape)

    @functools.cached_property
    def _masks(self) -> list[np.ndarray] | None:
        """The callback's masks per layout head → list of bool ``[blocks_h, bs, bs]``; None without callback."""
        if self.mask_callback is None:
            return None
        return [
            callback_masks(self.mask_callback, self.block_size, h, *np.nonzero(self.layout[h]))
            for h in range(self.layout.shape[0])
        ]

    def allowed(self, head, q, k, n_q, n_k):
        h = self.layout_index(head)
        bs = self.block_size
        ids = self._block_ids[h][q // bs, k // bs]
        if self._masks is None:
            return ids >= 0
        kept = self._masks[h][np.maximum(ids, 0), q % bs, k % bs]
        return (ids >= 0) & kept

    def _block_classes(self, head, qb, kb, block_size, n_q, n_k):
        active = self.layout[head]
        if self._masks is None:
            return active, active
        full = np.zeros_like(active)
        full[active] = self._masks[head].all(axis=(1, 2))
        return active, full


def callback_masks(
    callback: MaskCallback, block_size: int, head: int, q_blocks: np.ndarray, k_blocks: np.ndarray
) -> np.ndarray:
    """Call a blocksparse mask callback for the blocks ``(q_blocks[b], k_blocks[b])`` of layout head ``head``,
    ``b`` being the block id → bool ``[n, bs, bs]``. Raises ``ValueError`` if it returns a wrong shape/dtype."""
    shape = (block_size, block_size)
    out = np.empty((len(q_blocks),) + shape, dtype=bool)
    for b, (qb, kb) in enumerate(zip(q_blocks.tolist(), k_blocks.tolist(), strict=True)):
        mask = np.asarray(callback(shape, head, qb, kb, b))
        if mask.shape != shape or mask.dtype.kind not in "biu":
            raise ValueError(
                f"mask_callback returned {mask.dtype} {mask.shape} for head {head}, block {b} (Qb={qb}, Kb={kb}); "
                f"expected a bool array of shape {shape}"
            )
        out[b] = mask
    return out


# ---- sparse_attention compatibility ------------------------------------------------------------------------


def _require_ctx(attn_mode: str, local_attn_ctx) -> int:
    if local_attn_ctx is None:
        raise ValueError(f"attn_mode={attn_mode!r} needs local_attn_ctx")
    return _check_positive_int("local_attn_ctx", local_attn_ctx)


def _check_mode(attn_mode: str) -> None:
    if not isinstance(attn_mode, str) or attn_mode not in ATTN_MODES:
        raise ValueError(f"attn_mode={attn_mode!r} is invalid; valid modes: {', '.join(ATTN_MODES)}")


def get_callback(attn_mode: str, local_attn_ctx: int | None = None) -> MaskCallback:
    """sparse_attention's mask callback: causal inside diagonal blocks; 'local' also drops keys at least
    ``local_attn_ctx`` behind the query. ``cb(blk_shape, head_idx, qry_idx, key_idx, blk_idx) -> bool [bs, bs]``."""
    _check_mode(attn_mode)
    ctx = _require_ctx(attn_mode, local_attn_ctx) if attn_mode == "local" else None

    def callback(blk_shape, head_idx, qry_idx, key_idx, blk_idx):
        q = np.arange(blk_shape[0])[:, None]
        k = np.arange(blk_shape[1])[None, :]
        keep = np.ones(blk_shape, dtype=bool)
        if qry_idx == key_idx:
            keep &= k <= q
        if ctx is not None:
            d = (q + qry_idx * blk_shape[0]) - (k + key_idx * blk_shape[1])
            keep &= (d >= 0) & (d < ctx)
        return keep

    return callback


def mode_pattern(
    attn_mode: str,
    n_ctx: int,
    n_heads: int,
    local_attn_ctx: int | None = None,
    blocksize: int = 32,
    num_verts: int | None = None,
    vertsize: int | None = None,
) -> Pattern:
    """The pattern of sparse_attention's ``get_blocksparse_obj(n_ctx, n_heads, attn_mode, ...)`` + callback.

    'all' → ``Causal()``, 'local' → ``Local(L)``, 'strided' → ``Strided(L)`` (transposed coordinates),
    'fixed' → ``Fixed(L, num_verts, vertsize, n_heads, blocksize)``. For 'fixed', ``num_verts`` and ``vertsize``
    default to 1 when None (the original crashes). Sizes are checked here as the original asserts them.
    """
    _check_mode(attn_mode)
    if attn_mode == "all":
        pattern: Pattern = Causal()
    elif attn_mode == "local":
        pattern = Local(_require_ctx(attn_mode, local_attn_ctx))
    elif attn_mode == "strided":
        pattern = Strided(_require_ctx(attn_mode, local_attn_ctx))
    else:
        pattern = Fixed(
            _require_ctx(attn_mode, local_attn_ctx),
            1 if num_verts is None else num_verts,
            1 if vertsize is None else vertsize,
            n_heads,
            blocksize,
        )
    pattern.validate(n_ctx, n_ctx, blocksize)
    return pattern


def dense_attn_mask(n: int, attn_mode: str, local_attn_ctx: int | None = None) -> np.ndarray:
    """sparse_attention's ``get_attn_mask`` → float32 ``[1, 1, n, n]``, 1 = attend ('all', 'local', 'strided')."""
    n = _check_positive_int("n", n)
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    if attn_mode == "all":
        keep = j <= i
    elif attn_mode == "local":
        ctx = _require_ctx(attn_mode, local_attn_ctx)
        keep = (j <= i) & (i - j < ctx)
    elif attn_mode == "strided":
        ctx = _require_ctx(attn_mode, local_attn_ctx)
        keep = (j <= i) & ((i - j) % ctx == 0)
    else:
        raise ValueError(f"attn_mode={attn_mode!r} has no dense mask; supported: 'all', 'local', 'strided'")
    return keep.astype(np.float32)[None, None]
