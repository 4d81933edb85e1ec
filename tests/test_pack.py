"""`python -m pipeline pack`: real faces, odd inputs, determinism, interruption, huge label spaces."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.dataset import PackedDataset
from pipeline.manifest import load_manifest
from pipeline.recordio import IndexedRecordIO, unpack_record
from tests.conftest import REPO, run_cli


def all_records(data: Path) -> list:
    m = load_manifest(data)
    out = []
    for s in m["shards"]:
        with IndexedRecordIO(data / s["idx"], data / s["rec"], "r") as r:
            out += [unpack_record(r.read_idx(k)) for k in r.keys]
    return out


def test_glint24_pack(packed_glint, glint24):
    m = load_manifest(packed_glint)
    total = sum(1 for _ in glint24.rglob("*.png"))
    held = m["holdout"]["num_images"]
    assert held == 5 * 24
    # glint24 holds one byte-identical duplicate: it is skipped and named, nothing else is lost
    assert m["skipped"]["by_reason"] == {"duplicate": 1}
    assert m["num_images"] + held + 1 == total
    assert m["num_classes"] == 24 and len(m["shards"]) > 1
    assert sum(s["count"] for s in m["shards"]) == m["num_images"]
    labels = [int(h.label) for h, _ in all_records(packed_glint)]
    # shuffled across identities: long runs of one identity would starve a rank-contiguous reader
    assert max(len(list(g)) for _, g in __import__("itertools").groupby(labels)) < 6
    assert len(set(labels[:100])) > 15
    ids = [h.id for h, _ in all_records(packed_glint)]
    assert len(set(ids)) == len(ids)
    img = Image.open(io.BytesIO(all_records(packed_glint)[0][1]))
    assert img.format == "JPEG" and img.size == (112, 112)
    # the held-out verification pack: insightface's (bins, issame) with every genuine pair
    bins, issame = pickle.loads((packed_glint / "holdout_pairs.bin").read_bytes())
    assert len(bins) == 2 * len(issame) and sum(issame) == 24 * 10 and len(issame) == 2 * 24 * 10
    train_bytes = {img for _, img in all_records(packed_glint)}
    assert not train_bytes & set(bins)  # held-out images never reach training
    run_cli("pipeline", "verify", str(packed_glint), "--no-progress")


def test_deterministic_and_seeded(glint24, tmp_path):
    people = tmp_path / "src"
    for name in ["Barack Obama", "Hugh Laurie", "Jennifer Lopez"]:
        shutil.copytree(glint24 / name, people / name)
    args = [str(people), "--shard-size", "0.3", "--no-progress"]
    run_cli("pipeline", "pack", *args, "--out", str(tmp_path / "a"), "--workers", "2")
    run_cli("pipeline", "pack", *args, "--out", str(tmp_path / "b"), "--workers", "1")
    run_cli("pipeline", "pack", *args, "--out", str(tmp_path / "c"), "--seed", "1")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert (tmp_path / "a" / "train-00000.rec").read_bytes() != (tmp_path / "c" / "train-00000.rec").read_bytes()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def make_bad_tree(root: Path, face: Path) -> dict:
    """An ImageFolder with every awkward input; returns {file name: expected skip reason or None}."""
    rgb = Image.open(face).convert("RGB")
    expect = {}

    def put(person: str, name: str, data: bytes, reason=None):
        d = root / person
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
        expect[name] = reason

    put("Ann Lee", "ok 1.jpg", _jpeg(rgb))
    put("Ann Lee", "cmyk.jpg", _jpeg(rgb.convert("CMYK")))
    put("Ann Lee", "grey.png", _png(rgb.convert("L")))
    arr16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    put("Ann Lee", "sixteen.png", _png(Image.fromarray(arr16).convert("I;16")))
    put("Ann Lee", "palette.gif", _gif(rgb.convert("P", palette=Image.ADAPTIVE)))
    rgba = rgb.convert("RGBA")
    put("Ann Lee", "alpha.png", _png(rgba))
    wide = rgb.resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    put("Ann Lee", "rotated.jpg", _jpeg(wide, exif=exif.tobytes()))
    put("José Nuñez", "façade 中文.png", _png(rgb))
    put("José Nuñez", "copy.png", _png(rgb), "duplicate")
    put("José Nuñez", "empty.jpg", b"", "empty file")
    put("José Nuñez", "notes.txt", b"not an image at all\n", "not an image")
    put("José Nuñez", "truncated.jpg", _jpeg(rgb)[:600], "corrupt image")
    (root / "Empty Person").mkdir()
    (root / "stray.jpg").write_bytes(_jpeg(rgb))
    expect["stray.jpg"] = "not in an identity folder"
    os.symlink(root / "does-not-exist.jpg", root / "Ann Lee" / "dangling.jpg")
    expect["dangling.jpg"] = "missing file"
    return expect


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _gif(img):
    buf = io.BytesIO()
    img.save(buf, "GIF")
    return buf.getvalue()


def test_bad_inputs_are_converted_or_skipped_and_listed(glint24, tmp_path):
    face = next((glint24 / "Barack Obama").glob("*.png"))
    expect = make_bad_tree(tmp_path / "src", face)
    out = tmp_path / "data"
    run_cli("pipeline", "pack", str(tmp_path / "src"), "--out", str(out), "--workers", "2", "--no-progress")
    m = load_manifest(out)
    skipped = {}
    for line in (out / "skipped.tsv").read_text(encoding="utf-8").splitlines():
        path, reason, _ = line.split("\t")
        skipped[Path(path).name] = reason
    want_skipped = {k: v for k, v in expect.items() if v}
    assert skipped == want_skipped
    assert m["skipped"]["count"] == len(want_skipped)
    good = [k for k, v in expect.items() if v is None]
    assert m["num_images"] == len(good)
    assert m["num_classes"] == 2  # the empty identity folder gets no class, and is named
    assert [Path(p).name for p in m["empty_classes"]] == ["Empty Person"]
    conv = m["conversions"]
    for note in ("cmyk to rgb", "grey to rgb", "16-bit to 8-bit", "palette to rgb", "exif rotated", "alpha dropped"):
        assert conv.get(note, 0) >= 1, (note, conv)
    assert "José Nuñez" in (out / "classes.tsv").read_text(encoding="utf-8")
    ds = PackedDataset(out, raw=True)
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (112, 112, 3) and label in (0, 1)
    # the EXIF-rotated 80x40 became upright (portrait) before the resize: stretch shows the orientation
    run_cli("pipeline", "pack", str(tmp_path / "src"), "--out", str(tmp_path / "s"), "--resize-mode", "pad",
            "--no-progress")
    padded = [np.asarray(PackedDataset(tmp_path / "s", raw=True)[i][0]) for i in range(len(ds))]
    # a portrait image padded into a square has black columns left and right, not rows top and bottom
    assert any(p[:, :10].max() < 20 and p[:10, :].max() > 20 for p in padded)


def test_strict_fails_and_leaves_no_manifest(glint24, tmp_path):
    face = next((glint24 / "Barack Obama").glob("*.png"))
    make_bad_tree(tmp_path / "src", face)
    proc = run_cli("pipeline", "pack", str(tmp_path / "src"), "--out", str(tmp_path / "d"), "--strict",
                   "--no-progress", check=False)
    assert proc.returncode != 0 and "--strict" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("pipeline", "pack", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert run_cli("pipeline", "--help").returncode == 0
    assert run_cli("pipeline", "pack", "--help").returncode == 0


def test_sources_list_flat_pgm_and_repack(shared_data, packed_glint, tmp_path):
    yale = tmp_path / "yale"
    run_cli("pipeline", "pack", str(shared_data / "yale"), "--out", str(yale), "--label-regex",
            r"^(subject\d+)\.", "--no-progress")
    m = load_manifest(yale)
    assert m["num_classes"] == 15 and m["num_images"] + m["skipped"]["count"] == 164
    orl = tmp_path / "orl"
    run_cli("pipeline", "pack", str(shared_data / "orl"), "--out", str(orl), "--no-progress")
    m = load_manifest(orl)
    assert m["num_classes"] == 40 and m["num_images"] == 400 and m["conversions"]["grey to rgb"] == 400
    assert m["skipped"]["by_reason"] == {"not in an identity folder": 1}  # orl/README
    # im2rec-style .lst (index, label, path) and a packed dataset as a source
    files = sorted((shared_data / "orl" / "s1").glob("*.pgm"))
    (tmp_path / "x.lst").write_text("".join(f"{i}\t{i % 2}\t{p}\n" for i, p in enumerate(files)))
    run_cli("pipeline", "pack", str(tmp_path / "x.lst"), "--out", str(tmp_path / "lst"), "--no-progress")
    assert load_manifest(tmp_path / "lst")["num_classes"] == 2
    run_cli("pipeline", "pack", str(packed_glint), "--out", str(tmp_path / "re"), "--no-progress")
    m2, m1 = load_manifest(tmp_path / "re"), load_manifest(packed_glint)
    assert m2["num_images"] == m1["num_images"] and m2["conversions"] == {"passthrough": m1["num_images"]}


def test_more_identities_than_float32_holds(glint24, tmp_path):
    big = (1 << 24) + 5
    files = sorted(glint24.rglob("*.png"))[:4]
    (tmp_path / "l.tsv").write_text(f"{files[0]}\t0\n{files[1]}\t{big}\n{files[2]}\t{big - 1}\n{files[3]}\t7\n")
    out = tmp_path / "d"
    run_cli("pipeline", "pack", str(tmp_path / "l.tsv"), "--out", str(out), "--keep-labels", "--no-progress")
    m = load_manifest(out)
    assert m["num_classes"] == big + 1 and m["label_fields"] == ["identity", "identity_hi", "identity_lo"]
    assert np.float32(big) == np.float32(big - 1)  # what a float label would have silently merged
    got = sorted(PackedDataset(out, raw=True)[i][1] for i in range(4))
    assert got == [0, 7, big - 1, big]
    from pipeline.dali_reader import DaliTrainLoader

    dali = DaliTrainLoader(out, batch_size=4, drop_last=False, shuffle=False)
    labels = sorted(l for _, y in dali for l in y.tolist())
    assert labels == [0, 7, big - 1, big]
    run_cli("pipeline", "verify", str(out), "--no-progress")


@pytest.mark.slow
def test_interrupted_pack_resumes_to_identical_result(glint24, tmp_path):
    src = tmp_path / "src"
    for name in ["Barack Obama", "Hugh Laurie", "Jennifer Lopez", "Halle Berry"]:
        shutil.copytree(glint24 / name, src / name)
    args = [str(src), "--shard-size", "0.05", "--workers", "1", "--no-progress"]
    run_cli("pipeline", "pack", *args, "--out", str(tmp_path / "whole"))
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "pack", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / ".pack-state" / "part-00000" / "journal.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (journal.exists() and '"train-00001' in journal.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert run_cli("pipeline", "verify", str(out), "--no-progress", check=False).returncode != 0
    run_cli("pipeline", "pack", *args, "--out", str(out))
    for p in (tmp_path / "whole").iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert not (out / ".pack-state").exists()
    # a finished folder: the same command is a no-op, other options need --overwrite
    assert "already packed" in run_cli("pipeline", "pack", *args, "--out", str(out)).stdout
    proc = run_cli("pipeline", "pack", *args, "--seed", "3", "--out", str(out), check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    run_cli("pipeline", "pack", *args, "--seed", "3", "--out", str(out), "--overwrite")


def test_attribute_file_extends_the_label_vector(glint24, tmp_path):
    people = ["Barack Obama", "Halle Berry"]
    files = [p for name in people for p in sorted((glint24 / name).glob("*.png"))]
    rows = ["path\tmale\teyeglasses"]
    for p in files:
        male = "1" if p.parent.name == "Barack Obama" else "0"
        rows.append(f"{p.parent.name}/{p.name}\t{male}\t{'' if p.name.startswith('1') else '0'}")
    (tmp_path / "attrs.tsv").write_text("\n".join(rows) + "\n")
    src = tmp_path / "src"
    for name in people:
        shutil.copytree(glint24 / name, src / name)
    out = tmp_path / "d"
    run_cli("pipeline", "pack", str(src), "--out", str(out), "--attributes", str(tmp_path / "attrs.tsv"),
            "--no-progress")
    m = load_manifest(out)
    assert m["label_fields"] == ["identity", "male", "eyeglasses"]
    ds = PackedDataset(out, raw=True, return_label_vector=True)
    names = (out / "classes.tsv").read_text().splitlines()
    obama = [line.split("\t")[0] for line in names if line.endswith("Barack Obama")][0]
    for i in range(len(ds)):
        _, identity, vec = ds[i]
        assert vec[1] == (1.0 if identity == int(obama) else 0.0) and vec[2] in (-1.0, 0.0)
    assert any(ds[i][2][2] == -1.0 for i in range(len(ds)))
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\tmasked\nx\t1\n")
    proc = run_cli("pipeline", "pack", str(src), "--out", str(tmp_path / "e"), "--attributes", str(bad), check=False)
    assert proc.returncode == 1 and "not one of" in proc.stderr


def test_a_list_files_sizes_are_read_by_several_threads(glint24, tmp_path, monkeypatch):
    """Issue N: a list file's lines are parsed in order, the stat of each line's file (part of the pack's
    fingerprint) is spread over threads, with the same fingerprint as one thread gives."""
    import threading

    from pipeline import sources

    files = sorted(glint24.rglob("*.png"))[:40]
    lst = tmp_path / "list.tsv"
    lst.write_text("".join(f"{p}\t{p.parent.name}\n" for p in files))
    monkeypatch.setattr(sources, "LIST_STAT_BATCH", 3, raising=False)
    threads, real = set(), sources._size

    def watched(path):
        threads.add(threading.get_ident())
        time.sleep(0.002)  # long enough for the other threads to take jobs
        return real(path)

    monkeypatch.setattr(sources, "_size", watched)
    listing = sources.list_file(lst)
    assert len(listing) == 40 and threading.get_ident() not in threads and len(threads) > 1
    monkeypatch.setattr(sources, "ordered_map", lambda fn, jobs, threads=1: map(fn, jobs))
    assert sources.list_file(lst).content_digest == listing.content_digest
