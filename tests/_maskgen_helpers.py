"""Fixtures for the maskgen tests: real aligned crops from glint24 and one Masker per session."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="session")
def glint_crops(glint24) -> list[np.ndarray]:
    """One aligned 112x112 RGB crop per glint24 identity (24 real faces, frontal to half-profile)."""
    crops = []
    for person in sorted(p for p in Path(glint24).iterdir() if p.is_dir()):
        first = sorted(person.glob("*.png"), key=lambda p: int(p.stem))[0]
        crops.append(cv2.cvtColor(cv2.imread(str(first)), cv2.COLOR_BGR2RGB))
    return crops


@pytest.fixture(scope="session")
def masker():
    from maskgen.masker import Masker

    m = Masker()
    yield m
    m.close()


def small_image_folder(glint24: Path, root: Path, identities: int = 4, per_identity: int = 6) -> Path:
    """An ImageFolder of `identities` x `per_identity` glint24 crops (names without spaces)."""
    out = root / "faces"
    people = sorted(p for p in Path(glint24).iterdir() if p.is_dir())[:identities]
    for k, person in enumerate(people):
        (out / f"id{k}").mkdir(parents=True, exist_ok=True)
        for f in sorted(person.glob("*.png"), key=lambda p: int(p.stem))[:per_identity]:
            (out / f"id{k}" / f.name).write_bytes(f.read_bytes())
    return out
