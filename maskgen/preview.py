"""Contact sheets of original | masked pairs: from a built dataset, or straight from image files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from pipeline.manifest import load_manifest
from pipeline.recordio import IndexedRecordIO, RecordIO, unpack_record

from .masker import Masker, MaskSpec

CAPTION = 12  # pixels of caption strip under each pair


def _decode(data: bytes) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("undecodable image")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    strip = np.full((CAPTION, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (2, CAPTION - 3), cv2.FONT_HERSHEY_PLAIN, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([tile, strip], 0)


def contact_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], cols: int = 4) -> np.ndarray:
    """RGB sheet of (original, masked, caption) tiles, `cols` pairs per row."""
    if not pairs:
        raise ValueError("nothing to draw")
    h, w = pairs[0][0].shape[:2]
    tiles = []
    for orig, masked, text in pairs:
        if orig.shape[:2] != (h, w):
            orig = cv2.resize(orig, (w, h))
        if masked.shape[:2] != (h, w):
            masked = cv2.resize(masked, (w, h))
        pair = np.concatenate([orig, masked], 1)
        tiles.append(_caption(np.pad(pair, ((2, 2), (2, 2), (0, 0)), constant_values=255), text))
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (-len(tiles) % cols)
    rows = [np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, 0)


def describe(meta: dict) -> str:
    text = f"{meta['mask_type']} {meta['mode']}"
    if not meta.get("nose_covered", True):
        text += " low"
    if meta.get("fallback"):
        text += " FB"
    return text


def dataset_pairs(data: Path, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """`n` seeded (original, masked, caption) triples from a dataset `maskgen build` has run on."""
    manifest = load_manifest(data)
    info = manifest.get("maskgen")
    if not info:
        raise ValueError(f"{data} has no masked images: run `maskgen build --data {data}` first")
    with open(data / info["sidecar"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(rows), size=min(n, len(rows)), replace=False).tolist())
    masked_shards = [s for s in manifest["shards"] if s.get("kind") == "masked"]
    readers: dict[str, object] = {}
    out = []
    try:
        for i in pick:
            row = rows[i]
            shard = masked_shards[row["shard"]]
            key = shard["rec"]
            if key not in readers:
                readers[key] = IndexedRecordIO(data / shard["idx"], data / shard["rec"], "r")
            masked = _decode(unpack_record(readers[key].read_idx(row["id"]))[1])
            src = row["source"]
            if src["rec"] not in readers:
                readers[src["rec"]] = RecordIO(data / src["rec"], "r")
            orig = _decode(unpack_record(readers[src["rec"]].read_at(src["offset"]))[1])
            out.append((orig, masked, describe(row)))
    finally:
        for r in readers.values():
            r.close()
    return out


def image_pairs(paths: Sequence[Path], seed: int = 0, mode: str = "mixed", types: Optional[Sequence[str]] = None,
                aligned: bool = True, masker: Optional[Masker] = None,
                specs: Optional[Sequence[MaskSpec]] = None) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Mask image files in this process and return (original, masked, caption) triples."""
    from .shapes import MASK_TYPES

    own = masker is None
    masker = masker or Masker(mode, tuple(types or MASK_TYPES), aligned)
    out = []
    try:
        for i, path in enumerate(paths):
            orig = _decode(Path(path).read_bytes())
            result = masker.mask(orig, np.random.default_rng([seed, i]), spec=specs[i] if specs else None)
            if result is None:
                out.append((orig, orig, "no face"))
            else:
                out.append((orig, result.image, describe(result.meta)))
    finally:
        if own:
            masker.close()
    return out


def write_sheet(sheet: np.ndarray, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out}")
    tmp.replace(out)
