"""The content hashes a pack has written, for finding byte-identical duplicates in bounded memory.

A hash is 16 bytes (blake2b of the input file's bytes), kept as two uint64 words in sorted numpy runs
(24 bytes an image with its write position) plus a small dict of the newest: a Python set of 42M bytes
objects would take ~4 GB. Runs are merged like a binary counter up to `MAX_RUN` hashes, so a lookup
searches O(log N) runs below that size and N / MAX_RUN runs above it.
"""
from __future__ import annotations

import struct

import numpy as np

RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("pos", "<i8")])
FLUSH = 1 << 12  # the newest hashes as Python objects (~120 bytes each) before they become a run
# Runs stop growing at 2M hashes (48 MB): merging two halves of a 42M-hash set would need 2 GB at once;
# 21 runs cost a lookup 21 binary searches, a few percent of an image's time.
MAX_RUN = 1 << 21


def split(digest: bytes) -> tuple[int, int]:
    return struct.unpack(">QQ", digest)


class DigestSet:
    """digest -> write position of the first image with those bytes."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []  # each sorted by (hi, lo)
        self._recent: dict[bytes, int] = {}

    def get(self, digest: bytes) -> int:
        """The position of the first image with these bytes, or -1."""
        pos = self._recent.get(digest)
        if pos is not None:
            return pos
        hi, lo = split(digest)
        for run in self._runs:
            i = int(np.searchsorted(run["hi"], np.uint64(hi)))
            while i < len(run) and int(run["hi"][i]) == hi:
                if int(run["lo"][i]) == lo:
                    return int(run["pos"][i])
                i += 1
        return -1

    def add(self, digest: bytes, pos: int) -> None:
        self._recent[digest] = pos
        if len(self._recent) >= FLUSH:
            self._flush()

    def extend(self, records: np.ndarray) -> None:
        """Add `RECORD` rows whose digests are not in the set yet."""
        self._flush()
        if len(records):
            self._push(records)

    def _flush(self) -> None:
        if not self._recent:
            return
        rows = np.empty(len(self._recent), RECORD)
        pairs = np.array([split(d) for d in self._recent], dtype=np.uint64).reshape(-1, 2)
        rows["hi"], rows["lo"] = pairs[:, 0], pairs[:, 1]
        rows["pos"] = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        self._recent = {}
        self._push(rows)

    def _push(self, rows: np.ndarray) -> None:
        run = rows[np.lexsort((rows["lo"], rows["hi"]))]
        while self._runs and len(self._runs[-1]) <= 2 * len(run) and len(self._runs[-1]) + len(run) <= MAX_RUN:
            run = _merge(self._runs.pop(), run)
        self._runs.append(run)

    def find(self, records: np.ndarray) -> np.ndarray:
        """For each `RECORD` row, the position of the set's image with the same bytes, or -1."""
        self._flush()
        found = np.full(len(records), -1, np.int64)
        for run in self._runs:
            if not len(run):
                continue
            i = np.minimum(np.searchsorted(run["hi"], records["hi"]), len(run) - 1)
            for j in np.flatnonzero(run["hi"][i] == records["hi"]).tolist():  # rare: only real duplicates
                k = int(i[j])
                while k < len(run) and run["hi"][k] == records["hi"][j]:
                    if run["lo"][k] == records["lo"][j]:
                        found[j] = run["pos"][k]
                        break
                    k += 1
        return found


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two runs sorted by (hi, lo) as one, as a stable sort of a then b would give it.

    Each row of b goes straight to its place (issue N: a sort of the two runs concatenated held ~4 times
    the merged run at once, ~100 MB at 10^6 images; this holds the result and 8 bytes a row of b). Where
    a hash's high word is in both runs (never seen: 2^-64 a pair), the low words decide: sorted then."""
    place = np.searchsorted(a["hi"], b["hi"], side="left")
    inside = place < len(a)
    if np.any(a["hi"][place[inside]] == b["hi"][inside]):
        both = np.concatenate([a, b])
        return both[np.lexsort((both["lo"], both["hi"]))]
    place += np.arange(len(b))
    out = np.empty(len(a) + len(b), RECORD)
    out[place] = b
    rest = np.ones(len(out), bool)
    rest[place] = False
    out[rest] = a
    return out
