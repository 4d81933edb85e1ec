"""`pipeline verify` catching damage, and the two readers: DALI on the CPU and the PyTorch Dataset."""
from __future__ import annotations

import collections
import shutil

import numpy as np
import pytest
import torch

from pipeline.dali_reader import DaliTrainLoader
from pipeline.dataset import PackedDataset, TorchTrainLoader
from pipeline.manifest import load_manifest, shard_entry, write_manifest
from pipeline.recordio import IndexedRecordIO, IRHeader, pack_record
from tests.conftest import run_cli


@pytest.fixture(autouse=True)
def shard_check_cache(tmp_path, monkeypatch):
    """The DALI reader's shard checks are cached per test, not in the home folder."""
    monkeypatch.setenv("FACETRAIN_CACHE", str(tmp_path / "shard-check-cache"))


@pytest.fixture()
def damaged(packed_glint, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(packed_glint, copy)
    return copy, load_manifest(copy)


def _verify(path):
    return run_cli("pipeline", "verify", str(path), "--no-progress", check=False)


def test_verify_catches_a_flipped_byte(damaged):
    data, m = damaged
    rec = data / m["shards"][1]["rec"]
    buf = bytearray(rec.read_bytes())
    buf[5000] ^= 0x40
    rec.write_bytes(bytes(buf))
    proc = _verify(data)
    assert proc.returncode == 1 and m["shards"][1]["rec"] in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_verify_names_the_offset_of_a_broken_frame(damaged):
    data, m = damaged
    rec = data / m["shards"][0]["rec"]
    buf = bytearray(rec.read_bytes())
    from pipeline.recordio import read_index

    _, offsets = read_index(data / m["shards"][0]["idx"])
    buf[offsets[3]] ^= 0xFF  # the magic of the 4th record
    rec.write_bytes(bytes(buf))
    proc = _verify(data)
    assert proc.returncode == 1 and f"at byte {sorted(offsets)[3]}" in proc.stderr


def test_verify_catches_truncation_index_and_manifest(damaged):
    data, m = damaged
    rec = data / m["shards"][2]["rec"]
    rec.write_bytes(rec.read_bytes()[:-100])
    proc = _verify(data)
    assert proc.returncode == 1 and m["shards"][2]["rec"] in proc.stderr and "truncated" in proc.stderr
    (data / "manifest.json").unlink()
    proc = _verify(data)
    assert proc.returncode == 1 and "manifest" in proc.stderr


def test_verify_catches_an_edited_index(packed_glint, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(packed_glint, data)
    m = load_manifest(data)
    idx = data / m["shards"][0]["idx"]
    lines = idx.read_text().splitlines()
    k, off = lines[5].split("\t")
    lines[5] = f"{k}\t{int(off) + 4}"
    idx.write_text("\n".join(lines) + "\n")
    proc = _verify(data)
    assert proc.returncode == 1 and m["shards"][0]["idx"] in proc.stderr
    assert _verify(packed_glint).returncode == 0


@pytest.mark.parametrize("world", [1, 2])
def test_dali_reads_every_record_once_per_epoch(unique_label_data, world):
    n = load_manifest(unique_label_data)["num_images"]
    assert len(load_manifest(unique_label_data)["shards"]) >= 3
    for epoch in range(2):
        seen = collections.Counter()
        for rank in range(world):
            loader = DaliTrainLoader(unique_label_data, batch_size=8, rank=rank, world_size=world,
                                     drop_last=False, seed=1)
            for _ in range(epoch):
                for _ in loader:
                    pass
            for images, labels in loader:
                assert images.dtype == torch.float32 and labels.dtype == torch.int64
                assert images.shape[1:] == (3, 112, 112) and -1.0 <= images.min() and images.max() <= 1.0
                seen.update(labels.tolist())
        assert sorted(seen) == list(range(n)) and max(seen.values()) == 1


def test_dali_drop_last_gives_equal_steps_and_resumes_exactly(unique_label_data):
    loaders = [DaliTrainLoader(unique_label_data, batch_size=8, rank=r, world_size=3, seed=2) for r in range(3)]
    counts = {len(list(iter(loader))) for loader in loaders}
    assert counts == {loaders[0].steps_per_epoch} and loaders[0].epoch == 1
    a = DaliTrainLoader(unique_label_data, batch_size=8, rank=1, world_size=2, seed=5)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    want = [next(it) for _ in range(3)]
    b = DaliTrainLoader(unique_label_data, batch_size=8, rank=1, world_size=2, seed=5)
    b.load_state_dict(state)
    got = list(iter(b))[:3]
    for (wi, wl), (gi, gl) in zip(want, got):
        assert torch.equal(wl, gl) and torch.equal(wi, gi)


def test_dataset_and_dali_yield_the_same_samples(unique_label_data):
    ds = PackedDataset(unique_label_data)  # no augmentation
    by_label = {}
    for i in range(len(ds)):
        img, label = ds[i]
        by_label[label] = img
    dali = DaliTrainLoader(unique_label_data, batch_size=16, drop_last=False, augment={"flip": False})
    seen = 0
    for images, labels in dali:
        for img, label in zip(images, labels.tolist()):
            diff = (img - by_label[label]).abs()
            # the same JPEG through libjpeg-turbo in both: equal up to IDCT/upsampling rounding
            assert diff.mean() < 2 / 127.5 and diff.max() < 20 / 127.5
            seen += 1
    assert seen == len(ds)


def test_torch_loader_partitions_and_resumes_across_world_sizes(unique_label_data):
    n = load_manifest(unique_label_data)["num_images"]
    seen = collections.Counter()
    for r in range(2):
        for _, labels in TorchTrainLoader(unique_label_data, 8, r, 2, drop_last=False, num_workers=0):
            seen.update(labels.tolist())
    assert sorted(seen) == list(range(n)) and max(seen.values()) == 1
    two = [TorchTrainLoader(unique_label_data, 8, r, 2, seed=3, num_workers=0) for r in range(2)]
    first = collections.Counter()
    states = []
    for loader in two:
        it = iter(loader)
        for _ in range(2):
            first.update(next(it)[1].tolist())
        states.append(loader.state_dict())
    one = TorchTrainLoader(unique_label_data, 8, 0, 1, seed=3, num_workers=0, drop_last=False)
    one.load_state_dict(states[0])
    rest = collections.Counter(l for _, y in one for l in y.tolist())
    assert not set(rest) & set(first) and len(rest) + len(first) == n


def test_corrupt_record_is_skipped_and_counted(packed_glint, tmp_path):
    """A JPEG whose markers are whole but whose scan data is not: only a decoder finds it."""
    data = tmp_path / "d"
    shutil.copytree(packed_glint, data)
    m = load_manifest(data)
    jpeg = bytearray(PackedDataset(data).read_record(0)[1])
    jpeg[len(jpeg) // 2: len(jpeg) // 2 + 400] = bytes(400)
    with IndexedRecordIO(data / "bad-00000.idx", data / "bad-00000.rec", "w") as w:
        w.write_idx(10**6, pack_record(IRHeader(0, 3.0, 10**6, 0), bytes(jpeg)))
    m["shards"].insert(0, shard_entry(data, "bad-00000.rec", "bad-00000.idx", 1))
    m["num_images"] += 1
    write_manifest(data, m)
    loader = TorchTrainLoader(data, 32, drop_last=False, shuffle=False, num_workers=0)
    n = sum(len(y) for _, y in loader)
    assert n == m["num_images"] and loader.skipped_records == 1
    assert _verify(data).returncode == 0  # framing, header and JPEG markers are sound; only --decode decodes
    proc = run_cli("pipeline", "verify", str(data), "--decode", "--no-progress", check=False)
    assert proc.returncode == 1 and "bad-00000.rec at byte 0" in proc.stderr


def test_label_vectors_are_padded_per_field(packed_glint, tmp_path):
    """Masked shards carry [identity, masked, ...]; plain records have flag 0 and read as zeros there."""
    data = tmp_path / "d"
    shutil.copytree(packed_glint, data)
    m = load_manifest(data)
    src = PackedDataset(data, raw=True)
    with IndexedRecordIO(data / "masked-00000.idx", data / "masked-00000.rec", "w") as w:
        for j in range(5):
            header, img = src.read_record(j)
            vec = np.array([header.label, 1.0, 2.0], dtype=np.float32)
            w.write_idx(m["next_id"] + j, pack_record(IRHeader(0, vec, m["next_id"] + j, header.id), img))
    m["shards"].append(shard_entry(data, "masked-00000.rec", "masked-00000.idx", 5, kind="masked"))
    m["num_images"] += 5
    m["label_fields"] = ["identity", "masked", "mask_type"]
    write_manifest(data, m)
    dali = DaliTrainLoader(data, 64, drop_last=False, shuffle=False, return_label_vectors=True)
    vectors = torch.cat([v for _, _, v in dali])
    assert vectors.shape == (m["num_images"], 3)
    assert int(vectors[:, 1].sum()) == 5 and set(vectors[vectors[:, 1] == 0, 2].tolist()) == {0.0}
    ds = PackedDataset(data, return_label_vector=True)
    assert sum(int(ds[i][2][1]) for i in range(len(ds) - 10, len(ds))) == 5
