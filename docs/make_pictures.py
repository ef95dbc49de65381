#!/usr/bin/env python3
"""Draw the README's layout pictures into docs/img/ (NumPy and bsattn only; the ASCII pictures beside them in
the README come from ``layout_ascii`` of the same patterns).

    python docs/make_pictures.py            # rewrites docs/img/*.png (commit them)

tests/test_pictures.py checks that the committed files hold what this draws.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bsattn import patterns  # noqa: E402
from bsattn._png import write_png  # noqa: E402
from bsattn.deepspeed import sparsity_config as ds  # noqa: E402

GAP = 16  # white pixels between panels


def side_by_side(images: list[np.ndarray]) -> np.ndarray:
    """Panels left to right, top-aligned, ``GAP`` white pixels apart → uint8 ``[H, W, 3]``."""
    height = max(image.shape[0] for image in images)
    parts = []
    for i, image in enumerate(images):
        padded = np.full((height, image.shape[1], 3), 255, np.uint8)
        padded[: image.shape[0]] = image
        parts += [padded] if i == 0 else [np.full((height, GAP, 3), 255, np.uint8), padded]
    return np.concatenate(parts, axis=1)


def pictures() -> dict[str, np.ndarray]:
    """File name → picture: the sparse_attention modes (256 tokens, blocks of 32) and DeepSpeed's configs
    (160 tokens, blocks of 16), as in the README's ASCII pictures."""
    modes = [
        patterns.mode_pattern("all", 256, 1, blocksize=32),
        patterns.mode_pattern("local", 256, 1, 64, blocksize=32),
        patterns.mode_pattern("strided", 256, 1, 4, blocksize=32),
        patterns.mode_pattern("fixed", 256, 1, 64, blocksize=32, num_verts=1, vertsize=1),
    ]
    deepspeed = {
        "ds_fixed": [
            ds.FixedSparsityConfig(num_heads=1),
            ds.FixedSparsityConfig(num_heads=1, attention="unidirectional"),
        ],
        "ds_variable": [ds.VariableSparsityConfig(num_heads=1, local_window_blocks=[1, 2, 3])],
        "ds_bigbird": [ds.BigBirdSparsityConfig(num_heads=1)],
        "ds_bslongformer": [ds.BSLongformerSparsityConfig(num_heads=1, global_block_indices=[0, 5])],
        "ds_local_sliding_window": [ds.LocalSlidingWindowSparsityConfig(num_heads=1)],
    }
    out = {"modes.png": side_by_side([p.layout_image(256, block_size=32, scale=1) for p in modes])}
    for name, configs in deepspeed.items():
        out[f"{name}.png"] = side_by_side([c.layout_image(160, block_size=16, scale=2) for c in configs])
    return out


def main(out_dir: Path = REPO / "docs" / "img") -> list[Path]:
    """Write every picture into ``out_dir``; returns the paths."""
    return [write_png(Path(out_dir) / name, image) for name, image in pictures().items()]


if __name__ == "__main__":
    for path in main():
        print(f"wrote {path}")
