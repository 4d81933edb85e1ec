"""Verification on a list of pairs (a `.bin` pack or pairs.txt): insightface's 10-fold accuracy with the
flip test, and TAR at FAR. What the trainer's periodic evaluation and `python -m trainer.eval --pairs` run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from trainer.eval.common import FARS, far_key
from trainer.eval.embedding import embed_images
from trainer.eval.kfold import KFoldResult, kfold_accuracy, majority_accuracy, pair_distances, pair_similarities
from trainer.eval.tar_far import TarAtFar, roc_points, tar_at_far
from trainer.eval.targets import VerificationSet, cached_target


@dataclass
class PairResult:
    """Verification on a list of pairs: insightface's 10-fold accuracy and TAR at FAR."""

    pairs: int
    kfold: KFoldResult
    tar_at_far: dict[float, TarAtFar]
    xnorm: float
    genuine: np.ndarray = field(repr=False)  # cosine similarities of the genuine pairs
    impostor: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "acc": self.kfold.acc,
            "std": self.kfold.std,
            "balanced_acc": self.kfold.balanced_acc,
            "balanced_std": self.kfold.balanced_std,
            "majority_acc": majority_accuracy(len(self.genuine), len(self.impostor)),
            "threshold": float(np.mean(self.kfold.thresholds)),  # squared L2 distance of unit vectors
            "xnorm": self.xnorm,
            "genuine": int(len(self.genuine)),
            "impostor": int(len(self.impostor)),
            "tar_at_far": {far_key(f): r.tar for f, r in self.tar_at_far.items()},
        }

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        return roc_points(self.genuine, self.impostor)


def score_pairs(embeddings: np.ndarray, pairs: np.ndarray, issame: np.ndarray, xnorm: float = float("nan"),
                fars: Sequence[float] = FARS, n_folds: int = 10) -> PairResult:
    e1, e2 = embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]
    kfold = kfold_accuracy(pair_distances(e1, e2), issame, n_folds)
    sims = pair_similarities(e1, e2)
    genuine, impostor = sims[issame], sims[~issame]
    tars = tar_at_far(genuine, impostor, fars)
    return PairResult(len(issame), kfold, tars, xnorm, genuine, impostor)


def verify(model: nn.Module, target: VerificationSet, device: str | torch.device, batch_size: int = 64,
           flip: bool = True, fars: Sequence[float] = FARS, amp_dtype: Optional[torch.dtype] = None,
           progress: bool = False) -> PairResult:
    emb = embed_images(model, target.images, device, batch_size, flip, amp_dtype, progress, desc=target.name)
    return score_pairs(emb.embeddings, target.pairs, target.issame, emb.xnorm, fars)


def evaluate_targets(model: nn.Module, targets: Mapping[str, Any] | Sequence[Any], device: str | torch.device,
                     batch_size: int = 64, flip: bool = True,
                     fars: Sequence[float] = FARS) -> dict[str, dict[str, Any]]:
    """{name: {"acc", "std", "xnorm", "pairs", "threshold", "tar_at_far", ...}} for each target.

    A target is a VerificationSet or a path to a `.bin`/pairs.txt (images under its folder), given as a
    list or as {name: target}. Paths are decoded once per process and kept (the trainer evaluates the
    same targets again and again). The model's train/eval mode is left as it was."""
    if isinstance(targets, Mapping):
        items = list(targets.items())
    else:
        items = [(None, t) for t in targets]
    results = {}
    for name, target in items:
        if not isinstance(target, VerificationSet):
            target = cached_target(target, name=name)
        name = name or target.name
        results[name] = verify(model, target, device, batch_size, flip, fars).summary()
        results[name]["align_failures"] = target.align_failures
    return results
