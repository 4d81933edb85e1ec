"""Known start-up chatter of MediaPipe's and LiteRT's C++ code, kept off stderr.

Building a LiteRT interpreter prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." (TFLite's
minimal logger, which no environment variable turns off), and building a FaceMesh graph prints absl
warnings about its own graph ("Feedback manager requires a model with a single signature", ...): once per
worker process, meaning nothing to the user. `TF_CPP_MIN_LOG_LEVEL` and `GLOG_minloglevel` quiet what
they can; the rest is caught here, around those calls only: C++ writes to file descriptor 2, so it is
pointed at a temporary file for the call, and every line that is not one of the known messages below is
written back to stderr afterwards (an error message is never lost).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

KNOWN_CHATTER = re.compile("|".join([
    r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.",
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"W\d{4} [\d:. ]+\d+ inference_feedback_manager\.cc:\d+\] Feedback manager requires a model with a "
    r"single signature inference\. Disabling support for feedback tensors\.",
    r"W\d{4} [\d:. ]+\d+ landmark_projection_calculator\.cc:\d+\] Using NORM_RECT without IMAGE_DIMENSIONS "
    r"is only supported for the square ROI\..*",
]))


def quiet_native_logs() -> None:
    """The environment that makes TensorFlow's and MediaPipe's C++ logging print warnings and errors only;
    set before their libraries load (a value the user set is kept)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GLOG_minloglevel", "2")


@contextlib.contextmanager
def without_known_chatter() -> Iterator[None]:
    """Run the block with file descriptor 2 captured; then write back every line but KNOWN_CHATTER."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError, OSError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not KNOWN_CHATTER.fullmatch(line.rstrip("\n")))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
