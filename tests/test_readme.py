"""The READMEs as a new user meets them: every ```python block runs as pasted, every picture they show exists,
and the documented commands leave the checkout clean (their outputs go outside the repository).

A block runs on its own (a fresh namespace, as if pasted into a new interpreter), from a temporary working
directory. Fragments that are not meant to run must use another fence (```text, ```bash).
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", *sorted((REPO / "examples").glob("*/README.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    """``(id, code)`` of every python block: id = README path and the block's first line number."""
    blocks = []
    for readme in READMES:
        text = readme.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{readme.relative_to(REPO)}:{line}", match.group(1)))
    return blocks


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 6


@pytest.mark.parametrize("code", [code for _, code in python_blocks()], ids=[i for i, _ in python_blocks()])
def test_readme_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "<README block>", "exec"), namespace)  # noqa: S102 - the README's own code
    namespace.clear()  # free the example's tensors now: later tests measure the allocator's peak
    gc.collect()
    assert not list(tmp_path.iterdir()), "a README example wrote into the working directory"
    if "print(" in code:
        assert out.getvalue().strip(), "the example prints nothing"


def test_readme_sparse_attention_example_prints_a_small_difference(capsys):
    code = next(code for _, code in python_blocks() if "print(float(tf.reduce_max" in code)
    exec(compile(code, "<README block>", "exec"), {"__name__": "__readme__"})  # noqa: S102
    assert float(capsys.readouterr().out) < 1e-4


def test_readme_pattern_picture_is_what_the_code_prints():
    """The composition example's printed picture is in the README, and it differs from each part's."""
    from bsattn import patterns

    text = (REPO / "README.md").read_text()
    fixed = patterns.Fixed(local_attn_ctx=128, num_verts=1, vertsize=1, num_heads=1, block_size=32)
    union = (patterns.Local(64) | fixed).layout_ascii(512, block_size=32)
    assert f"```\n{union}\n```" in text
    assert union != fixed.layout_ascii(512, block_size=32) != patterns.Local(64).layout_ascii(512, block_size=32)


def test_readme_images_exist():
    for readme in READMES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)|<img src=\"([^\"]+)\"", readme.read_text()):
            path = next(t for t in target if t)
            assert (readme.parent / path).is_file(), f"{readme.name}: {path}"


def test_default_outputs_are_outside_the_repository(monkeypatch):
    """The enwik8 runs and the benchmarks' results go outside the checkout unless asked otherwise."""
    monkeypatch.delenv("BSATTN_ENWIK8_RUNS", raising=False)
    monkeypatch.delenv("BSATTN_BENCH_OUT", raising=False)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from outputs import default_out

    from examples.enwik8.config import Config

    for path in (Path(Config().run_dir), Path(default_out("enwik8_compare.json"))):
        assert REPO not in path.resolve().parents, path
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        source = script.read_text()
        if '"--out"' in source:
            assert re.search(r'"--out",\s*default=default_out\(', source), f"{script.name}: --out must default outside"

