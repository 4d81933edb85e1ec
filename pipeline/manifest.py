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
    """The manifest of `data_dir`, checked against the schema (`validate_manifest`); ManifestError naming
    the file for anything that is not a well-formed version-1 manifest."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{data_dir} has no {MANIFEST}: it is not a packed dataset, or its pack did not finish")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ManifestError(f"{path} is not a manifest: JSON nested too deep") from None
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror or e}") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest, path: str | os.PathLike = MANIFEST) -> None:
    """Every field the readers, verify and maskgen rely on, with its type, range and cross-checks
    (docs/design.md section 1, "The manifest schema"); ManifestError naming `path` and the field."""
    def fail(msg: str):
        raise ManifestError(f"{path}: {msg}")

    if not isinstance(manifest, dict):
        fail(f"the top level is a {type(manifest).__name__}, not an object")
    for key in ("version", "image_size", "num_images", "num_classes", "label_fields", "shards"):
        if key not in manifest:
            fail(f"lacks {key!r}")
    if manifest["version"] != VERSION or not _is_int(manifest["version"]):
        fail(f"has version {manifest['version']!r}; this code reads version {VERSION}")
    size = manifest["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
        fail(f"image_size {size!r} is not [width, height] of positive integers")
    _int_field(manifest, "num_images", 0, fail)
    num_classes = _int_field(manifest, "num_classes", 1, fail)
    fields = manifest["label_fields"]
    if not (isinstance(fields, list) and fields and all(isinstance(f, str) and f for f in fields)):
        fail(f"label_fields {fields!r} is not a non-empty list of names")
    if len(set(fields)) != len(fields) or fields[0] != "identity":
        fail(f"label_fields {fields!r}: names must be unique and the first must be 'identity'")
    split = [f in fields for f in SPLIT_IDENTITY_FIELDS]
    if any(split) and not all(split):
        fail(f"label_fields {fields!r} names one of {SPLIT_IDENTITY_FIELDS} without the other")
    if num_classes > FLOAT32_EXACT_LIMIT and not all(split):
        fail(f"num_classes {num_classes} > 2^24 needs the label fields {SPLIT_IDENTITY_FIELDS}")
    names: set[str] = set()
    total = _check_shards(manifest["shards"], "shards", TRAIN_KINDS, names, fail)
    if total != manifest["num_images"]:
        fail(f"num_images is {manifest['num_images']} but the shards' counts sum to {total}")
    for split, kind in (("holdout", HOLDOUT_KIND), ("val", VAL_KIND)):
        if split not in manifest:
            continue
        part = manifest[split]
        if not isinstance(part, dict):
            fail(f"{split} is not an object")
        held = _check_shards(part.get("shards"), f"{split}.shards", (kind,), names, fail)
        if part.get("num_images", held) != held:
            fail(f"{split}.num_images is {part['num_images']!r} but its shards' counts sum to {held}")
    if "next_id" in manifest:
        _int_field(manifest, "next_id", 0, fail)
    skipped = manifest.get("skipped")
    if skipped is not None:
        if not isinstance(skipped, dict):
            fail("skipped is not an object")
        _int_field(skipped, "count", 0, fail, "skipped.count")
        if skipped.get("file") is not None and not _is_plain_name(skipped["file"]):
            fail(f"skipped.file {skipped['file']!r} is not a file name in the dataset folder")


# Shard kinds: what the readers pick by ("train" and maskgen's "masked"); held-out shards are "holdout",
# the validation split's (`pack --val-split`) "val": both listed apart from `shards`, never trained on.
TRAIN_KINDS = ("train", "masked")
HOLDOUT_KIND = "holdout"
VAL_KIND = "val"
_HEX = frozenset("0123456789abcdef")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_plain_name(v) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v and "\\" not in v


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX


def _int_field(obj: dict, key: str, low: int, fail, name: str | None = None) -> int:
    v = obj.get(key)
    if not _is_int(v) or v < low:
        fail(f"{name or key} is {v!r}; expected an integer >= {low}")
    return v


def _check_shards(shards, where: str, kinds: tuple[str, ...], names: set[str], fail) -> int:
    """Check each shard entry; return the sum of their counts. `names` collects file names across lists:
    a shard listed twice would be read twice."""
    if not isinstance(shards, list) or (where == "shards" and not shards):
        fail(f"{where} is not a non-empty list")
    total = 0
    for i, s in enumerate(shards):
        at = f"{where}[{i}]"
        if not isinstance(s, dict):
            fail(f"{at} is not an object")
        for key in ("rec", "idx"):
            if not _is_plain_name(s.get(key)):
                fail(f"{at}.{key} is {s.get(key)!r}; expected a file name in the dataset folder")
            if s[key] in names:
                fail(f"{at}.{key} {s[key]!r} is listed twice")
            names.add(s[key])
        total += _int_field(s, "count", 0, fail, f"{at}.count")
        _int_field(s, "bytes", 0, fail, f"{at}.bytes")
        if s.get("kind") not in kinds:
            fail(f"{at}.kind is {s.get('kind')!r}; expected one of {list(kinds)}")
        for key in ("sha256", "idx_sha256"):
            if not _is_sha256(s.get(key)):
                fail(f"{at}.{key} is {s.get(key)!r}; expected 64 lowercase hex digits")
    return total


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
