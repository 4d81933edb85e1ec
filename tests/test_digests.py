"""pipeline.digests: the first write position of each content hash, in one table sized at the start."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pipeline.digests import RECORD, DigestSet, split


def _rows(keys: list[bytes], positions) -> np.ndarray:
    rows = np.zeros(len(keys), RECORD)
    for j, k in enumerate(keys):
        rows["hi"][j], rows["lo"][j] = split(k)
    rows["pos"] = positions
    return rows


@pytest.mark.parametrize("capacity", [4, 200])  # 4: the table grows several times
def test_digest_set_finds_every_first_position(capacity):
    rng = np.random.default_rng(0)
    keys = [rng.bytes(16) for _ in range(200)]
    keys[5] = keys[5][:8] + keys[9][8:]  # same low word as another
    keys[6] = keys[9][:8] + keys[6][8:]  # same high word (same slot): told apart by the low word
    keys[7] = b"\0" * 16  # trailing zero bytes are part of the hash
    s = DigestSet(capacity)
    for pos, k in enumerate(keys):
        assert s.get(k) == -1
        s.add(k, pos)
    assert len(s) == 200
    assert all(s.get(k) == pos for pos, k in enumerate(keys))
    assert s.get(b"\0" * 15 + b"\1") == -1
    assert s.find(_rows([keys[6], rng.bytes(16), keys[199]], 0)).tolist() == [6, -1, 199]


def test_extend_keeps_the_first_of_repeats_and_what_the_set_holds():
    rng = np.random.default_rng(1)
    keys = [rng.bytes(16) for _ in range(500)]
    s = DigestSet(10)
    s.add(keys[3], 1000)
    s.extend(_rows(keys + keys[:50], np.arange(550)))  # repeats after their first
    assert len(s) == 500
    assert s.get(keys[3]) == 1000  # held before: not replaced
    assert all(s.get(k) == i for i, k in enumerate(keys) if i != 3)
    found = s.find(_rows(keys[:10] + [rng.bytes(16)], 0))
    assert found.tolist() == [0, 1, 2, 1000, 4, 5, 6, 7, 8, 9, -1]


def test_positions_must_fit_the_table():
    s = DigestSet(4)
    with pytest.raises(ValueError):
        s.add(b"\1" * 16, 2**32 - 1)
    with pytest.raises(ValueError):
        s.extend(_rows([b"\2" * 16], -1))


def test_a_sized_set_allocates_nothing_as_it_fills():
    """Issue N: the set's memory is the table made at the start, ~21 bytes an image; filling it copies
    nothing (sorted runs merged as they grew held up to 3 times the largest run at once)."""
    n = 100_000
    rng = np.random.default_rng(2)
    digests = [rng.bytes(16) for _ in range(n)]
    tracemalloc.start()
    try:
        s = DigestSet(n)
        table, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for pos, d in enumerate(digests):
            if s.get(d) < 0:
                s.add(d, pos)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table <= 22 * n
    assert peak - table < 64 * 1024
