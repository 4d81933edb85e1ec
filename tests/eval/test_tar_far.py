"""trainer.eval.tar_far against hand-computed cases, and the tiled all-to-all path against brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.eval import common
from trainer.eval import tar_far as T

# ----------------------------------------------------------------------------------------- TAR at FAR

def test_tar_at_far_hand_computed():
    genuine = np.array([0.9, 0.8, 0.3])
    impostor = np.array([0.7, 0.5, 0.2, 0.1])
    r = T.tar_at_far(genuine, impostor, fars=(0.1, 0.25, 0.5, 0.75))
    assert r[0.1].tar is None  # 0.1 * 4 impostors < 1: not measurable
    assert (r[0.25].tar, r[0.25].threshold, r[0.25].measured_far) == (pytest.approx(2 / 3), 0.5, 0.25)
    assert (r[0.5].tar, r[0.5].threshold, r[0.5].measured_far) == (1.0, 0.2, 0.5)
    assert (r[0.75].tar, r[0.75].threshold) == (1.0, 0.1)


def test_tar_at_far_ties_are_not_accepted():
    genuine = np.array([0.5, 0.6])
    impostor = np.array([0.5, 0.5, 0.2, 0.1])
    r = T.tar_at_far(genuine, impostor, fars=(0.25,))[0.25]
    # k = 1 impostor may pass, but the 2nd highest equals the highest: the threshold 0.5 lets none pass.
    assert (r.tar, r.threshold, r.measured_far) == (0.5, 0.5, 0.0)


def test_far_key():
    assert [common.far_key(f) for f in common.FARS] == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


# ------------------------------------------------------------------------------ all-to-all, in tiles

def test_all_pairs_hand_computed():
    emb = np.array([[1, 0], [0.75, 0.25], [0.5, 0.5], [0, 1]], np.float32)
    labels = np.array([0, 0, 1, 1])
    # Pairs: AB 0.75 gen, AC 0.5, AD 0, BC 0.5, BD 0.25, CD 0.5 gen.
    r = T.all_pairs_verification(emb, labels, fars=(0.2, 0.25, 0.5), tile=3, device="cpu", progress=False)
    assert (r.n_genuine, r.n_impostor, r.pairs) == (2, 4, 6)
    assert r.tar_at_far[0.2].tar is None
    for far, want in ((0.25, (0.5, 0.5, 0.0)), (0.5, (1.0, 0.25, 0.5))):
        got = r.tar_at_far[far]
        assert (got.tar, got.threshold, got.measured_far) == want, far


def _brute_force(probe, pl, gallery=None, gl=None, pg=None, gg=None):
    """Every score of the protocol from one full matrix, split into genuine and impostor."""
    if gallery is None:
        s = probe @ probe.T
        i, j = np.triu_indices(len(probe), 1)
        scores, same = s[i, j], pl[i] == pl[j]
        return scores[same], scores[~same]
    s = probe @ gallery.T
    same = pl[:, None] == gl[None, :]
    keep = np.ones_like(same)
    if pg is not None:
        keep = ~(same & (pg[:, None] == gg[None, :]) & (pg[:, None] >= 0))
    return s[same & keep], s[~same & keep]


def _grid_embeddings(rng, n, d=4, ids=7):
    """Multiples of 1/4 in [-0.5, 0.5]: every dot product is a multiple of 1/16 in [-1, 1], exact whatever
    the summation order, so tiled scores equal brute-force ones bit for bit (and ties are plentiful)."""
    return (rng.integers(-2, 3, size=(n, d)) / 4).astype(np.float32), rng.integers(0, ids, n)


FARS = (1e-3, 1e-2, 0.05, 0.1, 0.3)


@pytest.mark.parametrize("tile", [6, 13, 200])
def test_all_pairs_symmetric_equals_brute_force_exactly(tile):
    rng = np.random.default_rng(tile)
    emb, labels = _grid_embeddings(rng, 60)
    gen, imp = _brute_force(emb, labels)
    ref = T.tar_at_far(gen, imp, FARS)
    r = T.all_pairs_verification(emb, labels, fars=FARS, tile=tile, device="cpu", progress=False)
    assert (r.n_genuine, r.n_impostor) == (len(gen), len(imp))
    for f in FARS:
        assert r.tar_at_far[f].tar == ref[f].tar, f
        assert r.tar_at_far[f].threshold == ref[f].threshold, f
        assert r.tar_at_far[f].measured_far == ref[f].measured_far, f


@pytest.mark.parametrize("tile", [7, 64])
def test_all_pairs_probe_gallery_with_groups_equals_brute_force(tile):
    rng = np.random.default_rng(7)
    probe, pl = _grid_embeddings(rng, 40)
    gallery, gl = _grid_embeddings(rng, 70)
    gg = np.arange(100, 170)
    pg = np.where(rng.random(40) < 0.5, rng.choice(gg, 40), -1)  # half the probes have a source photo
    pl = np.where(pg >= 0, gl[np.clip(pg - 100, 0, 69)], pl)  # ... of their own identity
    gen, imp = _brute_force(probe, pl, gallery, gl, pg, gg)
    ref = T.tar_at_far(gen, imp, FARS)
    r = T.all_pairs_verification(probe, pl, gallery, gl, probe_groups=pg, gallery_groups=gg, fars=FARS,
                                 tile=tile, device="cpu", progress=False)
    excluded = int(((pl[:, None] == gl[None, :]) & (pg[:, None] == gg[None, :])).sum())
    assert excluded == int((pg >= 0).sum()) > 0
    assert (r.n_genuine, r.n_impostor) == (len(gen), len(imp))
    for f in FARS:
        assert (r.tar_at_far[f].tar, r.tar_at_far[f].threshold) == (ref[f].tar, ref[f].threshold), f


def test_all_pairs_random_floats_close_to_brute_force():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 30, 500)
    centres = rng.normal(size=(30, 32))
    emb = common.l2_normalize(centres[labels] + 1.2 * rng.normal(size=(500, 32)))
    gen, imp = _brute_force(emb, labels)
    ref = T.tar_at_far(gen, imp)
    r = T.all_pairs_verification(emb, labels, tile=128, device="cpu", progress=False)
    for f in common.FARS:
        if ref[f].tar is None:
            assert r.tar_at_far[f].tar is None
        else:  # the tiles' matmul may round a score differently in the last bit than the full one
            assert r.tar_at_far[f].threshold == pytest.approx(ref[f].threshold, abs=1e-6)
            assert abs(r.tar_at_far[f].tar - ref[f].tar) <= 1 / len(gen)
    assert 0.5 < r.acc <= 1.0 and r.std >= 0


def test_histogram_kfold_hand_computed():
    # Fold 0: an impostor in bin 100, a genuine in bin 200. Fold 1: a genuine in 250, an impostor in 300.
    hist = np.zeros((2, 2, T._BINS), np.int64)
    hist[0, 0, 100] = hist[0, 1, 200] = hist[1, 1, 250] = hist[1, 0, 300] = 1
    accs, _ = T.kfold_accuracy_from_histograms(hist)
    # Test fold 0: on fold 1 the best is 1 of 2, and the strictest such threshold accepts nothing: fold 0
    # then gets its impostor right and its genuine wrong. Test fold 1: on fold 0 any threshold in
    # (100, 200] is perfect; the strictest, 200, accepts both pairs of fold 1.
    assert np.allclose(accs, [0.5, 0.5])


def test_all_pairs_separable_set_has_accuracy_one():
    emb = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [-1, 0], [-1, 0]] * 4, np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2] * 4)
    r = T.all_pairs_verification(emb, labels, n_folds=3, tile=5, device="cpu", progress=False)
    assert np.allclose(r.accuracies, 1.0)
    assert r.tar_at_far[1e-1].tar == 1.0
    assert r.roc_tpr[-1] == 1.0 and r.roc_fpr[-1] == 1.0


def test_all_pairs_rejects_nan_embeddings():
    emb = np.ones((4, 3), np.float32)
    emb[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        T.all_pairs_verification(emb, np.array([0, 0, 1, 1]), device="cpu", progress=False)


def test_sortable_key_orders_like_floats():
    values = np.array([-1.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.5, 1.0], np.float32)
    keys = T._sortable_key_(torch.from_numpy(values.copy())).numpy()
    assert np.all(np.diff(keys[[0, 1, 2, 4, 5, 6, 7, 8]]) > 0)
    assert keys[3] == keys[4]  # -0.0 and +0.0 are one value
    assert [T._key_to_float(int(k)) for k in keys] == [float(v) for v in values[[0, 1, 2, 4, 4, 5, 6, 7, 8]]]


def test_histogram_balanced_kfold_hand_computed():
    # Fold 0: impostors in bins 100 and 300, a genuine in 200. Fold 1: a genuine in 250, impostor in 150.
    hist = np.zeros((2, 2, T._BINS), np.int64)
    hist[0, 0, 100] = hist[0, 0, 300] = hist[0, 1, 200] = hist[1, 1, 250] = hist[1, 0, 150] = 1
    # Test fold 0: on fold 1 any threshold in (150, 250] is perfect; the strictest, 250, on fold 0 accepts
    # the impostor at 300 and rejects the genuine: (0 + 1/2) / 2. Test fold 1: on fold 0, threshold 200
    # (accepting bins 200 and 300) has TPR 1, TNR 1/2: the best, 3/4; on fold 1 it is perfect.
    assert np.allclose(T.kfold_balanced_from_histograms(hist), [0.25, 1.0])


def test_all_pairs_imbalanced_chance_embeddings_balanced_accuracy_near_half():
    rng = np.random.default_rng(1)
    emb = common.l2_normalize(rng.normal(size=(240, 32)))
    labels = np.repeat(np.arange(80), 3)  # 240 genuine pairs against 28,440 impostor pairs
    r = T.all_pairs_verification(emb, labels, tile=64, device="cpu", progress=False)
    assert (r.n_genuine, r.n_impostor) == (240, 240 * 239 // 2 - 240)
    assert r.acc > 0.99 and len(r.balanced_accuracies) == 10
    assert 0.4 < r.balanced_acc < 0.62
