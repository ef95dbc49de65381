"""A minimal PNG writer on ``zlib`` (8-bit RGB, no dependency beyond NumPy), for pictures of patterns and plots."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    # A chunk is length, type, data, and the CRC-32 of type + data (PNG spec, section 5.3).
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """The PNG file of an image: ``rgb`` uint8 ``[height, width, 3]`` → bytes."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"rgb must be a non-empty uint8 array [height, width, 3], got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    # IHDR: width, height, bit depth 8, colour type 2 (RGB), compression 0, filter method 0, no interlace.
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Each scanline starts with its filter type; 0 (none) suits flat-coloured pictures well enough.
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write ``rgb`` (uint8 ``[height, width, 3]``) to ``path`` as a PNG; creates the folder; returns the path."""
    path = Path(path)
    data = encode_png(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path

