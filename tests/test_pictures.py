"""Tests of the PNG pictures: bsattn._png (read back with zlib here) and Pattern.layout_png, pixel by pixel."""

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from bsattn import FixedSparsityConfig
from bsattn._png import encode_png, write_png
from bsattn.patterns import LAYOUT_COLOURS, Causal, Fixed, Local, Strided, layout_pixel


def read_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB, filter-0 PNG with zlib, checking every chunk's CRC → uint8 ``[H, W, 3]``."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, kinds = 8, b"", []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        if kind == b"IHDR":
            width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and pos == len(data)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()  # filter type 0 on every scanline
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip(rng, tmp_path):
    image = rng.integers(0, 256, (7, 13, 3), dtype=np.uint8)
    path = write_png(tmp_path / "sub" / "x.png", image)
    np.testing.assert_array_equal(read_png(path.read_bytes()), image)


@pytest.mark.parametrize(
    "rgb, match",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4), np.uint8), r"\[height, width, 3\]"),
        (np.zeros((0, 4, 3), np.uint8), "non-empty"),
    ],
)
def test_png_rejects_bad_images(rgb, match):
    with pytest.raises(ValueError, match=match):
        encode_png(rgb)


def expected_picture(pattern, n_q, n_k, block_size, head, scale) -> np.ndarray:
    """The picture built pixel by pixel from token_mask and block_layout, with plain loops."""
    mask = pattern.token_mask(n_q, n_k)[pattern.layout_index(head)]
    active = pattern.block_layout(n_q, n_k, block_size)[pattern.layout_index(head)]
    side = lambda n: n * scale + n // block_size + 1  # noqa: E731
    image = np.empty((side(n_q), side(n_k), 3), np.uint8)
    image[:] = LAYOUT_COLOURS["grid"]
    for i in range(n_q):
        for j in range(n_k):
            name = "kept" if mask[i, j] else "masked" if active[i // block_size, j // block_size] else "skipped"
            y, x = int(layout_pixel(i, block_size, scale)), int(layout_pixel(j, block_size, scale))
            image[y : y + scale, x : x + scale] = LAYOUT_COLOURS[name]
    return image


@pytest.mark.parametrize(
    "pattern, n_q, n_k, block_size, head, scale",
    [
        (Local(16) | Fixed(32, 1, 1, 1, 8), 64, 64, 8, 0, 2),
        (Fixed(32, 2, 1, 2, 8), 64, 64, 8, 1, 1),  # per-head layouts: head 1's summary columns
        (Strided(4), 64, 64, 4, 0, 3),
        (Causal(), 16, 32, 8, 0, 1),  # Tq != Tk
        (FixedSparsityConfig(num_heads=2, block=4, num_local_blocks=2), 24, 24, 4, 0, 2),
    ],
)
def test_layout_png_pixels(pattern, n_q, n_k, block_size, head, scale, tmp_path):
    path = pattern.layout_png(tmp_path / "p.png", n_q, n_k, block_size=block_size, head=head, scale=scale)
    got = read_png(path.read_bytes())
    np.testing.assert_array_equal(got, expected_picture(pattern, n_q, n_k, block_size, head, scale))
    # Every colour appears where the pattern has it (the test cannot pass on a blank picture).
    colours = {tuple(c) for c in got.reshape(-1, 3)}
    assert {LAYOUT_COLOURS["kept"], LAYOUT_COLOURS["grid"]} <= colours


def test_layout_image_default_scale():
    assert Local(64).layout_image(256, block_size=32).shape == (256 * 2 + 9, 256 * 2 + 9, 3)
    assert Local(64).layout_image(1024, block_size=64).shape == (1024 + 17, 1024 + 17, 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Local(64).layout_image(256, block_size=32, scale=0), "scale"),
        (lambda: Local(64).layout_image(250, block_size=32), "n_q=250"),
        (lambda: Fixed(32, 2, 1, 2, 8).layout_image(64, block_size=8, head=2), "head=2"),
    ],
)
def test_layout_image_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_committed_pictures_are_current():
    """docs/img/ holds what docs/make_pictures.py draws now (re-run it after changing a pattern)."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    sys.path.insert(0, str(docs))
    try:
        import make_pictures
    finally:
        sys.path.remove(str(docs))
    drawn = make_pictures.pictures()
    # enwik8_compare*.png are benchmark curves, drawn by benchmarks/enwik8_compare.py from measured runs.
    committed = (p.name for p in (docs / "img").glob("*.png") if not p.name.startswith("enwik8_compare"))
    assert sorted(drawn) == sorted(committed)
    for name, image in drawn.items():
        np.testing.assert_array_equal(read_png((docs / "img" / name).read_bytes()), image, err_msg=name)


def _png_plot():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import png_plot
    finally:
        sys.path.pop(0)
    return png_plot


def test_line_plot_draws_each_series_where_it_belongs(tmp_path):
    plot = _png_plot()
    path = plot.line_plot(tmp_path / "p.png", [("low", [0, 10], [1, 1]), ("high", [0, 5, 10], [2, 2, 2])], "t", "x", "y")
    image = read_png(path.read_bytes())
    height, width = image.shape[:2]
    plot_area = image[:, : width - 230]  # left of the legend
    rows = {}
    for name, colour in zip(("low", "high"), plot.SERIES_COLOURS):
        ys, xs = np.nonzero((plot_area == colour).all(axis=-1))
        assert ys.size > 100, name  # a line, not a dot
        rows[name] = set(ys.tolist())
        assert xs.min() <= 80 and xs.max() >= width - 232, name  # from x = 0 to x = 10
    assert max(rows["low"]) - min(rows["low"]) <= 1 and abs(min(rows["low"]) - (height - 62)) <= 1  # y = 1: bottom
    assert max(rows["high"]) - min(rows["high"]) <= 1 and abs(min(rows["high"]) - 46) <= 1  # y = 2: top
    ink = (image == plot.BLACK).all(axis=-1)
    assert ink[:, width - 230 :].any() and ink[:40].any()  # legend labels and the title


@pytest.mark.parametrize("lo, hi", [(10, 300), (3.71, 7.93), (0.1, 0.35), (5, 5), (-2, 3)])
def test_nice_ticks_cover_the_range_in_round_steps(lo, hi):
    ticks = _png_plot().nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    assert ticks[0] <= lo and ticks[-1] >= hi and len(ticks) <= 8
    assert np.allclose(np.diff(ticks), step)
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 5))


def test_line_plot_rejects_empty_series(tmp_path):
    with pytest.raises(ValueError, match="series"):
        _png_plot().line_plot(tmp_path / "p.png", [("a", [], [])])
