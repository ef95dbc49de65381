"""Where the benchmarks write their results by default: outside the repository, so that running one never
modifies a tracked file. The committed results in benchmarks/results/ change only when asked for
(``--out benchmarks/results/NAME``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

OUT_ENV = "BSATTN_BENCH_OUT"


def default_out(name: str) -> str:
    """``$BSATTN_BENCH_OUT/name``, else ``<temp dir>/bsattn_benchmarks/name``."""
    return str(Path(os.environ.get(OUT_ENV) or Path(tempfile.gettempdir()) / "bsattn_benchmarks") / name)
