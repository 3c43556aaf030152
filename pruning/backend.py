"""Keras, imported once without TensorFlow's start-up lines on stderr.

TensorFlow's C++ side prints oneDNN/CUDA notices at import that ignore Python logging; a
user who made a typo should see our one-line error, not those. Set TF_CPP_MIN_LOG_LEVEL=0
to see TensorFlow's own messages again. Importing this module sets no environment variable:
TensorFlow's C++ log level after the import is the application's to choose (``jobs/``, the
scripts and ``python -m pruning.demo`` set TF_CPP_MIN_LOG_LEVEL=3 unless it is set).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def quiet_stderr():
    """Point file descriptor 2 at /dev/null for the duration (C++ writes bypass sys.stderr)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


with quiet_stderr():
    import keras  # noqa: E402,F401  (imports the configured backend, the noisy part)

# Every B'_k, base and head is its own small Keras model; TensorFlow counts their first traces
# together and warns about "retracing", which is expected here and not actionable.
logging.getLogger("tensorflow").setLevel(logging.ERROR)
