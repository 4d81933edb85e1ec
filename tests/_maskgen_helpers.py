"""Helpers of the maskgen tests (their fixtures, glint_crops and masker, are in conftest.py)."""
from __future__ import annotations

from pathlib import Path


def small_image_folder(glint24: Path, root: Path, identities: int = 4, per_identity: int = 6) -> Path:
    """An ImageFolder of `identities` x `per_identity` glint24 crops (names without spaces)."""
    out = root / "faces"
    people = sorted(p for p in Path(glint24).iterdir() if p.is_dir())[:identities]
    for k, person in enumerate(people):
        (out / f"id{k}").mkdir(parents=True, exist_ok=True)
        for f in sorted(person.glob("*.png"), key=lambda p: int(p.stem))[:per_identity]:
            (out / f"id{k}" / f.name).write_bytes(f.read_bytes())
    return out
