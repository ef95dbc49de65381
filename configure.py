#!/usr/bin/env python3
"""Non-interactive Bazel configuration: writes .bazelrc for this checkout.

    python configure.py [--python PY]

Points @local_config_tf at PY's TensorFlow (default: this interpreter) and @local_config_cuda at the CUDA
toolkit that build_config.find_cuda finds (CUDA_HOME, /usr/local/cuda, nvcc on PATH; BSATTN_CUDA=0: none).
All flags come from build_config.py. Then: `bazel build [--config=cuda] //ops:_bsattn_ops.so`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import build_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="python whose tensorflow Bazel builds against")
    ap.add_argument("--output", type=Path, default=build_config.ROOT / ".bazelrc")
    args = ap.parse_args(argv)
    try:
        text = build_config.bazelrc_text(args.python)
    except build_config.BuildError as e:
        print(f"configure.py: {e}", file=sys.stderr)
        return 1
    args.output.write_text(text)
    cuda = "--repo_env=BSATTN_NVCC=" in text
    print(f"wrote {args.output} (TensorFlow {build_config.tf_info(args.python).version}, "
          f"CUDA toolkit: {'yes, use --config=cuda' if cuda else 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
