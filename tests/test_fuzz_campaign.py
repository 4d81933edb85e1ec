"""The issue-O fuzz campaign in CI (bench/fuzz.py holds the engine and the longer run): seeded mutations of
the .rec, .idx and manifest files of a small packed set through verify (and its CLI), PackedDataset, the
torch loader and the DALI CPU reader (in subprocess batches). Every variant either passes verify and reads
back exactly the clean records, or verify exits 1 naming a file and the readers raise typed errors naming
a file or skip and count: no untyped exception, no crash, no silent data change."""
from __future__ import annotations

import pytest

from bench.fuzz import pack_small, run_campaign, run_dali

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = 3000
DALI_EVERY = 50  # 60 variants through DALI: a pipeline build each


@pytest.fixture(scope="module")
def small(glint24, tmp_path_factory):
    return pack_small(tmp_path_factory.mktemp("fuzz") / "d", per_identity=4, shard_mb=0.1, glint24=glint24)


def test_fuzz_campaign_finds_nothing(small, monkeypatch):
    monkeypatch.setenv("FACETRAIN_CACHE", "off")  # files rewritten within one mtime tick
    tally, passed = run_campaign(small, VARIANTS, seed=0, torch_every=25, cli_every=10)
    run_dali(small, list(range(0, VARIANTS, DALI_EVERY)), set(passed), 0, tally)
    c = tally.counts
    assert tally.findings == 0, {k: c[k] for k in ("untyped", "unnamed", "harmful", "crash")} | tally.examples
    assert c["verify_passed"] + c["verify_rejected"] == VARIANTS
    # The mutations reach every outcome, so the zero above means something.
    assert c["verify_passed"] > 50 and c["verify_rejected"] > VARIANTS // 2
    assert c["reader_typed"] > 300 and c["reader_skipped"] > 100 and c["reader_read"] > 300
    assert c["torch_skipped"] > 0 and c["torch_typed"] > 0 and c["cli_checked"] == VARIANTS // 10
    assert c["dali_read"] + c["dali_typed"] == VARIANTS // DALI_EVERY and c["dali_typed"] > 0
    assert c["dali_skipped"] > 0
