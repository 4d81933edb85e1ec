"""`python -m pipeline verify`: every frame, index entry, count, label and checksum of a packed dataset.

Memory stays bounded for any dataset size: per shard, arrays of its offsets; across the dataset, one
uint64 array of record ids (8 bytes a record) for the uniqueness check."""
from __future__ import annotations

import hashlib
import struct
from array import array
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .imageio import decode_jpeg_rgb
from .manifest import MANIFEST, ManifestError, load_manifest
from .record_check import BadRecord, RecordRules, check_payload, load_shard_index
from .recordio import IR_SIZE, RELEASE_BYTES, RecordIOError, map_file, read_frame, release_behind


class VerifyError(RuntimeError):
    """The first thing found wrong, naming the shard and byte offset where there is one."""


def _all_shards(manifest: dict) -> list[dict]:
    return list(manifest["shards"]) + [s for split in ("holdout", "val") for s in manifest.get(split, {}).get("shards", [])]


def verify(data_dir: str | Path, decode: bool = False, progress: bool = True) -> dict:
    """Raise VerifyError at the first fault; return counts when everything holds."""
    data_dir = Path(data_dir)
    try:
        manifest = load_manifest(data_dir)
    except ManifestError as e:
        raise VerifyError(str(e)) from None
    rules = RecordRules.from_manifest(manifest)
    shards = _all_shards(manifest)
    total_bytes = sum(s["bytes"] for s in shards)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="verify", disable=not progress)
    ids: list[np.ndarray] = []
    try:
        for shard in shards:
            try:
                ids.append(_verify_shard(data_dir, shard, rules, decode, bar))
            except OSError as e:
                raise VerifyError(f"{e.filename or shard['rec']}: {e.strerror or e}") from None
    finally:
        bar.close()
    _check_unique_ids(ids, shards)
    skipped = manifest.get("skipped")
    if skipped and skipped.get("file"):
        path = data_dir / skipped["file"]
        if not path.is_file():
            raise VerifyError(f"{path.name} (the list of skipped inputs that {MANIFEST} names) is missing")
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        if lines != skipped["count"]:
            raise VerifyError(f"{path.name} lists {lines} skipped inputs; the manifest counts {skipped['count']}")
    return {"shards": len(shards), "records": int(sum(len(a) for a in ids)), "bytes": total_bytes}


def _check_unique_ids(ids: list[np.ndarray], shards: list[dict]) -> None:
    if not ids:
        return
    every = np.sort(np.concatenate(ids))
    twice = every[1:][every[1:] == every[:-1]]
    if len(twice):
        rid = twice[0]
        where = [s["rec"] for s, a in zip(shards, ids) if (a == rid).any()]
        raise VerifyError(f"{where[0]}: record id {int(rid)} appears twice in the dataset "
                          f"(in {', '.join(where)})")


def _verify_shard(data_dir: Path, shard: dict, rules: RecordRules, decode: bool, bar) -> np.ndarray:
    """Check one shard; return the ids of its records."""
    rec_path, idx_path = data_dir / shard["rec"], data_dir / shard["idx"]
    name = shard["rec"]
    for p in (rec_path, idx_path):
        if not p.is_file():
            raise VerifyError(f"{p.name}: missing (listed in {MANIFEST})")
    try:  # the readers' own check of the shard's size and index (pipeline/record_check.py)
        _, offsets = load_shard_index(data_dir, shard)
    except RecordIOError as e:
        raise VerifyError(str(e)) from None
    ids = array("Q")
    scanned = array("q")
    with map_file(rec_path) as buf, memoryview(buf) as view:
        size = len(buf)
        sha = hashlib.sha256()
        pos = hashed = released = 0
        while pos < size:
            try:
                payload, nxt = read_frame(buf, pos)
                check_payload(payload, rules)
            except (RecordIOError, BadRecord) as e:
                raise VerifyError(f"{name} at byte {pos}: {e}") from None
            if decode:
                _decode(payload, f"{name} at byte {pos}")
            ids.append(struct.unpack_from("<Q", payload, 8)[0])  # IRHeader.id
            scanned.append(pos)
            bar.update(nxt - pos)
            pos = nxt
            if pos - hashed >= RELEASE_BYTES:  # hashed as read, so that the pages read can be dropped
                sha.update(view[hashed:pos])
                hashed = pos
                released = release_behind(buf, released, pos)
        sha.update(view[hashed:size])
        sha = sha.hexdigest()
    if sha != shard["sha256"]:
        raise VerifyError(f"{name}: sha256 {sha[:16]}... differs from the manifest's {shard['sha256'][:16]}...")
    with open(idx_path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != shard["idx_sha256"]:
            raise VerifyError(f"{shard['idx']}: sha256 differs from the manifest's (the index was edited)")
    if len(scanned) != shard["count"]:
        raise VerifyError(f"{name}: {len(scanned)} records, the manifest says {shard['count']}")
    if len(offsets) != shard["count"]:
        raise VerifyError(f"{shard['idx']}: {len(offsets)} entries, the manifest says {shard['count']}")
    scanned_arr = np.frombuffer(scanned, dtype=np.int64) if scanned else np.zeros(0, np.int64)
    order = np.sort(offsets)
    if not np.array_equal(order, scanned_arr):
        bad = np.setxor1d(order, scanned_arr)
        first = int(bad[0]) if len(bad) else int(order[np.flatnonzero(order[1:] == order[:-1])[0]])
        raise VerifyError(f"{shard['idx']}: index and {name} disagree (first differing offset {first})")
    return np.frombuffer(ids, dtype=np.uint64).copy() if ids else np.zeros(0, np.uint64)


def _decode(payload: bytes, where: str) -> None:
    flag = struct.unpack_from("<I", payload, 0)[0]
    try:
        decode_jpeg_rgb(payload[IR_SIZE + 4 * flag:])
    except Exception as e:  # any failure of a decoder on these bytes means the image does not decode
        raise VerifyError(f"{where}: image does not decode ({e})") from None
