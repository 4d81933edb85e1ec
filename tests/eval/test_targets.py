"""trainer.eval.targets: .bin packs and pairs.txt on real glint24 faces, raw photos aligned, masked probes."""
from __future__ import annotations

import numpy as np
import pytest

from tests._eval_helpers import encode, face_images, read_rgb, write_bin
from trainer.eval import images
from trainer.eval import targets as V

# ---------------------------------------------------------------------------------------------- loading

def test_load_bin_decodes_png_and_jpeg_pairs(faces, tmp_path):
    imgs = face_images(faces)
    a, b = list(imgs)[:2]
    pairs = [(imgs[a][0], imgs[a][1], True), (imgs[a][2], imgs[b][0], False)]
    blobs = []
    for x, y, _ in pairs:
        blobs += [encode(x, ".png"), encode(y, ".jpg")]
    path = write_bin(tmp_path / "tiny.bin", blobs, [s for *_, s in pairs])
    vs = V.load_bin(path)
    assert vs.name == "tiny" and vs.images.shape == (4, 112, 112, 3)
    assert vs.pairs.tolist() == [[0, 1], [2, 3]] and vs.issame.tolist() == [True, False]
    assert np.array_equal(vs.images[0], imgs[a][0])  # PNG: lossless
    assert np.abs(vs.images[1].astype(int) - imgs[a][1]).mean() < 3  # JPEG: close


def test_load_bin_resizes_other_sizes_like_insightface(faces, tmp_path):
    img = face_images(faces)[sorted(face_images(faces))[0]][0]
    big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # 224x224
    path = write_bin(tmp_path / "big.bin", [encode(big), encode(img)], [True])
    vs = V.load_bin(path)
    assert vs.images.shape == (2, 112, 112, 3)
    assert np.abs(vs.images[0].astype(int) - img).mean() < 4


def test_load_bin_errors(tmp_path):
    odd = write_bin(tmp_path / "odd.bin", [b"x", b"y", b"z"], [True])
    with pytest.raises(images.VerificationError, match="two per pair"):
        V.load_bin(odd)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(images.VerificationError, match="not an insightface"):
        V.load_bin(tmp_path / "junk.bin")
    broken = write_bin(tmp_path / "broken.bin", [b"\x89PNG broken", b"\xff\xd8 broken"], [False])
    with pytest.raises(images.VerificationError, match="image 0 does not decode"):
        V.load_bin(broken)


def test_pairs_txt_with_names_holding_spaces(faces, tmp_path):
    people = sorted(p.name for p in faces.iterdir())
    assert any(" " in p for p in people)  # glint24's folder names hold spaces: tab-separated lines
    numbers = {p: sorted(int(f.stem) for f in (faces / p).glob("*.png")) for p in people}
    a, b = people[0], people[1]
    lines = ["2\t1",
             f"{a}\t{numbers[a][0]}\t{numbers[a][1]}",
             f"{a}\t{numbers[a][0]}\t{b}\t{numbers[b][2]}"]
    txt = tmp_path / "pairs.txt"
    txt.write_text("\n".join(lines) + "\n")
    vs = V.load_target(txt, root=faces)
    assert vs.issame.tolist() == [True, False]
    assert len(vs.images) == 3  # the shared image is read once
    assert vs.pairs[0, 0] == vs.pairs[1, 0]
    assert np.array_equal(vs.images[vs.pairs[1, 1]], read_rgb(faces / b / f"{numbers[b][2]}.png"))


def test_pairs_txt_lfw_names_and_path_lines(faces, tmp_path):
    # LFW's own naming (name/name_0001.jpg) and 'path path 0|1' lines.
    root = tmp_path / "lfw"
    img = face_images(faces)
    names = sorted(img)
    for k, name in enumerate(("Ann_Lee", "Bo_Chen")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{name}_{i + 1:04d}.jpg").write_bytes(encode(img[names[k]][i], ".jpg"))
    txt = tmp_path / "lfw_pairs.txt"
    txt.write_text("Ann_Lee 1 2\nAnn_Lee 1 Bo_Chen 2\nAnn_Lee/Ann_Lee_0002.jpg Bo_Chen/Bo_Chen_0001.jpg 0\n")
    vs = V.load_target(txt, root=root)
    assert vs.issame.tolist() == [True, False, False]
    assert len(vs.images) == 4


def test_pairs_txt_errors_name_the_line(faces, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("just one two three four five\n")
    with pytest.raises(images.VerificationError, match=r"bad.txt:1"):
        V.load_target(bad, root=faces)
    missing = tmp_path / "missing.txt"
    missing.write_text("Nobody 1 2\n")
    with pytest.raises(images.VerificationError, match="no image for 'Nobody'"):
        V.load_target(missing, root=faces)


def test_pairs_txt_raw_photos_need_align(faces, tmp_path):
    img = face_images(faces)[sorted(face_images(faces))[0]][0]
    (tmp_path / "a.png").write_bytes(encode(np.pad(img, ((40, 40), (60, 60), (0, 0)))))
    (tmp_path / "b.png").write_bytes(encode(img))
    txt = tmp_path / "p.txt"
    txt.write_text("a.png b.png 1\n")
    with pytest.raises(images.VerificationError, match="--align"):
        V.load_target(txt)


@pytest.mark.slow
def test_pairs_of_raw_photos_are_aligned_on_the_fly(shared_data, tmp_path):
    yale = shared_data / "yale"  # 320x243 grey photos of whole heads, no file extension
    txt = tmp_path / "yale_pairs.txt"
    txt.write_text("subject01.happy\tsubject01.sad\t1\nsubject01.happy\tsubject02.happy\t0\n")
    (tmp_path / "blank.png").write_bytes(encode(np.full((200, 180, 3), 127, np.uint8)))
    (tmp_path / "extra.txt").write_text(f"{yale}/subject03.normal\t{tmp_path}/blank.png\t0\n")
    vs = V.load_target(txt, root=yale, align=True)
    assert vs.images.shape == (3, 112, 112, 3) and vs.align_failures == 0
    # Aligned crops, not the whole photo squeezed into 112x112.
    whole = images.face_crop(images.read_image_file(yale / "subject01.happy"), align=False)[0]
    assert np.abs(vs.images[0].astype(int) - whole).mean() > 10
    no_face = V.load_target(tmp_path / "extra.txt", root="/", align=True)
    assert no_face.align_failures == 1  # the blank image: resized whole, and counted


@pytest.mark.slow
def test_mask_probes_masks_the_first_image_of_each_pair(faces, tmp_path):
    imgs = [im for ims in face_images(faces).values() for im in ims]
    # Image 0 is the probe of pair 0 and the gallery image of pair 1.
    blobs = [encode(imgs[0]), encode(imgs[1]), encode(imgs[5]), encode(imgs[0])]
    target = V.load_bin(write_bin(tmp_path / "p.bin", blobs, [True, False]))
    masked = V.mask_probes(target, mode="2d", seed=3)
    assert masked.name == "p_masked_probe" and masked.mask_failures == 0
    assert len(masked.images) == 4 + 2
    p0, g0 = masked.pairs[0]
    p1, g1 = masked.pairs[1]
    assert np.array_equal(masked.images[g0], target.images[1])
    assert np.array_equal(masked.images[g1], target.images[3])  # unmasked as gallery
    for probe, src in ((p0, 0), (p1, 2)):
        diff = np.abs(masked.images[probe].astype(int) - target.images[src]).mean(axis=(1, 2))
        assert diff[70:100].mean() > 20 > diff[20:45].mean()  # mouth and chin covered, eyes not
    again = V.mask_probes(target, mode="2d", seed=3)
    assert np.array_equal(again.images, masked.images)  # seeded


def test_a_pairs_txt_is_named_after_its_folder(faces, tmp_path):
    # LFW ships lfw/pairs.txt: its results are "lfw", not "pairs"; another stem keeps its name.
    img = face_images(faces)
    name = sorted(img)[0]
    root = tmp_path / "lfw"
    (root / "Ann").mkdir(parents=True)
    for i in range(2):
        (root / "Ann" / f"Ann_{i + 1:04d}.png").write_bytes(encode(img[name][i]))
    (root / "pairs.txt").write_text("Ann 1 2\n")
    (root / "cplfw_pairs.txt").write_text("Ann 1 2\n")
    assert V.load_target(root / "pairs.txt").name == "lfw"
    assert V.load_target(root / "cplfw_pairs.txt").name == "cplfw_pairs"
    assert V.load_target(root / "pairs.txt", name="LFW-test").name == "LFW-test"
