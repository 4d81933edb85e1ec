"""Verification on a list of pairs, insightface's protocol (LFW, CFP, AgeDB `.bin` packs): squared L2
distances of L2-normalised embeddings, the thresholds 0, 0.01, ..., 3.99, 10 folds in order (sklearn's
KFold without shuffling), the best threshold chosen on 9 folds and applied to the tenth.
Pure numbers in, numbers out: no models, no files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trainer.eval.common import l2_normalize

# insightface's threshold grid on the squared L2 distance of unit vectors (which lies in [0, 4]).
DISTANCE_THRESHOLDS = np.arange(0, 4, 0.01)


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Squared L2 distance of the L2-normalised embeddings of each pair (insightface's `dist`)."""
    diff = l2_normalize(emb1) - l2_normalize(emb2)
    return np.sum(np.square(diff), axis=1)


def pair_similarities(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair."""
    return np.sum(l2_normalize(emb1) * l2_normalize(emb2), axis=1)


def kfold_splits(n: int, n_folds: int) -> list[np.ndarray]:
    """Test-fold indices of sklearn's KFold(n_splits, shuffle=False): consecutive blocks, the first
    `n % n_folds` of them one longer."""
    if n < n_folds:
        raise ValueError(f"{n} pairs cannot be split into {n_folds} folds")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_folds)]


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _std(x: np.ndarray) -> float:
    return float(np.std(x)) if len(x) else float("nan")


class FoldScores:
    """Mean and spread of per-fold `accuracies` and `balanced_accuracies` (NaN without folds), shared by
    the pair protocol's and the all-pairs protocol's results."""

    accuracies: np.ndarray
    balanced_accuracies: np.ndarray

    @property
    def acc(self) -> float:
        return _mean(self.accuracies)

    @property
    def std(self) -> float:
        return _std(self.accuracies)

    @property
    def balanced_acc(self) -> float:
        return _mean(self.balanced_accuracies)

    @property
    def balanced_std(self) -> float:
        return _std(self.balanced_accuracies)


@dataclass
class KFoldResult(FoldScores):
    accuracies: np.ndarray  # test accuracy of each fold
    thresholds: np.ndarray  # the threshold chosen for each fold (on its 9 training folds)
    tpr: np.ndarray  # ROC over the threshold grid: true-positive rate averaged over the test folds
    fpr: np.ndarray
    # (TPR + TNR) / 2 of each fold that holds both kinds of pair, its threshold chosen on the other folds
    # for the best balanced accuracy: the accuracy that an imbalanced set cannot inflate.
    balanced_accuracies: np.ndarray = field(default_factory=lambda: np.zeros(0))



def balanced_rates(tp, fp, tn, fn) -> np.ndarray:
    """(TPR + TNR) / 2 elementwise; a class with no pairs counts as 0 for its half."""
    tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
    tpr = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    tnr = np.divide(tn, tn + fp, out=np.zeros_like(tn), where=(tn + fp) > 0)
    return (tpr + tnr) / 2


def majority_accuracy(n_genuine: int, n_impostor: int) -> float:
    """The accuracy of always giving the more common answer: what an accuracy must beat to mean anything."""
    n = n_genuine + n_impostor
    return max(n_genuine, n_impostor) / n if n else float("nan")


def _accept_counts(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
    """(tp, fp, tn, fn) for every threshold at once; a pair is accepted when distance < threshold."""
    order = np.argsort(distances, kind="stable")
    d_sorted = distances[order]
    same_sorted = issame[order]
    accepted = np.searchsorted(d_sorted, thresholds, side="left")  # count of distances < threshold
    cum_same = np.concatenate([[0], np.cumsum(same_sorted)])
    tp = cum_same[accepted]
    fp = accepted - tp
    n_same = int(issame.sum())
    fn = n_same - tp
    tn = (len(distances) - n_same) - fp
    return tp, fp, tn, fn


def kfold_accuracy(
    distances: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    thresholds: np.ndarray = DISTANCE_THRESHOLDS,
) -> KFoldResult:
    """insightface's `calculate_roc`: per fold, the first threshold of the grid with the best training
    accuracy, its accuracy on the test fold, and the ROC averaged over test folds."""
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if distances.shape != issame.shape or distances.ndim != 1:
        raise ValueError(f"distances {distances.shape} and issame {issame.shape} must be equal 1-d shapes")
    if not np.all(np.isfinite(distances)):
        raise ValueError("distances hold NaN or inf: the embeddings are not finite")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    folds = kfold_splits(len(distances), n_folds)
    accs, best, tprs, fprs, balanced = [], [], [], [], []
    for test in folds:
        train = np.ones(len(distances), dtype=bool)
        train[test] = False
        train_counts = _accept_counts(distances[train], issame[train], thresholds)
        tp, _, tn, _ = train_counts
        best_index = int(np.argmax(tp + tn))  # argmax takes the first: the smallest best threshold
        best_balanced = int(np.argmax(balanced_rates(*train_counts)))
        tp, fp, tn, fn = _accept_counts(distances[test], issame[test], thresholds)
        accs.append((tp[best_index] + tn[best_index]) / len(test))
        best.append(thresholds[best_index])
        tprs.append(np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0))
        fprs.append(np.where(fp + tn > 0, fp / np.maximum(fp + tn, 1), 0.0))
        if 0 < issame[test].sum() < len(test):  # both kinds in the test fold
            i = best_balanced
            balanced.append(float(balanced_rates(tp[i], fp[i], tn[i], fn[i])))
    return KFoldResult(np.asarray(accs), np.asarray(best), np.mean(tprs, axis=0), np.mean(fprs, axis=0),
                       np.asarray(balanced))

