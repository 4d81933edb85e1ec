"""Fixtures of the evaluation tests: a small folder of real glint24 faces."""
from __future__ import annotations

import pytest

from tests._eval_helpers import face_folder


@pytest.fixture(scope="module")
def faces(glint24, tmp_path_factory):
    return face_folder(glint24, tmp_path_factory.mktemp("faces") / "faces", identities=4, per_identity=4)
