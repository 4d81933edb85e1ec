"""trainer.eval.kfold (insightface's 10-fold pair accuracy) against hand-computed cases and a plain loop."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.eval import kfold as K

# --------------------------------------------------------------------------- insightface k-fold accuracy

def test_kfold_splits_are_sklearn_kfold_without_shuffle():
    folds = K.kfold_splits(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(folds), np.arange(23))
    with pytest.raises(ValueError):
        K.kfold_splits(5, 10)


def test_kfold_accuracy_hand_computed():
    # Fold 1 = pairs 0-2, fold 2 = pairs 3-5. Thresholds 0.5, 1.0, 2.0; accept when distance < threshold.
    distances = np.array([0.1, 0.2, 0.9, 0.3, 0.4, 1.6])
    issame = np.array([True, True, False, True, False, False])
    r = K.kfold_accuracy(distances, issame, n_folds=2, thresholds=np.array([0.5, 1.0, 2.0]))
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
    r = K.kfold_accuracy(distances, issame)
    ref = _kfold_reference(distances, issame, K.DISTANCE_THRESHOLDS)
    assert np.allclose(r.accuracies, ref)
    assert 0.8 < r.acc < 1.0


def test_pair_distances_and_similarities_of_unit_vectors():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[4.0, 3.0], [0.0, 2.0]])
    sims = K.pair_similarities(a, b)
    assert np.allclose(sims, [24 / 25, 0.0])
    assert np.allclose(K.pair_distances(a, b), 2 - 2 * sims)


# --------------------------------------------------------------------- balanced accuracy (imbalanced sets)

def test_imbalanced_chance_scores_have_high_accuracy_but_balanced_accuracy_of_a_coin():
    # 240 genuine against 6,900 impostor pairs with scores that carry no information: always answering
    # "different person" is 96.6% accurate, and the 10-fold accuracy learns just that.
    rng = np.random.default_rng(0)
    issame = np.zeros(7140, bool)
    issame[rng.choice(7140, 240, replace=False)] = True
    r = K.kfold_accuracy(rng.uniform(0, 4, 7140), issame)
    assert K.majority_accuracy(240, 6900) == pytest.approx(6900 / 7140)
    assert r.acc >= 0.96
    assert len(r.balanced_accuracies) == 10 and 0.4 < r.balanced_acc < 0.6


def test_balanced_accuracy_hand_computed():
    # Fold 1 = pairs 0-3 (1 genuine), fold 2 = pairs 4-7 (1 genuine). Accept when distance < threshold.
    distances = np.array([0.1, 0.2, 0.3, 1.5, 0.4, 0.6, 1.2, 1.8])
    issame = np.array([True, False, False, False, True, False, False, False])
    r = K.kfold_accuracy(distances, issame, n_folds=2, thresholds=np.array([0.15, 0.5, 1.0]))
    # Train on fold 2: 0.5 (and 1.0) accept its genuine (0.4) and reject all 3 impostors; 0.15 rejects
    # everything (balanced 0.5). The first best, 0.5, on fold 1: genuine accepted, impostors 0.2 and 0.3
    # accepted, 1.5 rejected: (1 + 1/3) / 2. Train on fold 1: 0.15 is perfect; on fold 2 it rejects all:
    # (0 + 1) / 2.
    assert np.allclose(r.balanced_accuracies, [(1 + 1 / 3) / 2, 0.5])
    assert r.balanced_acc == pytest.approx(((1 + 1 / 3) / 2 + 0.5) / 2)
    # Plain accuracy takes the same thresholds here (0.5 is 4/4 on fold 2; 0.15 is 4/4 on fold 1): fold 1
    # gets 2 of 4 right, fold 2 its 3 impostors.
    assert np.allclose(r.accuracies, [0.5, 0.75])


def test_balanced_accuracy_skips_folds_with_one_kind_of_pair():
    distances = np.array([0.1, 0.2, 1.5, 1.6])
    issame = np.array([True, True, False, False])
    r = K.kfold_accuracy(distances, issame, n_folds=2, thresholds=np.array([0.5, 1.0]))
    assert len(r.balanced_accuracies) == 0 and np.isnan(r.balanced_acc)
