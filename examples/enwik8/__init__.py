"""A Sparse Transformer over bytes (Child et al. 2019), trained on enwik8 or a built-in corpus.

Modules: ``config`` (the settings, which are also the command-line flags), ``data`` (corpora, the
90/5/5 split, ``tf.data`` pipelines), ``model`` (the pre-norm Transformer with bsattn attention),
``train`` (the training loop, ``python -m examples.enwik8.train``) and ``evaluate`` (bits per byte
and sampling, ``python -m examples.enwik8.evaluate``).

Importing the package quiets TensorFlow's C++ logging unless ``TF_CPP_MIN_LOG_LEVEL`` is set:
``TF_CPP_MIN_LOG_LEVEL=3`` (which also hides ``failed call to cuInit`` on machines without a GPU), and the
INFO lines TensorFlow writes while it loads, before its log level applies, are dropped from stderr.
``TF_CPP_MIN_LOG_LEVEL=0 python -m examples.enwik8.train`` shows everything again.
"""

import os
import re
import sys
import tempfile

# What TensorFlow prints while its shared libraries load (absl's pre-initialisation notice and INFO lines such
# as "oneDNN custom operations are on"); warnings and errors of that phase are kept.
_LOAD_NOISE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called|I\d{4} \d\d:\d\d:")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 caught, then write back what is not load-time noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True) if not _LOAD_NOISE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "tensorflow" not in sys.modules:
        _import_tensorflow_quietly()
