"""A small line-plot rasteriser on bsattn's PNG writer (no matplotlib): axes, ticks, lines, a legend, a title.

Text uses a built-in 5x7 pixel font of capitals, digits and a little punctuation (lower case is drawn as upper
case). Enough for the benchmark's curves; not a plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bsattn._png import write_png

# Each glyph: 7 rows of 5 pixels, '#' = ink.
_GLYPHS = {
    "0": ".###./#...#/#..##/#.#.#/##..#/#...#/.###.",
    "1": "..#../.##../..#../..#../..#../..#../.###.",
    "2": ".###./#...#/....#/...#./..#../.#.../#####",
    "3": "#####/...#./..#../...#./....#/#...#/.###.",
    "4": "...#./..##./.#.#./#..#./#####/...#./...#.",
    "5": "#####/#..../####./....#/....#/#...#/.###.",
    "6": "..##./.#.../#..../####./#...#/#...#/.###.",
    "7": "#####/....#/...#./..#../.#.../.#.../.#...",
    "8": ".###./#...#/#...#/.###./#...#/#...#/.###.",
    "9": ".###./#...#/#...#/.####/....#/...#./.##..",
    "A": ".###./#...#/#...#/#####/#...#/#...#/#...#",
    "B": "####./#...#/#...#/####./#...#/#...#/####.",
    "C": ".###./#...#/#..../#..../#..../#...#/.###.",
    "D": "###../#..#./#...#/#...#/#...#/#..#./###..",
    "E": "#####/#..../#..../####./#..../#..../#####",
    "F": "#####/#..../#..../####./#..../#..../#....",
    "G": ".###./#...#/#..../#.###/#...#/#...#/.####",
    "H": "#...#/#...#/#...#/#####/#...#/#...#/#...#",
    "I": ".###./..#../..#../..#../..#../..#../.###.",
    "J": "..###/...#./...#./...#./...#./#..#./.##..",
    "K": "#...#/#..#./#.#../##.../#.#../#..#./#...#",
    "L": "#..../#..../#..../#..../#..../#..../#####",
    "M": "#...#/##.##/#.#.#/#.#.#/#...#/#...#/#...#",
    "N": "#...#/#...#/##..#/#.#.#/#..##/#...#/#...#",
    "O": ".###./#...#/#...#/#...#/#...#/#...#/.###.",
    "P": "####./#...#/#...#/####./#..../#..../#....",
    "Q": ".###./#...#/#...#/#...#/#.#.#/#..#./.##.#",
    "R": "####./#...#/#...#/####./#.#../#..#./#...#",
    "S": ".####/#..../#..../.###./....#/....#/####.",
    "T": "#####/..#../..#../..#../..#../..#../..#..",
    "U": "#...#/#...#/#...#/#...#/#...#/#...#/.###.",
    "V": "#...#/#...#/#...#/#...#/#...#/.#.#./..#..",
    "W": "#...#/#...#/#...#/#.#.#/#.#.#/#.#.#/.#.#.",
    "X": "#...#/#...#/.#.#./..#../.#.#./#...#/#...#",
    "Y": "#...#/#...#/.#.#./..#../..#../..#../..#..",
    "Z": "#####/....#/...#./..#../.#.../#..../#####",
    ".": "...../...../...../...../...../.##../.##..",
    ",": "...../...../...../...../.##../..#../.#...",
    ":": "...../.##../.##../...../.##../.##../.....",
    "-": "...../...../...../#####/...../...../.....",
    "+": "...../..#../..#../#####/..#../..#../.....",
    "=": "...../...../#####/...../#####/...../.....",
    "(": "...#./..#../.#.../.#.../.#.../..#../...#.",
    ")": ".#.../..#../...#./...#./...#./..#../.#...",
    "/": "...../....#/...#./..#../.#.../#..../.....",
    "%": "##.../##..#/...#./..#../.#.../#..##/...##",
    "_": "...../...../...../...../...../...../#####",
    " ": "...../...../...../...../...../...../.....",
}
_FONT = {
    ch: np.array([[c == "#" for c in row] for row in glyph.split("/")], bool) for ch, glyph in _GLYPHS.items()
}

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (40, 40, 40), (150, 150, 150), (232, 232, 232)
SERIES_COLOURS = [(31, 78, 153), (214, 96, 39), (44, 150, 70), (150, 60, 160), (190, 40, 60), (90, 90, 90)]


def text_size(text: str, scale: int) -> tuple[int, int]:
    """(width, height) in pixels of ``text`` drawn at ``scale`` (6 pixels per character, 7 rows)."""
    return (6 * len(text) - 1) * scale, 7 * scale


def draw_text(image: np.ndarray, x: int, y: int, text: str, colour=BLACK, scale: int = 2) -> None:
    """Draw ``text`` with its top-left corner at pixel ``(x, y)``; characters outside the font are blanks."""
    for i, ch in enumerate(text.upper()):
        glyph = np.kron(_FONT.get(ch, _FONT[" "]), np.ones((scale, scale), bool))
        x0 = x + 6 * scale * i
        window = image[y : y + glyph.shape[0], x0 : x0 + glyph.shape[1]]
        window[glyph[: window.shape[0], : window.shape[1]]] = colour


def draw_line(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour, width: int = 1) -> None:
    """A straight segment, sampled at every pixel along its longer axis, ``width`` pixels thick."""
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, steps)).astype(int)
    ys = np.rint(np.linspace(y0, y1, steps)).astype(int)
    for dy in range(-(width // 2), width - width // 2):
        for dx in range(-(width // 2), width - width // 2):
            yy, xx = ys + dy, xs + dx
            inside = (yy >= 0) & (yy < image.shape[0]) & (xx >= 0) & (xx < image.shape[1])
            image[yy[inside], xx[inside]] = colour


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]``: steps of 1, 2 or 5 times a power of ten."""
    raw = (hi - lo) / max(count - 1, 1) or 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(max(1, math.ceil((hi - first) / step - 1e-9)) + 1)]


def _label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    return f"{value:.{decimals}f}"


def line_plot(
    path: str | Path,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    size: tuple[int, int] = (820, 480),
) -> Path:
    """Plot ``series`` (``(label, xs, ys)`` each, at least one point) as lines into a PNG at ``path``."""
    if not series or any(len(xs) == 0 or len(xs) != len(ys) for _, xs, ys in series):
        raise ValueError("series must be non-empty (label, xs, ys) with len(xs) == len(ys) > 0")
    width, height = size
    image = np.full((height, width, 3), WHITE, np.uint8)
    left, right, top, bottom = 78, 230, 46, 62
    all_x = np.concatenate([np.asarray(xs, float) for _, xs, _ in series])
    all_y = np.concatenate([np.asarray(ys, float) for _, _, ys in series])
    x_ticks, y_ticks = nice_ticks(all_x.min(), all_x.max()), nice_ticks(all_y.min(), all_y.max())
    (x_lo, x_hi), (y_lo, y_hi) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])

    def px(x):
        return left + (np.asarray(x, float) - x_lo) / ((x_hi - x_lo) or 1.0) * (width - left - right)

    def py(y):
        return height - bottom - (np.asarray(y, float) - y_lo) / ((y_hi - y_lo) or 1.0) * (height - top - bottom)

    for tick in x_ticks:  # grid lines and tick labels
        draw_line(image, px(tick), top, px(tick), height - bottom, LIGHT)
        text = _label(tick, x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0)
        draw_text(image, int(px(tick)) - text_size(text, 2)[0] // 2, height - bottom + 8, text)
    for tick in y_ticks:
        draw_line(image, left, py(tick), width - right, py(tick), LIGHT)
        text = _label(tick, y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0)
        draw_text(image, left - 8 - text_size(text, 2)[0], int(py(tick)) - 7, text)
    draw_line(image, left, top, left, height - bottom, BLACK)
    draw_line(image, left, height - bottom, width - right, height - bottom, BLACK)
    for i, (label, xs, ys) in enumerate(series):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        x, y = px(xs), py(ys)
        for j in range(len(x) - 1):
            draw_line(image, x[j], y[j], x[j + 1], y[j + 1], colour, width=2)
        legend_y = top + 10 + 24 * i
        draw_line(image, width - right + 16, legend_y + 7, width - right + 40, legend_y + 7, colour, width=3)
        draw_text(image, width - right + 48, legend_y, label)
    draw_text(image, left, 14, title)
    draw_text(image, left + (width - left - right - text_size(x_label, 2)[0]) // 2, height - 26, x_label)
    draw_text(image, 8, top - 26, y_label)
    return write_png(path, image)
