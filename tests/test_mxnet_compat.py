"""Byte compatibility with the real mxnet 1.9.1 RecordIO, both ways (mxnet runs in its own venv)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import load_manifest
from pipeline.recordio import MAGIC_BYTES, IndexedRecordIO, IRHeader, pack_record, unpack_record
from tests.conftest import run_cli

pytestmark = pytest.mark.mxnet
PEER = Path(__file__).parent / "peers" / "mxnet_peer.py"


def spec() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    bodies = [b"", b"x", b"abcde", MAGIC_BYTES, MAGIC_BYTES * 2 + b"zz", b"ab" + MAGIC_BYTES + b"cd"]
    bodies += [rng.bytes(int(n)) for n in rng.integers(1, 2000, 12)]
    # the header itself is 24 bytes: a magic in the image at an aligned payload position splits the record
    bodies += [b"\0" * 4 + MAGIC_BYTES + b"tail", b"\0" * 8 + MAGIC_BYTES]
    for i, body in enumerate(bodies):
        label = float(i % 5) if i % 3 else [float(i % 5), 1.0, 7.0]
        out.append({"key": i + 1, "label": label, "id": 1000 + i, "id2": i % 2, "payload": body.hex()})
    return out


def _ours_write(records, rec, idx):
    with IndexedRecordIO(idx, rec, "w") as w:
        for r in records:
            label = r["label"] if isinstance(r["label"], float) else np.asarray(r["label"], np.float32)
            w.write_idx(r["key"], pack_record(IRHeader(0, label, r["id"], r["id2"]), bytes.fromhex(r["payload"])))


def test_our_files_equal_mxnets_byte_for_byte(mxnet_python, tmp_path):
    records = spec()
    (tmp_path / "spec.json").write_text(json.dumps(records))
    subprocess.run([str(mxnet_python), str(PEER), "write", str(tmp_path / "spec.json"),
                    str(tmp_path / "mx.rec"), str(tmp_path / "mx.idx")], check=True)
    _ours_write(records, tmp_path / "ours.rec", tmp_path / "ours.idx")
    mx_rec = (tmp_path / "mx.rec").read_bytes()
    assert mx_rec.count(MAGIC_BYTES) > len(records)  # continuation parts were exercised
    assert (tmp_path / "ours.rec").read_bytes() == mx_rec
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "mx.idx").read_bytes()


def test_mxnet_reads_ours_and_we_read_mxnets(mxnet_python, tmp_path):
    records = spec()
    _ours_write(records, tmp_path / "ours.rec", tmp_path / "ours.idx")
    subprocess.run([str(mxnet_python), str(PEER), "read", str(tmp_path / "ours.rec"), str(tmp_path / "ours.idx"),
                    str(tmp_path / "out.json")], check=True)
    got = json.loads((tmp_path / "out.json").read_text())
    assert [g["payload"] for g in got] == [r["payload"] for r in records]
    assert [g["label"] for g in got] == [r["label"] for r in records]
    assert [(g["id"], g["id2"], g["key"]) for g in got] == [(r["id"], r["id2"], r["key"]) for r in records]
    # the other way
    (tmp_path / "spec.json").write_text(json.dumps(records))
    subprocess.run([str(mxnet_python), str(PEER), "write", str(tmp_path / "spec.json"),
                    str(tmp_path / "mx.rec"), str(tmp_path / "mx.idx")], check=True)
    with IndexedRecordIO(tmp_path / "mx.idx", tmp_path / "mx.rec", "r") as r:
        for want in records:
            header, body = unpack_record(r.read_idx(want["key"]))
            assert body.hex() == want["payload"] and (header.id, header.id2) == (want["id"], want["id2"])
            label = header.label.tolist() if isinstance(header.label, np.ndarray) else header.label
            assert label == want["label"]


def test_pack_reads_insightface_rec_without_decoding_structure(mxnet_python, glint24, tmp_path):
    files = sorted(glint24.rglob("*.png"))[:30]
    people = sorted({p.parent.name for p in files})
    from pipeline.imageio import prepare_image

    images = [prepare_image(p.read_bytes())[0].hex() for p in files]
    labels = [people.index(p.parent.name) for p in files]
    (tmp_path / "spec.json").write_text(json.dumps({"images": images, "labels": labels}))
    subprocess.run([str(mxnet_python), str(PEER), "write_insightface", str(tmp_path / "spec.json"),
                    str(tmp_path / "train.rec"), str(tmp_path / "train.idx")], check=True)
    out = tmp_path / "data"
    proc = run_cli("pipeline", "pack", str(tmp_path / "train.rec"), "--out", str(out), "--no-progress",
                   "--keep-labels", "--workers", "1")
    m = load_manifest(out)
    # header and identity records are structure: neither packed nor counted as skipped images
    assert m["num_images"] == 30 and m["skipped"]["count"] == 0, proc.stdout
    assert m["num_classes"] == len(people)
    assert m["conversions"] == {"passthrough": 30}
    run_cli("pipeline", "verify", str(out), "--no-progress")
    # our own packed shards read back through mxnet
    shard = m["shards"][0]
    subprocess.run([str(mxnet_python), str(PEER), "read", str(out / shard["rec"]), str(out / shard["idx"]),
                    str(tmp_path / "back.json")], check=True)
    back = json.loads((tmp_path / "back.json").read_text())
    assert sorted(g["payload"] for g in back) == sorted(images)
    by_img = dict(zip(images, labels))
    assert all(by_img[g["payload"]] == g["label"] for g in back)
