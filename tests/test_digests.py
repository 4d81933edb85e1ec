"""pipeline.digests: the first write position of each content hash, in bounded runs."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import digests
from pipeline.digests import RECORD, DigestSet, _merge, split


def test_digest_set_finds_every_first_position_across_runs(monkeypatch):
    monkeypatch.setattr(digests, "FLUSH", 7)
    monkeypatch.setattr(digests, "MAX_RUN", 20)
    rng = np.random.default_rng(0)
    keys = [rng.bytes(16) for _ in range(200)]
    keys[5] = keys[5][:8] + keys[9][8:]  # same low word as another
    keys[6] = keys[9][:8] + keys[6][8:]  # same high word: found by the low word
    keys[7] = b"\0" * 16  # trailing zero bytes are part of the hash
    s = DigestSet()
    for pos, k in enumerate(keys):
        assert s.get(k) == -1
        s.add(k, pos)
    assert all(s.get(k) == pos for pos, k in enumerate(keys))
    assert s.get(b"\0" * 15 + b"\1") == -1
    assert max(len(r) for r in s._runs) <= 20 and len(s._runs) >= 10
    rows = np.zeros(3, RECORD)
    for j, k in enumerate([keys[6], rng.bytes(16), keys[199]]):
        rows["hi"][j], rows["lo"][j] = split(k)
    assert s.find(rows).tolist() == [6, -1, 199]


@pytest.mark.parametrize("tied", [False, True])
def test_merging_two_runs_is_a_stable_sort_of_both(tied):
    rng = np.random.default_rng(1)
    a, b = np.empty(500, RECORD), np.empty(300, RECORD)
    for rows in (a, b):
        rows["hi"] = rng.integers(0, 50 if tied else 2**63, len(rows), dtype=np.uint64)
        rows["lo"] = rng.integers(0, 2**63, len(rows), dtype=np.uint64)
        rows["pos"] = rng.integers(0, 10**6, len(rows))
    a, b = (r[np.lexsort((r["lo"], r["hi"]))] for r in (a, b))
    both = np.concatenate([a, b])
    assert _merge(a, b).tobytes() == both[np.lexsort((both["lo"], both["hi"]))].tobytes()
