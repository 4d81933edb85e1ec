"""trainer.eval.pairs: verification sets scored with the flip test, and evaluate_targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._eval_helpers import SmallConv, encode, face_images, write_bin
from trainer.eval import kfold
from trainer.eval.embedding import embed_images
from trainer.eval.pairs import evaluate_targets, verify
from trainer.eval.targets import _CACHE, load_bin


def test_mirror_pairs_verify_perfectly_only_with_the_flip_test(faces, tmp_path):
    # Genuine pairs are an image and its mirror image: the flip-test embedding is the same for both.
    imgs = [im for ims in face_images(faces).values() for im in ims]
    blobs, issame = [], []
    for i in range(10):
        blobs += [encode(imgs[i]), encode(imgs[i][:, ::-1])]
        issame.append(True)
        blobs += [encode(imgs[i]), encode(imgs[(i + 5) % 16])]
        issame.append(False)
    path = write_bin(tmp_path / "mirror.bin", blobs, issame)
    with_flip = evaluate_targets(SmallConv(), [str(path)], "cpu", batch_size=8)["mirror"]
    assert with_flip["acc"] == 1.0 and with_flip["pairs"] == 20
    target = load_bin(path)
    no_flip = verify(SmallConv(), target, "cpu", flip=False)
    flip = verify(SmallConv(), target, "cpu", flip=True)
    assert np.allclose(flip.genuine, 1.0, atol=1e-6)
    assert no_flip.genuine.min() < 0.9999


def test_evaluate_targets_by_name_matches_scoring_by_hand(faces, tmp_path):
    imgs = face_images(faces)
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
    out = evaluate_targets(model, {"glint": str(path)}, torch.device("cpu"), batch_size=5)
    assert set(out) == {"glint"}
    r = out["glint"]
    assert {"acc", "std", "xnorm", "pairs", "threshold", "tar_at_far"} <= set(r)
    assert r["pairs"] == 24 and set(r["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert r["tar_at_far"]["1e-1"] is not None and r["tar_at_far"]["1e-2"] is None  # 12 impostors
    # The same numbers from the parts: decode, embed with flip, insightface's k-fold.
    target = load_bin(path)
    emb = embed_images(model, target.images, "cpu").embeddings
    d = kfold.pair_distances(emb[0::2], emb[1::2])
    ref = kfold.kfold_accuracy(d, target.issame)
    assert r["acc"] == pytest.approx(ref.acc) and r["std"] == pytest.approx(ref.std)
    # A second evaluation reuses the decoded images.
    assert evaluate_targets(model, {"glint": str(path)}, "cpu")["glint"]["acc"] == r["acc"]
    assert any(k[0] == str(path.resolve()) for k in _CACHE)
