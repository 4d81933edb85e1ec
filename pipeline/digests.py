"""The content hashes a pack has written, for finding byte-identical duplicates in bounded memory.

A hash is 16 bytes (blake2b of the input file's bytes; the `.hashes.npy` files of a pack's state keep all
16 as `RECORD` rows). In memory the set is one open-addressing table sized once for the images it will
hold (a pack knows them from its plan): a slot is the hash's high word, 4 bytes of its low word and the
write position (16 bytes), the table at most 3/4 full: ~21 bytes an image, allocated at the start and
never copied (issue N: sorted runs merged as they grew held up to 3 times the largest run at once, ~50 MB
at 10^6 images, and a Python set of 42M bytes objects would take ~4 GB). Two different images are taken
for the same when 96 bits of their hashes agree: at 42M images the chance of that anywhere is ~10^-14.
Positions are below 2^32 - 1 (4.29 billion images).
"""
from __future__ import annotations

import struct

import numpy as np

RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("pos", "<i8")])
EMPTY = np.uint32(0xFFFFFFFF)  # the position of a free slot
LOAD = 0.75  # the most a table is filled; past it (a caller that sized it too small) it doubles
_LOW32 = np.uint64(0xFFFFFFFF)


def split(digest: bytes) -> tuple[int, int]:
    return struct.unpack(">QQ", digest)


class DigestSet:
    """digest -> write position of the first image with those bytes."""

    def __init__(self, capacity: int = 1024) -> None:
        """`capacity`: how many digests it will hold (it grows past that, at the cost of a copy)."""
        self._alloc(max(8, int(capacity / LOAD) + 1))

    def _alloc(self, slots: int) -> None:
        self._hi = np.zeros(slots, np.uint64)
        self._lo = np.zeros(slots, np.uint32)
        self._pos = np.full(slots, EMPTY, np.uint32)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get(self, digest: bytes) -> int:
        """The position of the first image with these bytes, or -1."""
        hi, lo = split(digest)
        lo &= 0xFFFFFFFF
        slots = len(self._pos)
        i = hi % slots
        while True:
            p = int(self._pos[i])
            if p == EMPTY:
                return -1
            if int(self._hi[i]) == hi and int(self._lo[i]) == lo:
                return p
            i = i + 1 if i + 1 < slots else 0

    def add(self, digest: bytes, pos: int) -> None:
        """Record `pos` for a digest the set does not hold (`get` returned -1)."""
        if not 0 <= pos < EMPTY:
            raise ValueError(f"position {pos} is outside [0, 2^32 - 1)")
        self._reserve(1)
        hi, lo = split(digest)
        slots = len(self._pos)
        i = hi % slots
        while self._pos[i] != EMPTY:
            i = i + 1 if i + 1 < slots else 0
        self._hi[i], self._lo[i], self._pos[i] = hi, lo & 0xFFFFFFFF, pos
        self._count += 1

    def extend(self, records: np.ndarray) -> None:
        """Add the `RECORD` rows whose digests the set does not hold yet (of repeats among them, the first)."""
        if not len(records):
            return
        hi, lo = records["hi"].astype(np.uint64), (records["lo"].astype(np.uint64) & _LOW32).astype(np.uint32)
        new = self._lookup(hi, lo) < 0
        if not new.any():
            return
        _, first = np.unique(np.stack([hi[new], lo[new].astype(np.uint64)]), axis=1, return_index=True)
        rows = np.flatnonzero(new)[np.sort(first)]
        pos = records["pos"][rows]
        if len(pos) and (pos.min() < 0 or pos.max() >= EMPTY):
            raise ValueError("positions must be in [0, 2^32 - 1)")
        self._reserve(len(rows))
        self._insert(hi[rows], lo[rows], pos.astype(np.uint32))

    def find(self, records: np.ndarray) -> np.ndarray:
        """For each `RECORD` row, the position of the set's image with the same bytes, or -1."""
        lo = (records["lo"].astype(np.uint64) & _LOW32).astype(np.uint32)
        return self._lookup(records["hi"].astype(np.uint64), lo)

    def _slot(self, hi: np.ndarray) -> np.ndarray:
        return (hi % np.uint64(len(self._pos))).astype(np.int64)

    def _lookup(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        found = np.full(len(hi), -1, np.int64)
        slot = self._slot(hi)
        todo = np.arange(len(hi))
        while len(todo):  # one probe step for every row still looking
            s = slot[todo]
            p = self._pos[s]
            empty = p == EMPTY
            hit = ~empty & (self._hi[s] == hi[todo]) & (self._lo[s] == lo[todo])
            found[todo[hit]] = p[hit]
            todo = todo[~empty & ~hit]
            slot[todo] = (slot[todo] + 1) % len(self._pos)
        return found

    def _insert(self, hi: np.ndarray, lo: np.ndarray, pos: np.ndarray) -> None:
        """Place rows known to be absent and distinct: each takes the first free slot from its own."""
        slot = self._slot(hi)
        todo = np.arange(len(hi))
        while len(todo):
            s = slot[todo]
            free = self._pos[s] == EMPTY
            # Of the rows that reach the same free slot in this step, the first takes it.
            taken, first = np.unique(s[free], return_index=True)
            winners = todo[free][first]
            self._hi[taken], self._lo[taken], self._pos[taken] = hi[winners], lo[winners], pos[winners]
            placed = np.zeros(len(todo), bool)
            placed[np.flatnonzero(free)[first]] = True
            todo = todo[~placed]
            slot[todo] = (slot[todo] + 1) % len(self._pos)
        self._count += len(hi)

    def _reserve(self, more: int) -> None:
        if self._count + more <= LOAD * len(self._pos):
            return
        used = self._pos != EMPTY
        hi, lo, pos = self._hi[used], self._lo[used], self._pos[used]
        self._alloc(max(2 * len(self._pos), int((self._count + more) / LOAD) + 1))
        self._insert(hi, lo, pos)
