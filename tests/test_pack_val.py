"""`pipeline pack --val-split F`: a stratified validation split in "val" shards that no reader trains on."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.dataset import PackedDataset, TorchTrainLoader
from pipeline.manifest import ManifestError, load_manifest
from pipeline.pack_plan import val_count
from pipeline.record_check import check_label
from tests._eval_helpers import face_folder, run_module


def _records(ds: PackedDataset) -> list[tuple[int, int]]:
    """(record id, identity) of every record."""
    out = []
    for i in range(len(ds)):
        header, _ = ds.read_record(i)
        out.append((int(header.id), check_label(header.flag, header.label, ds.rules)))
    return out


def test_val_count():
    assert [val_count(n, 0.1) for n in range(0, 6)] == [0, 0, 1, 1, 1, 1]
    assert (val_count(20, 0.1), val_count(24, 0.1), val_count(25, 0.1)) == (2, 2, 3)  # halves round up
    assert val_count(3, 0.9) == 2  # never the identity's last image


@pytest.fixture(scope="module")
def faces(glint24, tmp_path_factory):
    root = tmp_path_factory.mktemp("valsplit")
    faces = face_folder(glint24, root / "faces", identities=4, per_identity=12)
    # unequal identities: 12, 12, 5, 1 images
    people = sorted(p for p in faces.iterdir())
    for person, keep in zip(people[2:], (5, 1)):
        for f in sorted(person.iterdir())[keep:]:
            f.unlink()
    return faces


def _pack(faces, out, *extra):
    run_module("pipeline", "pack", str(faces), "--out", str(out), "--workers", "1", "--no-progress", *extra)
    return out


def test_val_split_is_stratified_and_not_trained_on(faces, tmp_path):
    data = _pack(faces, tmp_path / "data", "--val-split", "0.25", "--holdout", "1", "--seed", "3")
    m = load_manifest(data)
    assert m["val"]["share"] == 0.25 and all(s["kind"] == "val" for s in m["val"]["shards"])
    val = _records(PackedDataset(data, val=True))
    held = _records(PackedDataset(data, holdout=True))
    train = _records(PackedDataset(data))
    # per identity: 12 -> 1 held out, 11 left, 3 val; 5 -> 1 held, 4 left, 1 val; 1 -> all trained on
    assert sorted(Counter(i for _, i in val).values()) == [1, 3, 3]
    assert Counter(i for _, i in val) == {c: val_count(n - 1, 0.25) for c, n in
                                          Counter(i for _, i in train + val + held).items() if n > 2}
    assert m["val"]["num_images"] == len(val) == 7 and m["num_images"] == len(train) == 30 - 7 - 3
    ids = [r for r, _ in train + val + held]
    assert len(set(ids)) == len(ids) and m["next_id"] == 30  # every image its own id
    # the readers train on the train shards only
    loader = TorchTrainLoader(data, batch_size=2, num_workers=0)
    assert len(loader.dataset) == len(train) and not {r for r, _ in val} & {r for r, _ in train}
    assert run_module("pipeline", "verify", str(data)).returncode == 0
    # deterministic with the seed; another seed draws other images
    again = _records(PackedDataset(_pack(faces, tmp_path / "again", "--val-split", "0.25", "--holdout", "1",
                                         "--seed", "3"), val=True))
    assert again == val
    other = _records(PackedDataset(_pack(faces, tmp_path / "other", "--val-split", "0.25", "--holdout", "1",
                                         "--seed", "4"), val=True))
    assert Counter(i for _, i in other) == Counter(i for _, i in val)


def test_without_val_split_the_pack_is_as_before(faces, tmp_path):
    data = _pack(faces, tmp_path / "data", "--holdout", "1")
    assert "val" not in load_manifest(data)
    proc = run_module("pipeline", "pack", str(faces), "--out", str(tmp_path / "bad"), "--val-split", "1",
                      check=False)
    assert proc.returncode == 2 and "share in [0, 1)" in proc.stderr


def test_manifest_val_shards_must_be_of_kind_val(faces, tmp_path):
    data = _pack(faces, tmp_path / "data", "--val-split", "0.5")
    path = data / "manifest.json"
    m = json.loads(path.read_text())
    m["val"]["shards"][0]["kind"] = "train"
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="val.shards"):
        load_manifest(data)
