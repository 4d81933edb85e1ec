"""The C++ start-up chatter of LiteRT and MediaPipe stays off stderr; every other line still gets there."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline.native_stderr import without_known_chatter
from tests._trainer_helpers import REPO, trainer_env

XNNPACK = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
FEEDBACK = (b"W0000 00:00:1796627652.681006   13158 inference_feedback_manager.cc:114] Feedback manager requires "
            b"a model with a single signature inference. Disabling support for feedback tensors.\n")


def test_known_lines_are_dropped_and_the_rest_is_written_back(capfd):
    with without_known_chatter():
        os.write(2, XNNPACK + b"E0000 a real error from C++\n" + FEEDBACK)
        print("python's own stderr", file=sys.stderr)
    err = capfd.readouterr().err  # (pytest captures sys.stderr apart from fd 2: the order is its own)
    assert sorted(err.splitlines()) == ["E0000 a real error from C++", "python's own stderr"]


def test_lines_are_written_back_when_the_block_raises(capfd):
    try:
        with without_known_chatter():
            os.write(2, b"ERROR: Didn't find op for builtin opcode\n")
            raise ValueError("failed to allocate")
    except ValueError:
        pass
    assert capfd.readouterr().err == "ERROR: Didn't find op for builtin opcode\n"


def test_landmarks_print_nothing_on_stderr(glint24):
    face = sorted(glint24.glob("*/*.png"))[0]
    code = ("import numpy as np; from PIL import Image; from pipeline.landmarks import FaceMeshDetector; "
            f"rgb = np.asarray(Image.open({str(face)!r}).convert('RGB')); d = FaceMeshDetector(); "
            "assert d.process_roi(rgb) is not None; assert d.process(rgb) is not None; d.process(rgb); "
            "print('ok')")
    env = {k: v for k, v in trainer_env().items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    assert proc.stderr == ""
