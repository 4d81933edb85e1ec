"""Issue O, one reproducer per finding: DALI crashing on a bad record, untyped errors, manifests that verify
passed but the readers lost data with, readers trusting the index and the labels, the two backends
disagreeing on corrupt images, errors that name no file, and bounded reader memory."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from bench.fuzz import pack_small
from pipeline.dataset import PackedDataset, TorchTrainLoader
from pipeline.manifest import ManifestError, load_manifest, write_manifest
from pipeline.record_check import BadRecord, RecordRules, check_shard
from pipeline.recordio import RecordIO, RecordIOError, read_index
from pipeline.verify import VerifyError, verify
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEN_MASK = (1 << 29) - 1


@pytest.fixture(autouse=True)
def shard_check_cache(tmp_path, monkeypatch):
    """The DALI reader's shard checks are cached per test, not in the home folder."""
    monkeypatch.setenv("FACETRAIN_CACHE", str(tmp_path / "shard-check-cache"))


@pytest.fixture(scope="module")
def small(glint24, tmp_path_factory):
    """80 glint24 faces of 20 identities: 60 in 4 train shards, 20 held out."""
    return pack_small(tmp_path_factory.mktemp("faults") / "d", per_identity=4, shard_mb=0.1, glint24=glint24)


@pytest.fixture()
def copy(small, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(small, data)
    return data, load_manifest(data)


def _offsets(data, shard) -> list[int]:
    return sorted(read_index(data / shard["idx"])[1])


def _edit_rec(data, shard, edit, record: int = 2) -> None:
    """`edit(buf, offset)` the `record`-th record (in file order) of `shard`."""
    rec = data / shard["rec"]
    buf = bytearray(rec.read_bytes())
    edit(buf, _offsets(data, shard)[record])
    rec.write_bytes(bytes(buf))


def _image_span(buf, offset) -> tuple[int, int]:
    length = struct.unpack_from("<I", buf, offset + 4)[0] & LEN_MASK
    flag = struct.unpack_from("<I", buf, offset + 8)[0]
    return offset + 8 + 24 + 4 * flag, offset + 8 + length


def _verify_cli(data) -> subprocess.CompletedProcess:
    proc = run_cli("pipeline", "verify", str(data), "--no-progress", check=False)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 1, proc.stderr
    return proc


_DALI = """
import json, sys
from pipeline.dali_reader import DaliTrainLoader
loader = DaliTrainLoader(sys.argv[1], batch_size=16, drop_last=False, shuffle=False, augment={"flip": False},
                         initial_fill=16, num_threads=1, decode_check=sys.argv[2] == "1")
labels = [y for _, ys in loader for y in ys.tolist()]
print(json.dumps({"n": len(labels), "skipped": loader.skipped_records, "max": max(labels)}))
"""


def _dali(data, decode_check: bool = False) -> dict:
    """One DALI (CPU) epoch in a subprocess, so that a segfault fails the test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", _DALI, str(data), str(int(decode_check))], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "FACETRAIN_CACHE": "off", "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, f"DALI reader exited {proc.returncode}: {proc.stderr[-1500:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_epoch(data) -> tuple[int, int, int]:
    loader = TorchTrainLoader(data, 16, drop_last=False, shuffle=False, num_workers=0)
    labels = [y for _, ys in loader for y in ys.tolist()]
    return len(labels), loader.skipped_records, max(labels)


# ---------------------------------------------------------------------------------------- issue 2, 6
def _zero_header(buf, o):
    buf[o:o + 100] = bytes(100)


def _flag_100(buf, o):
    struct.pack_into("<I", buf, o + 8, 100)


def _long_length(buf, o):
    struct.pack_into("<I", buf, o + 4, struct.unpack_from("<I", buf, o + 4)[0] + 64)


def _length_into_next(buf, o):
    """8 bytes longer: the image still ends with EOI within its last 16 bytes, but runs into the next record."""
    struct.pack_into("<I", buf, o + 4, struct.unpack_from("<I", buf, o + 4)[0] + 8)


def _zero_jpeg(buf, o):
    start, end = _image_span(buf, o)
    buf[start:end] = bytes(end - start)


def _cut_jpeg_end(buf, o):
    start, end = _image_span(buf, o)
    buf[end - 32:end] = bytes(32)


def _label_999(buf, o):
    struct.pack_into("<f", buf, o + 12, 999.0)


CORRUPTIONS = [_zero_header, _flag_100, _long_length, _zero_jpeg, _cut_jpeg_end, _label_999, _length_into_next]


@pytest.mark.parametrize("corrupt", CORRUPTIONS[:3], ids=lambda f: f.__name__)
def test_dali_leaves_out_a_record_with_a_bad_header_instead_of_crashing(copy, corrupt):
    data, m = copy
    _edit_rec(data, m["shards"][1], corrupt)
    got = _dali(data)
    assert got == {"n": m["num_images"] - 1, "skipped": 1, "max": got["max"]} and got["max"] < m["num_classes"]


def test_both_backends_skip_and_count_the_same_corrupt_records(copy):
    data, m = copy
    for k, corrupt in enumerate(CORRUPTIONS):
        _edit_rec(data, m["shards"][k % len(m["shards"])], corrupt, record=2 + 3 * (k // len(m["shards"])))
    n, skipped, top = _torch_epoch(data)
    assert (n, skipped) == (m["num_images"], len(CORRUPTIONS)) and top < m["num_classes"]
    got = _dali(data)
    assert (got["n"], got["skipped"]) == (m["num_images"] - len(CORRUPTIONS), len(CORRUPTIONS))
    assert got["max"] < m["num_classes"]
    proc = _verify_cli(data)
    assert proc.returncode == 1 and m["shards"][0]["rec"] in proc.stderr


def _corrupt_scan(buf, o):
    """Markers whole, scan data zeroed: only a decoder finds it."""
    start, end = _image_span(buf, o)
    mid = (start + end) // 2
    buf[mid:mid + 400] = bytes(400)


def test_dali_with_decode_check_skips_what_the_torch_reader_skips(copy):
    data, m = copy
    _edit_rec(data, m["shards"][1], _corrupt_scan)
    _edit_rec(data, m["shards"][3], _zero_jpeg)
    n, skipped, _ = _torch_epoch(data)
    assert (n, skipped) == (m["num_images"], 2)
    got = _dali(data, decode_check=True)
    assert (got["n"], got["skipped"]) == (m["num_images"] - 2, 2)


def test_dali_counts_its_share_of_left_out_records_per_rank_and_epoch(copy):
    from pipeline.dali_reader import DaliTrainLoader

    data, m = copy
    for shard in m["shards"][:3]:
        _edit_rec(data, shard, _zero_jpeg)
    loaders = [DaliTrainLoader(data, 4, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(2):
        for loader in loaders:
            for _ in loader:
                pass
    assert sum(loader.skipped_records for loader in loaders) == 2 * 3
    state = loaders[0].state_dict()
    again = DaliTrainLoader(data, 4, rank=0, world_size=2, seed=1)
    again.load_state_dict(state)
    assert again.skipped_records == loaders[0].skipped_records


# ---------------------------------------------------------------------------------------- issue 3, 4
def _manifest_edit(data, edit) -> None:
    obj = json.loads((data / "manifest.json").read_text())
    edit(obj)
    (data / "manifest.json").write_text(json.dumps(obj))


MANIFEST_EDITS = {
    "label_fields_empty": lambda m: m.update(label_fields=[]),
    "split_fields_alone": lambda m: m.update(label_fields=["identity_hi", "identity_lo"]),
    "rec_a_number": lambda m: m["shards"][0].update(rec=7),
    "kind_trais": lambda m: m["shards"][1].update(kind="trais"),
    "kind_missing": lambda m: m["shards"][1].pop("kind"),
    "count_a_string": lambda m: m["shards"][0].update(count="15"),
    "count_off_by_one": lambda m: m["shards"][0].update(count=m["shards"][0]["count"] + 1),
    "num_classes_float": lambda m: m.update(num_classes=20.0),
    "shard_listed_twice": lambda m: m["shards"].append(dict(m["shards"][0])),
    "holdout_shard_as_train": lambda m: m["holdout"]["shards"][0].update(kind="train"),
    "rec_outside_the_folder": lambda m: m["shards"][0].update(rec="../" + m["shards"][0]["rec"]),
    "sha_missing": lambda m: m["shards"][2].pop("idx_sha256"),
    "top_level_list": lambda m: (m.clear(), m.update(shards="x")),
}


@pytest.mark.parametrize("name", sorted(MANIFEST_EDITS))
def test_a_malformed_manifest_is_a_typed_error_naming_it_everywhere(copy, name):
    data, _ = copy
    _manifest_edit(data, MANIFEST_EDITS[name])
    for reader in (load_manifest, PackedDataset):
        with pytest.raises(ManifestError, match="manifest.json"):
            reader(data)
    proc = _verify_cli(data)
    assert proc.returncode == 1 and "manifest.json" in proc.stderr


@pytest.mark.parametrize("raw", [b"\xff\xfe{", b'{"version": 1, "x": "\xc3"}', b"[" * 100_000 + b"]" * 100_000,
                                 b'{"version": 1, "num_classes": NaN}', b"[]"])
def test_manifest_bytes_that_are_no_json_object_are_a_typed_error(copy, raw):
    data, _ = copy
    (data / "manifest.json").write_bytes(raw)
    with pytest.raises(ManifestError, match="manifest.json"):
        PackedDataset(data)
    assert _verify_cli(data).returncode == 1


@pytest.mark.parametrize("value", [str(2 ** 63), str(2 ** 64), "-8", "1e3", "٣"])
def test_an_index_number_out_of_range_is_a_typed_error_naming_the_index(copy, value):
    data, m = copy
    idx = data / m["shards"][0]["idx"]
    lines = idx.read_text().splitlines()
    key, _ = lines[3].split("\t")
    lines[3] = f"{key}\t{value}"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=m["shards"][0]["idx"]):
        PackedDataset(data)
    proc = _verify_cli(data)
    assert proc.returncode == 1 and m["shards"][0]["idx"] in proc.stderr


def test_labels_that_do_not_fit_the_label_fields_are_skipped_by_readers_and_fail_verify(copy):
    """`label_fields` naming the split identity while the records carry one scalar label: verify names the
    shard; the reader refuses every record (typed) instead of raising IndexError per item."""
    data, m = copy
    _manifest_edit(data, lambda o: o.update(label_fields=["identity", "identity_hi", "identity_lo"]))
    proc = _verify_cli(data)
    assert proc.returncode == 1 and m["shards"][0]["rec"] in proc.stderr
    ds = PackedDataset(data)
    with pytest.raises(BadRecord, match=m["shards"][0]["rec"]):
        ds[0]
    with pytest.raises(RecordIOError, match="no record"):
        _torch_epoch(data)


# ---------------------------------------------------------------------------------------- issue 5, 9
@pytest.mark.parametrize("edit", ["delete", "duplicate", "repeat_offset"])
def test_readers_check_the_index_against_the_manifest_at_start(copy, edit):
    from pipeline.dali_reader import DaliTrainLoader

    data, m = copy
    idx = data / m["shards"][2]["idx"]
    lines = idx.read_text().splitlines()
    if edit == "delete":
        del lines[4]
    elif edit == "duplicate":
        lines.insert(6, lines[4])
    else:  # the count still holds, but one record would be read twice and another never
        lines[5] = lines[5].split("\t")[0] + "\t" + lines[4].split("\t")[1]
    idx.write_text("\n".join(lines) + "\n")
    for reader in (PackedDataset, lambda d: DaliTrainLoader(d, 8, drop_last=False)):
        with pytest.raises(RecordIOError, match=m["shards"][2]["idx"]):
            reader(data)
    proc = _verify_cli(data)
    assert proc.returncode == 1 and m["shards"][2]["idx"] in proc.stderr


def test_an_out_of_range_label_is_skipped_and_counted(copy):
    data, m = copy
    _edit_rec(data, m["shards"][0], _label_999)
    ds = PackedDataset(data)
    with pytest.raises(BadRecord, match="identity 999"):
        ds[2]  # shard 0 comes first, its records in file order
    n, skipped, top = _torch_epoch(data)
    assert (n, skipped) == (m["num_images"], 1) and top < m["num_classes"]
    proc = _verify_cli(data)
    assert proc.returncode == 1 and "identity 999" in proc.stderr


def test_a_truncated_shard_is_an_error_naming_it(copy, tmp_path):
    data, m = copy
    rec = data / m["shards"][1]["rec"]
    rec.write_bytes(rec.read_bytes()[:-200])
    with pytest.raises(RecordIOError, match=m["shards"][1]["rec"]):
        PackedDataset(data)
    with pytest.raises(VerifyError, match=m["shards"][1]["rec"]):
        verify(data, progress=False)
    lone = tmp_path / "lone.rec"
    lone.write_bytes(rec.read_bytes())
    offset = _offsets(data, m["shards"][1])[-1]
    with RecordIO(lone, "r") as r, pytest.raises(RecordIOError, match="lone.rec"):
        r.read_at(offset)


def test_verify_catches_an_index_edit_that_keeps_every_offset(copy):
    """Two keys swapped: every offset is still a record, but `read_idx(key)` returns the other record."""
    data, m = copy
    idx = data / m["shards"][0]["idx"]
    lines = [line.split("\t") for line in idx.read_text().splitlines()]
    lines[1][0], lines[2][0] = lines[2][0], lines[1][0]
    idx.write_text("".join("\t".join(parts) + "\n" for parts in lines))
    proc = _verify_cli(data)
    assert proc.returncode == 1 and m["shards"][0]["idx"] in proc.stderr


# ---------------------------------------------------------------------------------------- cache, memory
def test_shard_check_is_cached_until_the_shard_changes(copy, tmp_path, monkeypatch):
    import pipeline.record_check as rc

    data, m = copy
    monkeypatch.setenv("FACETRAIN_CACHE", str(tmp_path / "cache"))
    rules = RecordRules.from_manifest(m)
    first = check_shard(data, m["shards"][0], rules)
    assert first.bad == 0 and len(first.offsets) == m["shards"][0]["count"]
    scans = []
    real = rc._scan_shard
    monkeypatch.setattr(rc, "_scan_shard", lambda *a: scans.append(1) or real(*a))
    again = check_shard(data, m["shards"][0], rules)
    assert not scans and np.array_equal(again.offsets, first.offsets)
    _edit_rec(data, m["shards"][0], _zero_jpeg)
    changed = check_shard(data, m["shards"][0], rules)
    assert scans and changed.bad == 1 and "train-00000.rec at byte" in changed.first_bad


def test_reader_index_memory_is_bounded_per_record(tmp_path):
    """A 200k-record shard index costs the reader ~16 bytes a record (issue N), not Python tuples."""
    n = 200_000
    data = tmp_path / "big"
    data.mkdir()
    with open(data / "train-00000.rec", "wb") as f:
        f.truncate(n * 64)
    offsets = np.arange(n, dtype=np.int64) * 64
    (data / "train-00000.idx").write_bytes(b"".join(b"%d\t%d\n" % (i, o) for i, o in enumerate(offsets.tolist())))
    write_manifest(data, {"version": 1, "image_size": [112, 112], "num_images": n, "num_classes": 10,
                          "label_fields": ["identity"],
                          "shards": [{"rec": "train-00000.rec", "idx": "train-00000.idx", "count": n, "kind": "train",
                                      "bytes": n * 64, "sha256": "0" * 64, "idx_sha256": "0" * 64}]})
    tracemalloc.start()
    ds = PackedDataset(data)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ds) == n
    assert held < 40 * n and peak < 100 * n, (held / n, peak / n)
