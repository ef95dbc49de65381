"""``SlidingWindow`` and ``WindowLookAround`` (the CoLT5 light branches' patterns): pictures, block classes, tables."""

import textwrap

import numpy as np
import pytest

from bsattn.fused_tables import fused_tables_for_pattern
from bsattn.patterns import SlidingWindow, WindowLookAround


def picture(text: str) -> str:
    return textwrap.dedent(text).strip()


def tokens_ascii(mask: np.ndarray) -> str:
    return "\n".join("".join("#" if v else "." for v in row) for row in mask)


# i attends j iff i - 2 <= j <= i + 1
SLIDING_2_1 = """
    ##......
    ###.....
    ####....
    .####...
    ..####..
    ...####.
    ....####
    .....###
"""

# windows of 3 from 0; a token sees the previous window and its own up to itself
LOOKAROUND_3 = """
    #.......
    ##......
    ###.....
    ####....
    #####...
    ######..
    ...####.
    ...#####
"""


def test_pictures():
    assert tokens_ascii(SlidingWindow(2, 1).token_mask(8)[0]) == picture(SLIDING_2_1)
    assert tokens_ascii(WindowLookAround(3, 1, 0, causal=True).token_mask(8)[0]) == picture(LOOKAROUND_3)


PATTERNS = [
    SlidingWindow(3, 3),
    SlidingWindow(64, 64),
    SlidingWindow(0, 5),
    SlidingWindow(20, 0),
    WindowLookAround(6, 1, 0, causal=True),
    WindowLookAround(16, 1, 0, causal=True),
    WindowLookAround(5, 1, 1, causal=False),
    WindowLookAround(7, 2, 1, causal=True),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("n, bs", [(64, 8), (96, 16), (128, 32)])
def test_block_classes_and_tables_match_the_token_mask(pattern, n, bs):
    tokens = pattern.token_mask(n)
    grid = tokens.reshape(1, n // bs, bs, n // bs, bs)
    active, full = pattern.block_classes(n, n, bs)
    assert np.all(active >= grid.any(axis=(2, 4)))  # active may be conservative (empty blocks are dropped)
    np.testing.assert_array_equal(full, grid.all(axis=(2, 4)))
    if isinstance(pattern, SlidingWindow):
        np.testing.assert_array_equal(active, grid.any(axis=(2, 4)))
    np.testing.assert_array_equal(fused_tables_for_pattern(pattern, n, n, bs).token_mask(), tokens)


def test_sliding_window_is_the_exact_band():
    i = np.arange(40)
    np.testing.assert_array_equal(SlidingWindow(4, 4).token_mask(40)[0], np.abs(i[:, None] - i[None]) <= 4)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SlidingWindow(-1, 2), "before"),
        (lambda: SlidingWindow(1, 1.5), "after"),
        (lambda: WindowLookAround(0), "window"),
        (lambda: WindowLookAround(4, -1), "look_backward"),
    ],
)
def test_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()
