"""Shards of a packed dataset on disk: `<prefix>-NNNNN.rec/.idx` pairs, cut at a size, each renamed into
place whole with its manifest entry (docs/design.md, "A packed dataset is a folder"). Used by
`pipeline pack` and `maskgen build`; the record framing itself is `pipeline.recordio`'s."""
from __future__ import annotations

import hashlib
import os
import struct
from array import array
from pathlib import Path

from .atomic import atomic_write_bytes, fsync_dir
from .recordio import MAGIC, MAX_RECORD, RecordIO, format_index, unpack_record


class ShardWriter:
    """Writes `<prefix>-NNNNN.rec/.idx` under temporary names; `finish()` renames a full shard into place."""

    def __init__(self, out: Path, prefix: str, max_bytes: int, first_index: int = 0) -> None:
        self.out, self.prefix, self.max_bytes = out, prefix, max_bytes
        self.index = first_index
        self._rec = None

    def _names(self) -> tuple[str, str]:
        return f"{self.prefix}-{self.index:05d}.rec", f"{self.prefix}-{self.index:05d}.idx"

    def _open(self) -> None:
        rec, _ = self._names()
        self._rec = open(self.out / (rec + ".partial"), "wb")
        self._sha = hashlib.sha256()
        # 16 bytes a record (a Python list of ints would be 72): a 1 GB shard holds ~200k small JPEGs.
        self._keys = array("q")
        self._offsets = array("q")
        self._pos = 0

    def add(self, key: int, framed: bytes) -> bool:
        """Append a framed record; True when the shard reached its size and should be finished."""
        if self._rec is None:
            self._open()
        self._rec.write(framed)
        self._sha.update(framed)
        self._keys.append(key)
        self._offsets.append(self._pos)
        self._pos += len(framed)
        return self._pos >= self.max_bytes

    @property
    def pending(self) -> bool:
        return self._rec is not None

    def finish(self, kind: str) -> dict:
        """Close the shard, put it in place, and return its manifest entry."""
        rec, idx = self._names()
        self._rec.flush()
        os.fsync(self._rec.fileno())
        self._rec.close()
        idx_bytes = format_index(self._keys, self._offsets)
        atomic_write_bytes(self.out / idx, idx_bytes)
        os.replace(self.out / (rec + ".partial"), self.out / rec)
        fsync_dir(self.out)
        entry = {"rec": rec, "idx": idx, "count": len(self._keys), "kind": kind, "bytes": self._pos,
                 "sha256": self._sha.hexdigest(), "idx_sha256": hashlib.sha256(idx_bytes).hexdigest()}
        self._rec = None
        self.index += 1
        return entry

    def abandon(self) -> None:
        if self._rec is not None:
            self._rec.close()
            self._rec = None


def read_record_image(path: str | os.PathLike, offset: int) -> bytes:
    """The image bytes of the record at `offset` of a `.rec`, read with pread: a map of the file kept for a
    worker's life would hold every page it touched in the worker's RSS (the whole file, by the end)."""
    with open(path, "rb") as f:
        head = os.pread(f.fileno(), 8, offset)
        if len(head) == 8:
            magic, lrec = struct.unpack("<II", head)
            if magic == MAGIC and lrec >> 29 == 0:  # a record in one part: its length is all we need
                return unpack_record(os.pread(f.fileno(), lrec & (MAX_RECORD - 1), offset + 8))[1]
    with RecordIO(path, "r") as r:  # split at a magic word (or malformed): the framing code says
        return unpack_record(r.read_at(offset))[1]
