"""pipeline/attributes.py: `pipeline pack --attributes` reads CelebA's list_attr_celeba.txt as it is."""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from pipeline.attributes import AttributeFileError, read_attribute_file
from pipeline.dataset import PackedDataset
from pipeline.manifest import load_manifest
from tests.conftest import run_cli

# CelebA's own layout: a count, the names with a trailing space, rows padded with two spaces before a 1.
CELEBA = """3
Male Big_Nose Chubby 
000001.jpg -1  1 -1
000002.jpg  1 -1 -1
000003.jpg  1  1  1
"""


def test_celeba_file_parsed(tmp_path):
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(CELEBA)
    names, table = read_attribute_file(path)
    assert names == ["Male", "Big_Nose", "Chubby"]
    assert table == {"000001.jpg": (0.0, 1.0, 0.0), "000002.jpg": (1.0, 0.0, 0.0), "000003.jpg": (1.0, 1.0, 1.0)}
    # In the TSV format -1 means unknown; CelebA's -1 is "no": the two are told apart by the first line.
    tsv = tmp_path / "a.tsv"
    tsv.write_text("path\tMale\n000001.jpg\t-1\n000002.jpg\t1\n")
    assert read_attribute_file(tsv)[1] == {"000001.jpg": (-1.0,), "000002.jpg": (1.0,)}
    for bad, match in ((CELEBA.replace("3\n", "4\n", 1), "line 1 says 4 images, the file lists 3"),
                       (CELEBA.replace("000002.jpg  1", "000002.jpg  2"), "1 or -1, not '2'"),
                       (CELEBA.replace("000003.jpg  1  1  1", "000003.jpg  1  1"), ":5: expected a file name")):
        path.write_text(bad)
        with pytest.raises(AttributeFileError, match=match):
            read_attribute_file(path)


def test_pack_with_celeba_attributes(glint24, tmp_path):
    # CelebA-like input: unique file names (in identity folders here), the annotation file elsewhere.
    src, anno = tmp_path / "src", tmp_path / "Anno"
    anno.mkdir()
    rows, male = [], {}
    for k, person in enumerate(["Barack Obama", "Halle Berry"]):
        (src / person).mkdir(parents=True)
        for j, f in enumerate(sorted((glint24 / person).glob("*.png"))[:6]):
            name = f"{k * 100 + j + 1:06d}.png"
            shutil.copy(f, src / person / name)
            male[name] = 1 - k
            rows.append(f"{name} {'1' if k == 0 else '-1'}  {'1' if j % 2 else '-1'}")
    (anno / "list_attr_celeba.txt").write_text(f"{len(rows)}\nMale Smiling \n" + "\n".join(rows) + "\n")
    out = tmp_path / "d"
    run_cli("pipeline", "pack", str(src), "--out", str(out), "--attributes", str(anno / "list_attr_celeba.txt"),
            "--no-progress", "--workers", "1")
    assert load_manifest(out)["label_fields"] == ["identity", "Male", "Smiling"]
    ds = PackedDataset(out, raw=True, return_label_vector=True)
    names = dict(line.split("\t")[:2] for line in (out / "classes.tsv").read_text().splitlines())
    obama = [int(i) for i, n in names.items() if n == "Barack Obama"][0]
    vectors = [ds[i][2] for i in range(len(ds))]
    assert len(vectors) == 12 and all(v[1] in (0.0, 1.0) and v[2] in (0.0, 1.0) for v in vectors)
    assert all((v[1] == 1.0) == (int(v[0]) == obama) for v in vectors)
    assert sum(v[2] for v in vectors) == 6  # every other image smiles: none is unknown

    # Two images of one file name: a bare CelebA row cannot say which it means.
    Image.open(src / "Halle Berry" / "000101.png").save(src / "Barack Obama" / "000101.png")
    proc = run_cli("pipeline", "pack", str(src), "--out", str(tmp_path / "e"), "--attributes",
                   str(anno / "list_attr_celeba.txt"), "--no-progress", "--workers", "1", check=False)
    assert proc.returncode == 1 and "matches both" in proc.stderr and "000101.png" in proc.stderr


def test_lookup_by_path_and_offset(tmp_path):
    from pipeline.attributes import load_attributes
    from pipeline.sources import SourceListing

    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "list_attr_celeba.txt").write_text(CELEBA)
    names, lookup = load_attributes(tmp_path / "list_attr_celeba.txt", [SourceListing("imagefolder",
                                                                                       str(tmp_path / "img"))])
    path = str(tmp_path / "img" / "a" / "000003.jpg")
    assert names == ["Male", "Big_Nose", "Chubby"]
    assert lookup(path) == (1.0, 1.0, 1.0)
    assert lookup(str(tmp_path / "img" / "a" / "999.jpg")) == (-1.0, -1.0, -1.0)  # not in the file
    assert lookup(path, offset=0) == (-1.0, -1.0, -1.0)  # a record of a .rec file
    with pytest.raises(AttributeFileError, match="cannot read"):
        read_attribute_file(tmp_path / "missing.txt")
