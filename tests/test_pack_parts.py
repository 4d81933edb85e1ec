"""`pack --part K/N` + `merge` against a single pack, and the defects of issue O in pack's handling of
its output folder, its arguments and malformed inputs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.manifest import load_manifest
from pipeline.merge import merge
from pipeline.pack import pack
from pipeline.pack_plan import PackError, PackOptions
from tests.conftest import run_cli
from tests.test_pack import all_records

PEOPLE = ["Barack Obama", "Hugh Laurie", "Jennifer Lopez"]


@pytest.fixture
def src(glint24, tmp_path) -> Path:
    root = tmp_path / "src"
    for name in PEOPLE:
        shutil.copytree(glint24 / name, root / name)
    return root


def _opts(src: Path, out: Path, **kw) -> PackOptions:
    return PackOptions(sources=[str(src)], out=out, workers=1, progress=False, shard_size_mb=0.2, **kw)


def _one_line_error(proc, *words) -> None:
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_parts_merged_equal_the_single_pack_record_for_record(src, tmp_path):
    # byte-identical copies inside one identity and across identities (parts see only their own)
    first = sorted((src / PEOPLE[0]).glob("*.png"))
    shutil.copy(first[0], src / PEOPLE[2] / "copy-a.png")
    shutil.copy(first[1], src / PEOPLE[1] / "copy-b.png")
    single = pack(_opts(src, tmp_path / "single", holdout=2))
    for k in (2, 0, 3, 1):  # any order, as a scheduler runs them
        journal = pack(_opts(src, tmp_path / "parts", holdout=2, part=(k, 4)))
        assert journal["done"] and not (tmp_path / "parts" / "manifest.json").exists()
    merged = merge(tmp_path / "parts", progress=False)
    a, b = all_records(tmp_path / "single"), all_records(tmp_path / "parts")
    assert len(a) == len(b) == single["num_images"] == merged["num_images"]
    assert [h.id for h, _ in a] == [h.id for h, _ in b]
    assert [(float(h.label), img) for h, img in a] == [(float(h.label), img) for h, img in b]
    assert single["skipped"] == merged["skipped"] and single["skipped"]["by_reason"]["duplicate"] >= 2
    for name in ("classes.tsv", "holdout_pairs.bin"):
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes()
    assert sorted((tmp_path / "single" / "skipped.tsv").read_text().splitlines()) == \
        sorted((tmp_path / "parts" / "skipped.tsv").read_text().splitlines())
    assert single["fingerprint"] == merged["fingerprint"] and merged["parts"] == 4
    assert not (tmp_path / "parts" / ".pack-state").exists()
    run_cli("pipeline", "verify", str(tmp_path / "parts"), "--no-progress")


def test_merge_names_the_parts_not_done(src, tmp_path):
    out = tmp_path / "parts"
    pack(_opts(src, out, part=(1, 3)))
    proc = run_cli("pipeline", "merge", str(out), "--no-progress", check=False)
    _one_line_error(proc, "2 of 3 parts", "part 0, 2")
    with pytest.raises(PackError, match="no pack parts"):
        merge(tmp_path / "empty")


def test_pack_never_deletes_files_it_did_not_write(src, tmp_path):
    """Issue O.1: a fresh pack removed train-*, classes.tsv, ... it had not written, and exited 0."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "train-notes.txt").write_text("x")
    (out / "classes.tsv").write_text("mine")
    proc = run_cli("pipeline", "pack", str(src), "--out", str(out), "--no-progress", check=False)
    _one_line_error(proc, "train-notes.txt", "classes.tsv")
    assert (out / "train-notes.txt").read_text() == "x" and (out / "classes.tsv").read_text() == "mine"
    # a finished dataset: --overwrite removes what its manifest names, and refuses around foreign files
    (out / "train-notes.txt").unlink()
    (out / "classes.tsv").unlink()
    pack(_opts(src, out))
    (out / "train-notes.txt").write_text("x")
    with pytest.raises(PackError, match="train-notes.txt"):
        pack(_opts(src, out, seed=4, overwrite=True))
    assert (out / "manifest.json").exists() and (out / "train-notes.txt").exists()
    (out / "train-notes.txt").unlink()
    old = set(os.listdir(out))
    pack(_opts(src, out, seed=4, overwrite=True))
    assert load_manifest(out)["seed"] == 4 and set(os.listdir(out)) <= old | {"train-00005.rec", "train-00005.idx"}


@pytest.mark.parametrize("args,words", [
    (["--shard-size", "0"], ["--shard-size", "positive"]),
    (["--shard-size", "-1"], ["--shard-size"]),
    (["--shard-size", "nan"], ["--shard-size"]),
    (["--holdout", "-1"], ["--holdout", ">= 0"]),
    (["--workers", "0"], ["--workers"]),
    (["--part", "3/3"], ["--part"]),
    (["--quality", "101"], ["--quality"]),
])
def test_bad_arguments_are_refused_up_front(src, tmp_path, args, words):
    """Issue O.9: --shard-size 0 gave one shard per image, nan left .pack-state behind, --holdout -1 passed."""
    proc = run_cli("pipeline", "pack", str(src), "--out", str(tmp_path / "d"), "--no-progress", *args, check=False)
    _one_line_error(proc, *words)
    assert proc.returncode == 2 and not (tmp_path / "d").exists()


def test_a_file_name_that_is_not_utf8_is_packed(src, tmp_path):
    """Issue O.9: one non-UTF-8 name aborted the whole pack (the fingerprint encoded it)."""
    face = next((src / PEOPLE[0]).glob("*.png"))
    odd = os.path.join(os.fsencode(src / PEOPLE[0]), b"caf\xe9.png")
    with open(odd, "wb") as f:
        f.write(face.read_bytes()[:-12] + b"\0" * 12)  # distinct bytes, still decodable or skipped: named either way
    with open(os.path.join(os.fsencode(src), b"\xff-notes"), "wb") as f:
        f.write(b"x")
    m = pack(_opts(src, tmp_path / "d"))
    skipped = (tmp_path / "d" / "skipped.tsv").read_bytes()
    assert b"\xff-notes" in skipped  # the name as the file system has it
    total = sum(1 for name in PEOPLE for _ in (src / name).iterdir())
    assert m["num_images"] + m["skipped"]["count"] == total + 1


def test_malformed_inputs_get_one_line_errors_naming_the_file(src, tmp_path):
    bad_rec = tmp_path / "faces.rec"
    bad_rec.write_bytes(b"this is not recordio" * 10)
    _one_line_error(run_cli("pipeline", "pack", str(bad_rec), "--out", str(tmp_path / "d"), "--no-progress", check=False),
                    str(bad_rec), "not a RecordIO file")
    lst = tmp_path / "x.lst"
    lst.write_bytes(b"a.png\t1\n\xff\xfe.png\t2\n")
    _one_line_error(run_cli("pipeline", "pack", str(lst), "--out", str(tmp_path / "d"), "--no-progress", check=False),
                    f"{lst}:2", "UTF-8")
    # --out inside the source would make the output a new identity on the next run
    _one_line_error(run_cli("pipeline", "pack", str(src), "--out", str(src / "packed"), "--no-progress", check=False),
                    "inside the source")
    assert not (src / "packed").exists()


def test_a_tab_in_a_class_name_keeps_classes_tsv_one_line_per_class(src, tmp_path):
    (src / PEOPLE[0]).rename(src / "Barack\tObama")
    m = pack(_opts(src, tmp_path / "d"))
    lines = (tmp_path / "d" / "classes.tsv").read_text().splitlines()
    assert len(lines) == m["num_classes"] == 3
    assert [line.split("\t") for line in lines][0] == ["0", "Barack\\tObama"]
