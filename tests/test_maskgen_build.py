"""`maskgen build` on real packed data: the contract of docs/design.md section 1 (masked shards, label vector,
ids and id2, manifest), stratified seeded choice, re-runs that replace, interruptions that leave the
dataset as it was, and the preview and folder commands."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from maskgen import build as build_mod
from maskgen.build import LABEL_FIELDS, BuildOptions, Source, build, choose
from maskgen.shapes import MASK_TYPES
from pipeline.dataset import PackedDataset
from pipeline.manifest import load_manifest
from pipeline.recordio import IndexedRecordIO, unpack_record
from pipeline.verify import verify

from ._maskgen_helpers import small_image_folder
from .conftest import REPO, run_cli

IDENTITIES, PER_IDENTITY = 4, 6


@pytest.fixture(scope="module")
def small_packed(glint24, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("maskgen")
    faces = small_image_folder(glint24, root, IDENTITIES, PER_IDENTITY)
    out = root / "data"
    run_cli("pipeline", "pack", str(faces), "--out", str(out), "--workers", "1", "--no-progress")
    return out


@pytest.fixture
def data(small_packed, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(small_packed, dst)
    return dst


def _records(data: Path, kind: str) -> list:
    m = load_manifest(data)
    out = []
    for s in m["shards"]:
        if s.get("kind", "train") != kind:
            continue
        with IndexedRecordIO(data / s["idx"], data / s["rec"], "r") as r:
            for key in r.keys:
                header, img = unpack_record(r.read_idx(key))
                out.append((key, header, img))
    return out


def _files(data: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.iterdir()) if p.is_file()}


def test_choose_is_stratified_seeded_and_order_free():
    sources = [Source(0, i, i, i % 5 if i < 90 else 5, (float(i % 5),)) for i in range(100)]
    picked = choose(sources, 0.1, seed=1)
    assert len(picked) == 10
    per = Counter(s.identity for s in picked)
    assert all(per[k] in (1, 2) for k in range(5))  # 18 each: 1.8 -> 1 or 2
    assert per[5] <= 1  # 10 images: 1.0
    assert [s.id for s in choose(list(reversed(sources)), 0.1, seed=1)] == [s.id for s in picked]
    assert {s.id for s in choose(sources, 0.1, seed=2)} != {s.id for s in picked}
    assert len(choose(sources, 1.0, seed=0)) == 100
    with pytest.raises(build_mod.BuildError):
        choose(sources, 0.0, seed=0)


@pytest.mark.slow
def test_build_adds_masked_shards_by_the_contract(data):
    before = load_manifest(data)
    train = _records(data, "train")
    proc = run_cli("maskgen", "build", "--data", str(data), "--ratio", "0.25", "--seed", "3", "--workers", "1",
                   "--no-progress")
    assert "masked 6 of 24 images" in proc.stdout
    verify(data, decode=True, progress=False)
    m = load_manifest(data)
    fields = m["label_fields"]
    assert fields[:len(before["label_fields"])] == before["label_fields"]
    assert all(f in fields for f in LABEL_FIELDS)
    masked = _records(data, "masked")
    assert len(masked) == 6 == m["maskgen"]["count"]
    assert m["num_images"] == len(train) + 6
    by_id = {h.id: (h, img) for _, h, img in train}
    per_identity = Counter()
    ids = set()
    for key, header, img in masked:
        values = dict(zip(fields, header.label))
        src_header, src_img = by_id[header.id2]  # id2 is the source's id
        assert values["identity"] == float(src_header.label) and key == header.id
        assert values["masked"] == 1 and 1 <= values["mask_type"] <= len(MASK_TYPES)
        assert values["mask_mode"] in (1, 2) and values["mask_fallback"] in (0, 1)
        assert header.id >= before["next_id"] and header.id not in ids
        ids.add(header.id)
        per_identity[int(values["identity"])] += 1
        a = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)
        b = cv2.imdecode(np.frombuffer(src_img, np.uint8), cv2.IMREAD_COLOR)
        assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() > 3  # really masked
        assert np.abs(a[:40].astype(int) - b[:40]).mean() < 3  # eyes and above untouched
    assert sorted(per_identity.values()) == [1, 1, 2, 2]  # 6 images each: 1.5 per identity
    assert m["next_id"] == max(ids) + 1
    side = [json.loads(line) for line in (data / m["maskgen"]["sidecar"]).read_text().splitlines()]
    assert [r["id"] for r in side] == [k for k, _, _ in masked]
    assert {r["mask_type"] for r in side} <= set(MASK_TYPES)
    assert all({"mode", "fallback", "colour", "nose_covered", "quality"} <= r.keys() for r in side)
    # Readers see masked and unmasked records, the unmasked padded with zeros.
    ds = PackedDataset(data, return_label_vector=True, raw=True)
    assert len(ds) == len(train) + 6
    flags = [float(ds[i][2][fields.index("masked")]) for i in range(len(ds))]
    assert sum(flags) == 6 and set(flags) == {0.0, 1.0}


@pytest.mark.slow
def test_rerun_replaces_and_same_seed_gives_same_bytes(data):
    build(BuildOptions(data, ratio=0.25, seed=5, workers=1, progress=False))
    first = _files(data)
    build(BuildOptions(data, ratio=0.25, seed=5, workers=1, progress=False))
    assert _files(data) == first  # replaced, not duplicated, and byte-identical
    build(BuildOptions(data, ratio=0.5, seed=6, mode="3d", types=("n95", "cloth"), workers=1, progress=False))
    m = load_manifest(data)
    assert m["maskgen"]["count"] == 12 and m["num_images"] == 36
    assert set(m["maskgen"]["by_type"]) == set(MASK_TYPES) and m["maskgen"]["by_type"]["surgical"] == 0
    assert m["maskgen"]["by_mode"]["2d"] == 0
    assert sorted(p.name for p in data.iterdir() if "mask" in p.name) == \
        ["masked-00000.idx", "masked-00000.rec", "maskgen-meta.jsonl"]
    verify(data, progress=False)


@pytest.mark.slow
def test_worker_processes_give_the_same_bytes(data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    run_cli("maskgen", "build", "--data", str(data), "--ratio", "0.25", "--workers", "1", "--no-progress")
    run_cli("maskgen", "build", "--data", str(other), "--ratio", "0.25", "--workers", "2", "--no-progress")
    assert _files(data) == _files(other)


def test_interrupted_build_leaves_the_dataset_as_it_was(data, monkeypatch):
    before = _files(data)
    real_run = build_mod._run

    def interrupted(opts, tasks, pool):
        for i, item in enumerate(real_run(opts, tasks, pool)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(build_mod, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(BuildOptions(data, ratio=0.25, workers=1, progress=False))
    assert _files(data) == before


@pytest.mark.slow
def test_interrupted_commit_is_consistent_and_recovers(data, monkeypatch):
    build(BuildOptions(data, ratio=0.25, workers=1, progress=False))

    def broken_link(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(build_mod, "_link", broken_link)
    with pytest.raises(OSError):
        build(BuildOptions(data, ratio=0.5, seed=9, workers=1, progress=False))
    # The manifest already names the new shards (under their temporary names): complete and valid.
    verify(data, progress=False)
    assert load_manifest(data)["maskgen"]["count"] == 12
    monkeypatch.undo()
    build(BuildOptions(data, ratio=0.5, seed=9, workers=1, progress=False))
    verify(data, progress=False)
    assert not [p for p in data.iterdir() if p.name.startswith(build_mod.TMP_PREFIX)]


@pytest.mark.slow
def test_preview_and_errors(data, tmp_path):
    proc = run_cli("maskgen", "preview", "--data", str(data), "-n", "4", "--out", str(tmp_path / "s.png"), check=False)
    assert proc.returncode == 1 and "maskgen build" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    build(BuildOptions(data, ratio=0.25, workers=1, progress=False))
    run_cli("maskgen", "preview", "--data", str(data), "-n", "4", "--cols", "2", "--out", str(tmp_path / "s.png"))
    sheet = cv2.imread(str(tmp_path / "s.png"))
    assert sheet.shape[1] == 2 * (2 * 112 + 4) and sheet.shape[0] >= 2 * 112
    proc = run_cli("maskgen", "build", "--data", str(tmp_path), "--workers", "1", check=False)
    assert proc.returncode == 1 and "manifest.json" in proc.stderr
    proc = run_cli("maskgen", "build", "--data", str(data), "--ratio", "1.5", check=False)
    assert proc.returncode == 2


@pytest.mark.slow
def test_grey_dataset_gets_grey_masks(shared_data, tmp_path):
    """ORL: grey, not aligned to the template (so --crops any); masks must come out grey too."""
    faces = tmp_path / "orl"
    for k, person in enumerate(("s1", "s2")):
        (faces / person).mkdir(parents=True)
        for f in sorted((shared_data / "orl" / person).glob("*.pgm"))[:4]:
            shutil.copy(f, faces / person / f.name)
    out = tmp_path / "data"
    run_cli("pipeline", "pack", str(faces), "--out", str(out), "--workers", "1", "--no-progress")
    run_cli("maskgen", "build", "--data", str(out), "--ratio", "0.5", "--crops", "any", "--workers", "1",
            "--no-progress")
    masked = _records(out, "masked")
    assert len(masked) == 4
    for _, header, img in masked:
        rgb = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)
        spread = rgb.max(-1).astype(int) - rgb.min(-1)
        assert np.percentile(spread, 99) <= 3
    verify(out, progress=False)


@pytest.mark.slow
def test_folder_command(glint24, tmp_path):
    src = small_image_folder(glint24, tmp_path, identities=2, per_identity=2)
    out = tmp_path / "masked"
    proc = run_cli("maskgen", "folder", str(src), "--out", str(out), "--workers", "1", "--mode", "2d",
                   "--no-progress")
    assert "masked 4 of 4 images" in proc.stdout
    written = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert written == sorted(p.relative_to(src) for p in src.rglob("*.png"))
    meta = [json.loads(line) for line in (out / "maskgen-meta.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and all(r["mode"] in ("2d", "3d") for r in meta)


def test_a_bad_image_costs_only_itself_in_a_folder_batch(glint24, tmp_path, monkeypatch):
    """`maskgen folder` masks in batches too: an image whose masking raises is skipped with its reason in
    the metadata, and the rest of its batch is written as it would be alone."""
    from maskgen import folder as folder_mod
    from maskgen.masker import Masker

    sources = sorted(glint24.rglob("*.png"))[:4]
    jobs = [(str(p), str(tmp_path / "out" / f"{k}.png"), 100 + k) for k, p in enumerate(sources)]
    masker = Masker()
    try:
        monkeypatch.setitem(folder_mod._WORKER, "masker", masker)
        alone = {k: folder_mod._batch([job])[0] for k, job in enumerate(jobs)}
        expected = {k: Path(jobs[k][1]).read_bytes() for k in alone}
        bad = cv2.cvtColor(cv2.imread(str(sources[2])), cv2.COLOR_BGR2RGB)
        real = Masker.mask

        def flaky(self, rgb, rng, *a, **kw):
            if np.array_equal(rgb, bad):
                raise RuntimeError("boom")
            return real(self, rgb, rng, *a, **kw)

        monkeypatch.setattr(Masker, "mask", flaky)
        for job in jobs:
            Path(job[1]).unlink()
        got = folder_mod._batch(jobs)
        assert got[2] == (jobs[2][0], None, "RuntimeError: boom") and not Path(jobs[2][1]).exists()
        for k in (0, 1, 3):
            assert got[k] == alone[k] and Path(jobs[k][1]).read_bytes() == expected[k]
    finally:
        masker.close()


@pytest.mark.slow
def test_concurrent_builds_are_locked_out_and_a_killed_holder_leaves_no_lock(data):
    before = _files(data)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from maskgen.lock import DatasetLock; "
                               "DatasetLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
                               str(data)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_cli("maskgen", "build", "--data", str(data), "--ratio", "0.25", "--workers", "1",
                       "--no-progress", check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
        assert f"pid {holder.pid}" in proc.stderr
        with pytest.raises(build_mod.BuildError, match=f"pid {holder.pid}"):
            build(BuildOptions(data, ratio=0.25, workers=1, progress=False))
        assert {k: v for k, v in _files(data).items() if k != "maskgen.lock"} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (data / "maskgen.lock").exists()  # the killed run's file stays; its flock died with it
    build(BuildOptions(data, ratio=0.25, workers=1, progress=False))
    assert load_manifest(data)["maskgen"]["count"] == 6
    assert not (data / "maskgen.lock").exists()


def test_a_bad_image_costs_only_itself_in_its_batch(glint24, monkeypatch):
    """Records are masked in batches; an undecodable one, or one whose masking raises, is skipped with
    its reason and the rest of its batch is masked as it would be alone."""
    from maskgen.masker import Masker

    payloads = [p.read_bytes() for p in sorted(glint24.rglob("*.png"))[:4]]
    payloads.insert(2, b"\xff\xd8\xff not a jpeg")
    masker = Masker()
    try:
        out = build_mod.mask_records(payloads, list(range(5)), masker)
        assert out[2] == (None, "undecodable image")
        assert all(o[0] is not None and o[1]["quality"] == 95 for k, o in enumerate(out) if k != 2)
        alone = build_mod.mask_records([payloads[3]], [3], masker)[0]
        assert alone[0] == out[3][0]

        real = Masker.mask

        def flaky(self, rgb, rng, *a, **kw):
            if rgb.shape == (112, 112, 3) and np.array_equal(rgb, cv2.cvtColor(
                    cv2.imdecode(np.frombuffer(payloads[1], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)):
                raise RuntimeError("boom")
            return real(self, rgb, rng, *a, **kw)

        monkeypatch.setattr(Masker, "mask", flaky)
        monkeypatch.setattr(build_mod, "_read_payload", lambda path, offset: payloads[offset])
        monkeypatch.setitem(build_mod._WORKER, "masker", masker)
        tasks = [build_mod.Task(Source(shard=0, offset=k, id=k, identity=0, label=(0.0,)), "rec", k) for k in range(5)]
        got = build_mod._process(tasks)
        assert got[1] == (None, "RuntimeError: boom")
        assert got[2] == (None, "undecodable image")
        assert got[3][0] == out[3][0] and got[0][0] == out[0][0] and got[4][0] == out[4][0]
    finally:
        masker.close()


def test_a_record_labelled_out_of_range_is_skipped_and_counted(data):
    """Issue O.9: a record labelled 999 in a 4-identity dataset used to be copied into the masked shards."""
    import struct

    from pipeline.recordio import read_index

    m = load_manifest(data)
    shard = m["shards"][0]
    _, offsets = read_index(data / shard["idx"])
    with open(data / shard["rec"], "r+b") as f:  # the scalar label of the shard's first record
        f.seek(offsets[0] + 8 + 4)
        f.write(struct.pack("<f", 999.0))
    out = build(BuildOptions(data, ratio=1.0, workers=1, progress=False))
    assert out["maskgen"]["skipped"].get("label out of range") == 1
    assert out["maskgen"]["count"] == IDENTITIES * PER_IDENTITY - 1 - sum(
        v for k, v in out["maskgen"]["skipped"].items() if k != "label out of range")
    labels = {int(h.label[0]) for _, h, _ in _records(data, "masked")}
    assert labels <= set(range(IDENTITIES))


def test_parts_merged_equal_one_build(data, tmp_path):
    """Issue N: `--part K/N` on N machines, then `--merge`: the same masked records and ids as one build."""
    other = tmp_path / "other"
    shutil.copytree(data, other)
    build(BuildOptions(data, ratio=0.5, seed=2, workers=1, progress=False))
    opts = BuildOptions(other, ratio=0.5, seed=2, workers=1, progress=False, shard_size_mb=0.01)
    build(opts, part=(1, 3))
    proc = run_cli("maskgen", "build", "--data", str(other), "--merge", "--no-progress", check=False)
    assert proc.returncode == 1 and "part 0 of 3" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for k in (2, 0):
        journal = build(opts, part=(k, 3))
        assert journal["done"] and "maskgen" not in load_manifest(other)
    m = build(BuildOptions(other, workers=1, progress=False), merge=True)
    one = load_manifest(data)
    assert [(k, h.id, h.id2, h.label.tolist(), img) for k, h, img in _records(data, "masked")] == \
        [(k, h.id, h.id2, h.label.tolist(), img) for k, h, img in _records(other, "masked")]
    assert m["maskgen"]["count"] == one["maskgen"]["count"] and m["next_id"] == one["next_id"]
    assert dict(m["maskgen"]["settings"], shard_size_mb=0) == dict(one["maskgen"]["settings"], shard_size_mb=0)
    side = lambda d: [{k: v for k, v in json.loads(line).items() if k != "shard"}  # noqa: E731
                      for line in (d / "maskgen-meta.jsonl").read_text().splitlines()]
    assert side(data) == side(other)
    assert not list(other.glob("maskgen.part-*")) and len([s for s in m["shards"] if s["kind"] == "masked"]) > 1
    verify(other, progress=False)
