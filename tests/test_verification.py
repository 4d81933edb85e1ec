"""trainer.verification: .bin packs and pairs.txt on real glint24 faces, the flip test, evaluate_targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests._eval_helpers import encode, face_folder, read_rgb, write_bin
from trainer import metrics, verification as V


class ChannelMeans(nn.Module):
    """A model whose embedding is knowable by hand: per channel, the mean of the left and the right half of
    the normalised image, plus a constant (so that no embedding is zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[3] // 2
        return torch.cat([x[..., :w].mean((2, 3)), x[..., w:].mean((2, 3)), torch.ones(len(x), 1)], dim=1)


class SmallConv(nn.Module):
    """A random conv net with BatchNorm (to see that eval mode is used and restored)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, 4), nn.BatchNorm2d(8), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, 2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(64, 16))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def faces(glint24, tmp_path_factory):
    return face_folder(glint24, tmp_path_factory.mktemp("faces") / "faces", identities=4, per_identity=4)


def _images(faces):
    people = sorted(p for p in faces.iterdir())
    return {p.name: [read_rgb(f) for f in sorted(p.glob("*.png"))] for p in people}


# ---------------------------------------------------------------------------------------------- loading

def test_load_bin_decodes_png_and_jpeg_pairs(faces, tmp_path):
    imgs = _images(faces)
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
    img = _images(faces)[sorted(_images(faces))[0]][0]
    big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # 224x224
    path = write_bin(tmp_path / "big.bin", [encode(big), encode(img)], [True])
    vs = V.load_bin(path)
    assert vs.images.shape == (2, 112, 112, 3)
    assert np.abs(vs.images[0].astype(int) - img).mean() < 4


def test_load_bin_errors(tmp_path):
    odd = write_bin(tmp_path / "odd.bin", [b"x", b"y", b"z"], [True])
    with pytest.raises(V.VerificationError, match="two per pair"):
        V.load_bin(odd)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(V.VerificationError, match="not an insightface"):
        V.load_bin(tmp_path / "junk.bin")
    broken = write_bin(tmp_path / "broken.bin", [b"\x89PNG broken", b"\xff\xd8 broken"], [False])
    with pytest.raises(V.VerificationError, match="image 0 does not decode"):
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
    img = _images(faces)
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
    with pytest.raises(V.VerificationError, match=r"bad.txt:1"):
        V.load_target(bad, root=faces)
    missing = tmp_path / "missing.txt"
    missing.write_text("Nobody 1 2\n")
    with pytest.raises(V.VerificationError, match="no image for 'Nobody'"):
        V.load_target(missing, root=faces)


def test_pairs_txt_raw_photos_need_align(faces, tmp_path):
    img = _images(faces)[sorted(_images(faces))[0]][0]
    (tmp_path / "a.png").write_bytes(encode(np.pad(img, ((40, 40), (60, 60), (0, 0)))))
    (tmp_path / "b.png").write_bytes(encode(img))
    txt = tmp_path / "p.txt"
    txt.write_text("a.png b.png 1\n")
    with pytest.raises(V.VerificationError, match="--align"):
        V.load_target(txt)


# ---------------------------------------------------------------------------------------- embeddings

def test_embeddings_normalise_pixels_and_sum_the_mirror_image():
    img = np.zeros((1, 112, 112, 3), np.uint8)
    img[:, :, :56] = 255  # left half white, right half black
    emb = V.embed_images(ChannelMeans(), img, "cpu", flip=False)
    # (255 - 127.5) / 127.5 = 1 and (0 - 127.5) / 127.5 = -1: left means 1, right means -1.
    assert np.allclose(emb.embeddings[0], [1, 1, 1, -1, -1, -1, 1])
    flipped = V.embed_images(ChannelMeans(), img, "cpu", flip=True)
    assert np.allclose(flipped.embeddings[0], [0, 0, 0, 0, 0, 0, 2])
    assert flipped.xnorm == pytest.approx(np.sqrt(7))


def test_embed_restores_training_mode_and_uses_eval_mode():
    model = SmallConv().train()
    x = np.random.default_rng(0).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    a = V.embed_images(model, x, "cpu", batch_size=4, flip=False).embeddings
    assert model.training
    b = V.embed_images(model, x[:1], "cpu", flip=False).embeddings  # batch of one: fine in eval mode
    assert np.allclose(a[:1], b, atol=1e-5)


def test_non_finite_embeddings_are_an_error_not_a_score():
    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 4), float("nan"))

    with pytest.raises(FloatingPointError, match="NaN"):
        V.embed_images(Broken(), np.zeros((2, 112, 112, 3), np.uint8), "cpu")


def test_mirror_pairs_verify_perfectly_only_with_the_flip_test(faces, tmp_path):
    # Genuine pairs are an image and its mirror image: the flip-test embedding is the same for both.
    imgs = [im for ims in _images(faces).values() for im in ims]
    blobs, issame = [], []
    for i in range(10):
        blobs += [encode(imgs[i]), encode(imgs[i][:, ::-1])]
        issame.append(True)
        blobs += [encode(imgs[i]), encode(imgs[(i + 5) % 16])]
        issame.append(False)
    path = write_bin(tmp_path / "mirror.bin", blobs, issame)
    with_flip = V.evaluate_targets(SmallConv(), [str(path)], "cpu", batch_size=8)["mirror"]
    assert with_flip["acc"] == 1.0 and with_flip["pairs"] == 20
    target = V.load_bin(path)
    no_flip = V.verify(SmallConv(), target, "cpu", flip=False)
    flip = V.verify(SmallConv(), target, "cpu", flip=True)
    assert np.allclose(flip.genuine, 1.0, atol=1e-6)
    assert no_flip.genuine.min() < 0.9999


def test_evaluate_targets_by_name_matches_scoring_by_hand(faces, tmp_path):
    imgs = _images(faces)
    names = sorted(imgs)
    blobs, issame = [], []
    for k, name in enumerate(names):
        for i in range(3):
            blobs += [encode(imgs[name][i]), encode(imgs[name][i + 1])]
            issame.append(True)
            blobs += [encode(imgs[name][i]), encode(imgs[names[(k + 1) % 4]][i])]
            issame.append(False)
    path = write_bin(tmp_path / "holdout.bin", blobs, issame)
    model = SmallConv()
    out = V.evaluate_targets(model, {"glint": str(path)}, torch.device("cpu"), batch_size=5)
    assert set(out) == {"glint"}
    r = out["glint"]
    assert {"acc", "std", "xnorm", "pairs", "threshold", "tar_at_far"} <= set(r)
    assert r["pairs"] == 24 and set(r["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert r["tar_at_far"]["1e-1"] is not None and r["tar_at_far"]["1e-2"] is None  # 12 impostors
    # The same numbers from the parts: decode, embed with flip, insightface's k-fold.
    target = V.load_bin(path)
    emb = V.embed_images(model, target.images, "cpu").embeddings
    d = metrics.pair_distances(emb[0::2], emb[1::2])
    ref = metrics.kfold_accuracy(d, target.issame)
    assert r["acc"] == pytest.approx(ref.acc) and r["std"] == pytest.approx(ref.std)
    # A second evaluation reuses the decoded images.
    assert V.evaluate_targets(model, {"glint": str(path)}, "cpu")["glint"]["acc"] == r["acc"]
    assert any(k[0] == str(path.resolve()) for k in V._CACHE)


# ------------------------------------------------------------------------- raw photos and masked probes

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
    whole = V.face_crop(V.read_image_file(yale / "subject01.happy"), align=False)[0]
    assert np.abs(vs.images[0].astype(int) - whole).mean() > 10
    no_face = V.load_target(tmp_path / "extra.txt", root="/", align=True)
    assert no_face.align_failures == 1  # the blank image: resized whole, and counted


@pytest.mark.slow
def test_mask_probes_masks_the_first_image_of_each_pair(faces, tmp_path):
    imgs = [im for ims in _images(faces).values() for im in ims]
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
