"""`python -m pipeline verify`: every frame, index entry, count and checksum of a packed dataset."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm

from .imageio import ImageRejected, decode_jpeg_rgb
from .manifest import ManifestError, decode_identity, load_manifest
from .recordio import RecordIOError, map_file, read_frame, read_index, unpack_record


class VerifyError(RuntimeError):
    """The first thing found wrong, naming the shard and byte offset where there is one."""


def _all_shards(manifest: dict) -> list[dict]:
    return list(manifest["shards"]) + list(manifest.get("holdout", {}).get("shards", []))


def verify(data_dir: str | Path, decode: bool = False, progress: bool = True) -> dict:
    """Raise VerifyError at the first fault; return counts when everything holds."""
    data_dir = Path(data_dir)
    try:
        manifest = load_manifest(data_dir)
    except ManifestError as e:
        raise VerifyError(str(e)) from None
    fields = manifest["label_fields"]
    num_classes = manifest["num_classes"]
    shards = _all_shards(manifest)
    total_bytes = sum((data_dir / s["rec"]).stat().st_size for s in shards if (data_dir / s["rec"]).is_file())
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="verify", disable=not progress)
    ids: set[int] = set()
    counted = {"train": 0, "other": 0}
    try:
        for shard in shards:
            _verify_shard(data_dir, shard, fields, num_classes, ids, decode, bar)
            counted["train" if shard in manifest["shards"] else "other"] += shard["count"]
    finally:
        bar.close()
    if counted["train"] != manifest["num_images"]:
        raise VerifyError(f"manifest says num_images={manifest['num_images']} but its shards hold {counted['train']}")
    skipped = manifest.get("skipped")
    if skipped and skipped.get("file"):
        path = data_dir / skipped["file"]
        if not path.is_file():
            raise VerifyError(f"{path.name} (the list of skipped inputs) is missing")
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        if lines != skipped["count"]:
            raise VerifyError(f"{path.name} lists {lines} skipped inputs; the manifest counts {skipped['count']}")
    return {"shards": len(shards), "records": len(ids), "bytes": total_bytes}


def _verify_shard(data_dir: Path, shard: dict, fields: list, num_classes: int, ids: set, decode: bool, bar) -> None:
    rec_path, idx_path = data_dir / shard["rec"], data_dir / shard["idx"]
    name = shard["rec"]
    for p in (rec_path, idx_path):
        if not p.is_file():
            raise VerifyError(f"{p.name}: missing")
    if "bytes" in shard and rec_path.stat().st_size != shard["bytes"]:
        raise VerifyError(f"{name}: {rec_path.stat().st_size} bytes, the manifest says {shard['bytes']} "
                          f"(truncated or appended to)")
    try:
        keys, offsets = read_index(idx_path)
    except RecordIOError as e:
        raise VerifyError(f"{shard['idx']}: {e}") from None
    with map_file(rec_path) as buf:
        size = len(buf)
        sha = hashlib.sha256(buf).hexdigest()
        scanned: list[int] = []
        pos = 0
        while pos < size:
            try:
                payload, nxt = read_frame(buf, pos)
                header, image = unpack_record(payload)
            except RecordIOError as e:
                raise VerifyError(f"{name} at byte {pos}: {e}") from None
            identity = int(decode_identity(header.label, fields))
            if not 0 <= identity < num_classes:
                raise VerifyError(f"{name} at byte {pos}: identity {identity} outside [0, {num_classes})")
            if header.id in ids:
                raise VerifyError(f"{name} at byte {pos}: record id {header.id} appears twice in the dataset")
            ids.add(header.id)
            if not image:
                raise VerifyError(f"{name} at byte {pos}: record has no image")
            if decode:
                try:
                    decode_jpeg_rgb(image)
                except ImageRejected as e:
                    raise VerifyError(f"{name} at byte {pos}: {e}") from None
            scanned.append(pos)
            bar.update(nxt - pos)
            pos = nxt
    if sha != shard["sha256"]:
        raise VerifyError(f"{name}: sha256 {sha[:16]}... differs from the manifest's {shard['sha256'][:16]}...")
    if "idx_sha256" in shard:
        with open(idx_path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != shard["idx_sha256"]:
                raise VerifyError(f"{shard['idx']}: sha256 differs from the manifest's")
    if len(scanned) != shard["count"]:
        raise VerifyError(f"{name}: {len(scanned)} records, the manifest says {shard['count']}")
    if len(set(keys)) != len(keys):
        raise VerifyError(f"{shard['idx']}: duplicate keys")
    if sorted(offsets) != scanned:
        bad = sorted(set(offsets) ^ set(scanned))
        raise VerifyError(f"{shard['idx']}: index and {name} disagree "
                          f"(first differing offset {bad[0] if bad else '?'})")
