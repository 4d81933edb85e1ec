"""trainer.metrics against hand-computed cases, and the tiled/chunked paths against brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer import metrics as M


# --------------------------------------------------------------------------- insightface k-fold accuracy

def test_kfold_splits_are_sklearn_kfold_without_shuffle():
    folds = M.kfold_splits(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(folds), np.arange(23))
    with pytest.raises(ValueError):
        M.kfold_splits(5, 10)


def test_kfold_accuracy_hand_computed():
    # Fold 1 = pairs 0-2, fold 2 = pairs 3-5. Thresholds 0.5, 1.0, 2.0; accept when distance < threshold.
    distances = np.array([0.1, 0.2, 0.9, 0.3, 0.4, 1.6])
    issame = np.array([True, True, False, True, False, False])
    r = M.kfold_accuracy(distances, issame, n_folds=2, thresholds=np.array([0.5, 1.0, 2.0]))
    # Test fold 1: on fold 2, 0.5 and 1.0 both get 2/3 right: the first (0.5) is taken; fold 1 scores 3/3.
    # Test fold 2: on fold 1, 0.5 is best (3/3); on fold 2 it accepts the impostor at 0.4: 2/3.
    assert np.allclose(r.accuracies, [1.0, 2 / 3])
    assert np.allclose(r.thresholds, [0.5, 0.5])
    assert r.acc == pytest.approx(5 / 6)
    assert r.std == pytest.approx(1 / 6)
    # ROC at threshold 2.0 accepts everything in both test folds.
    assert r.tpr[2] == 1.0 and r.fpr[2] == 1.0


def _kfold_reference(distances, issame, thresholds, n_folds=10):
    """insightface's calculate_roc, written plainly: a loop over folds and thresholds."""
    n = len(distances)
    sizes = [n // n_folds + (1 if i < n % n_folds else 0) for i in range(n_folds)]
    start, accs = 0, []
    for size in sizes:
        test = np.arange(start, start + size)
        start += size
        train = np.setdiff1d(np.arange(n), test)
        train_acc = [np.mean((distances[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((distances[test] < best) == issame[test]))
    return np.array(accs)


def test_kfold_accuracy_matches_plain_loop_on_insightface_grid():
    rng = np.random.default_rng(3)
    issame = rng.random(601) < 0.5
    distances = np.where(issame, rng.normal(0.9, 0.3, 601), rng.normal(1.6, 0.3, 601)).clip(0, 4)
    distances[:7] = 1.25  # exact ties on a grid threshold
    r = M.kfold_accuracy(distances, issame)
    ref = _kfold_reference(distances, issame, M.DISTANCE_THRESHOLDS)
    assert np.allclose(r.accuracies, ref)
    assert 0.8 < r.acc < 1.0


def test_pair_distances_and_similarities_of_unit_vectors():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[4.0, 3.0], [0.0, 2.0]])
    sims = M.pair_similarities(a, b)
    assert np.allclose(sims, [24 / 25, 0.0])
    assert np.allclose(M.pair_distances(a, b), 2 - 2 * sims)


# ----------------------------------------------------------------------------------------- TAR at FAR

def test_tar_at_far_hand_computed():
    genuine = np.array([0.9, 0.8, 0.3])
    impostor = np.array([0.7, 0.5, 0.2, 0.1])
    r = M.tar_at_far(genuine, impostor, fars=(0.1, 0.25, 0.5, 0.75))
    assert r[0.1].tar is None  # 0.1 * 4 impostors < 1: not measurable
    assert (r[0.25].tar, r[0.25].threshold, r[0.25].measured_far) == (pytest.approx(2 / 3), 0.5, 0.25)
    assert (r[0.5].tar, r[0.5].threshold, r[0.5].measured_far) == (1.0, 0.2, 0.5)
    assert (r[0.75].tar, r[0.75].threshold) == (1.0, 0.1)


def test_tar_at_far_ties_are_not_accepted():
    genuine = np.array([0.5, 0.6])
    impostor = np.array([0.5, 0.5, 0.2, 0.1])
    r = M.tar_at_far(genuine, impostor, fars=(0.25,))[0.25]
    # k = 1 impostor may pass, but the 2nd highest equals the highest: the threshold 0.5 lets none pass.
    assert (r.tar, r.threshold, r.measured_far) == (0.5, 0.5, 0.0)


def test_far_key():
    assert [M.far_key(f) for f in M.FARS] == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


# ------------------------------------------------------------------------------ all-to-all, in tiles

def test_all_pairs_hand_computed():
    emb = np.array([[1, 0], [0.75, 0.25], [0.5, 0.5], [0, 1]], np.float32)
    labels = np.array([0, 0, 1, 1])
    # Pairs: AB 0.75 gen, AC 0.5, AD 0, BC 0.5, BD 0.25, CD 0.5 gen.
    r = M.all_pairs_verification(emb, labels, fars=(0.2, 0.25, 0.5), tile=3, device="cpu", progress=False)
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
    ref = M.tar_at_far(gen, imp, FARS)
    r = M.all_pairs_verification(emb, labels, fars=FARS, tile=tile, device="cpu", progress=False)
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
    ref = M.tar_at_far(gen, imp, FARS)
    r = M.all_pairs_verification(probe, pl, gallery, gl, probe_groups=pg, gallery_groups=gg, fars=FARS,
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
    emb = M.l2_normalize(centres[labels] + 1.2 * rng.normal(size=(500, 32)))
    gen, imp = _brute_force(emb, labels)
    ref = M.tar_at_far(gen, imp)
    r = M.all_pairs_verification(emb, labels, tile=128, device="cpu", progress=False)
    for f in M.FARS:
        if ref[f].tar is None:
            assert r.tar_at_far[f].tar is None
        else:  # the tiles' matmul may round a score differently in the last bit than the full one
            assert r.tar_at_far[f].threshold == pytest.approx(ref[f].threshold, abs=1e-6)
            assert abs(r.tar_at_far[f].tar - ref[f].tar) <= 1 / len(gen)
    assert 0.5 < r.acc <= 1.0 and r.std >= 0


def test_histogram_kfold_hand_computed():
    # Fold 0: an impostor in bin 100, a genuine in bin 200. Fold 1: a genuine in 250, an impostor in 300.
    hist = np.zeros((2, 2, M._BINS), np.int64)
    hist[0, 0, 100] = hist[0, 1, 200] = hist[1, 1, 250] = hist[1, 0, 300] = 1
    accs, _ = M.kfold_accuracy_from_histograms(hist)
    # Test fold 0: on fold 1 the best is 1 of 2, and the strictest such threshold accepts nothing: fold 0
    # then gets its impostor right and its genuine wrong. Test fold 1: on fold 0 any threshold in
    # (100, 200] is perfect; the strictest, 200, accepts both pairs of fold 1.
    assert np.allclose(accs, [0.5, 0.5])


def test_all_pairs_separable_set_has_accuracy_one():
    emb = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [-1, 0], [-1, 0]] * 4, np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2] * 4)
    r = M.all_pairs_verification(emb, labels, n_folds=3, tile=5, device="cpu", progress=False)
    assert np.allclose(r.accuracies, 1.0)
    assert r.tar_at_far[1e-1].tar == 1.0
    assert r.roc_tpr[-1] == 1.0 and r.roc_fpr[-1] == 1.0


def test_all_pairs_rejects_nan_embeddings():
    emb = np.ones((4, 3), np.float32)
    emb[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.all_pairs_verification(emb, np.array([0, 0, 1, 1]), device="cpu", progress=False)


def test_sortable_key_orders_like_floats():
    values = np.array([-1.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.5, 1.0], np.float32)
    keys = M._sortable_key_(torch.from_numpy(values.copy())).numpy()
    assert np.all(np.diff(keys[[0, 1, 2, 4, 5, 6, 7, 8]]) > 0)
    assert keys[3] == keys[4]  # -0.0 and +0.0 are one value
    assert [M._key_to_float(int(k)) for k in keys] == [float(v) for v in values[[0, 1, 2, 4, 4, 5, 6, 7, 8]]]


# -------------------------------------------------------------------------------------- identification

def test_chunked_topk_equals_full_topk_on_a_memmap(tmp_path):
    rng = np.random.default_rng(5)
    query = rng.normal(size=(13, 8)).astype(np.float32)
    gallery = rng.normal(size=(101, 8)).astype(np.float32)
    np.save(tmp_path / "g.npy", gallery)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    ql, gl = rng.integers(0, 4, 13), rng.integers(0, 4, 101)
    s, i = M.chunked_topk(query, mm, 6, query_labels=ql, gallery_labels=gl, chunk=7, query_chunk=5,
                          device="cpu", progress=False)
    full = torch.from_numpy(query @ gallery.T)
    full[torch.from_numpy(ql[:, None] == gl[None, :])] = -math.inf
    ref_s, ref_i = torch.topk(full, 6, dim=1)
    assert torch.allclose(s, ref_s)
    assert torch.equal(i, ref_i)


def test_chunked_topk_pads_a_small_gallery():
    eye = np.eye(2, dtype=np.float32)
    s, i = M.chunked_topk(eye, eye, 3, device="cpu", progress=False)
    assert s[:, 2].tolist() == [-math.inf, -math.inf]
    assert i[:, 2].tolist() == [-1, -1]
    assert i[:, 0].tolist() == [0, 1]


_PROBES = np.array([[1, 0], [0.5, 0.5], [0, 1], [0.25, 0.75]], np.float32)
_PROBE_IDS = np.array([0, 0, 1, 1])
_DISTRACTORS = np.array([[0.75, 0], [0, 0.5], [0.25, 0.25]], np.float32)


def test_megaface_cmc_hand_computed():
    # Ordered mate pairs (probe, mate): (0,1) 0.5, (1,0) 0.5, (2,3) 0.75, (3,2) 0.75.
    # Distractor scores: probe 0 [.75, .25, 0], 1 [.375, .25, .25], 2 [.5, .25, 0], 3 [.375, .25, .1875].
    # Only (0,1) has a distractor above it (0.75): rank 2; the others are rank 1.
    r = M.megaface_cmc(_PROBES, _PROBE_IDS, _DISTRACTORS, max_rank=3, chunk=2, device="cpu", progress=False)
    assert r.n_pairs == 4 and r.n_distractors == 3
    assert np.allclose(r.rates, [0.75, 1.0, 1.0])
    assert r.rank(1) == 0.75


def test_megaface_cmc_ties_go_to_the_mate():
    # A distractor scoring exactly the mate's 0.5 for probe 1 (and probe 0) does not push either down.
    distractors = np.vstack([_DISTRACTORS, [[0.5, 0.5]]]).astype(np.float32)
    r = M.megaface_cmc(_PROBES, _PROBE_IDS, distractors, max_rank=2, device="cpu", progress=False)
    assert np.allclose(r.rates, [0.75, 1.0])


def test_megaface_cmc_masked_probes_skip_their_own_source():
    masked = np.array([[1, 0], [0, 1]], np.float32)  # copies of gallery photos 10 and 20
    masked_ids, masked_src = np.array([0, 1]), np.array([10, 20])
    gallery = np.array([[1, 0], [0.6, 0.8], [0, 1], [0.8, 0.6]], np.float32)
    gallery_ids, gallery_photo = np.array([0, 0, 1, 1]), np.array([10, 11, 20, 21])
    distractors = np.array([[0.7, 0.0], [0.0, 0.7]], np.float32)
    # Mate pairs: (masked 0, photo 11) 0.6 and (masked 1, photo 21) 0.6: the identical photos 10 and 20
    # (score 1.0) are left out. Distractors: masked 0 scores 0.7 and 0, masked 1 scores 0 and 0.7: one
    # distractor above each mate.
    r = M.megaface_cmc(masked, masked_ids, distractors, mates=gallery, mate_labels=gallery_ids,
                       probe_groups=masked_src, mate_groups=gallery_photo, max_rank=2, device="cpu",
                       progress=False)
    assert r.n_pairs == 2
    assert np.allclose(r.rates, [0.0, 1.0])


def test_megaface_cmc_set_as_its_own_distractors():
    # With distractor labels, a probe's own identity is not among its distractors: a perfectly clustered
    # set is then identified at rank 1.
    emb = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    ids = np.array([0, 0, 1, 1])
    r = M.megaface_cmc(emb, ids, emb, distractor_labels=ids, max_rank=1, device="cpu", progress=False)
    assert r.rates.tolist() == [1.0]


def test_mate_pairs():
    p, m = M.mate_pairs(np.array([0, 1, 0]), np.array([1, 0, 0, 2]))
    assert sorted(zip(p.tolist(), m.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 1), (2, 2)]
