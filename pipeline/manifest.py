"""The packed dataset's `manifest.json` (docs/design.md, "A packed dataset is a folder")."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import atomic_write_json

MANIFEST = "manifest.json"
VERSION = 1
# DALI hands labels over as float32, which holds every integer exactly only up to 2^24.
FLOAT32_EXACT_LIMIT = 1 << 24
# Past that limit the identity is also written as two exact float32 pieces: identity = hi * 2^12 + lo.
SPLIT_IDENTITY_FIELDS = ("identity_hi", "identity_lo")
SPLIT_BITS = 12


class ManifestError(ValueError):
    """A dataset folder has no usable manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_entry(data_dir: str | os.PathLike, rec: str, idx: str, count: int, kind: str = "train") -> dict:
    """A manifest shard entry for files already in `data_dir` (checksums computed here)."""
    data_dir = Path(data_dir)
    return {
        "rec": rec,
        "idx": idx,
        "count": int(count),
        "kind": kind,
        "bytes": (data_dir / rec).stat().st_size,
        "sha256": sha256_file(data_dir / rec),
        "idx_sha256": sha256_file(data_dir / idx),
    }


def load_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{data_dir} has no {MANIFEST}: it is not a packed dataset, or its pack did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    for key in ("version", "num_images", "num_classes", "label_fields", "shards"):
        if key not in manifest:
            raise ManifestError(f"{path} lacks {key!r}")
    if manifest["version"] != VERSION:
        raise ManifestError(f"{path} has version {manifest['version']}; this code reads version {VERSION}")
    return manifest


def write_manifest(data_dir: str | os.PathLike, manifest: dict) -> None:
    atomic_write_json(Path(data_dir) / MANIFEST, manifest)


def shard_paths(data_dir: str | os.PathLike, manifest: dict) -> list[tuple[Path, Path]]:
    """(rec, idx) paths of every shard in manifest order."""
    d = Path(data_dir)
    return [(d / s["rec"], d / s["idx"]) for s in manifest["shards"]]


def identity_label_fields(num_classes: int) -> list[str]:
    """Label fields that `pack` writes for a dataset of `num_classes` identities."""
    if num_classes > FLOAT32_EXACT_LIMIT:
        return ["identity", *SPLIT_IDENTITY_FIELDS]
    return ["identity"]


def identity_label_vector(identity: int, num_classes: int) -> list[float] | None:
    """The label vector a record needs, or None when the scalar float label is exact."""
    if num_classes <= FLOAT32_EXACT_LIMIT:
        return None
    return [float(identity), float(identity >> SPLIT_BITS), float(identity & ((1 << SPLIT_BITS) - 1))]


def decode_identity(label_values, label_fields: list[str]):
    """Exact integer identities from label values (`[..., len(fields)]` array or a scalar/vector)."""
    import numpy as np

    values = np.asarray(label_values, dtype=np.float64)
    if SPLIT_IDENTITY_FIELDS[0] in label_fields:
        hi = values[..., label_fields.index(SPLIT_IDENTITY_FIELDS[0])].astype(np.int64)
        lo = values[..., label_fields.index(SPLIT_IDENTITY_FIELDS[1])].astype(np.int64)
        return (hi << SPLIT_BITS) + lo
    if values.ndim == 0:
        return np.int64(values)
    return values[..., 0].astype(np.int64)
