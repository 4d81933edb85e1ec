"""Batch mixing for small training sets: CutMix (Yun et al., 2019) and mixup (Zhang et al., 2018).

On a few hundred images per class the margin softmax drives the training loss to zero long before the
time is up; a mixed image with a mixed target keeps every step informative. With aligned faces, CutMix
pastes a box of another face at the same place of the template, so that each region of the face has to
carry identity on its own.

The loss of a batch is lam * L(labels) + (1 - lam) * L(labels[perm]), two calls of the same Partial FC,
so the classifier stays model-parallel. Partial FC's loss is the mean over the global batch and its
gradient reaches every rank's samples, so lam (and the box) must be the same on every rank: they are
drawn from a generator seeded by (seed, step, micro batch), the same on every rank and after a resume,
with no state to checkpoint. Each rank pairs its own samples (perm is local: the rank is in its seed).
Every step makes both calls, also when the coin says "no mixing" (lam = 1), so all ranks run the same
collectives.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Tuple

import numpy as np
import torch

MIX_KINDS = ("cutmix", "mixup")


def step_generator(*key) -> np.random.Generator:
    """A generator that depends on `key` alone (e.g. seed, step, micro batch[, rank])."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def draw_mix(p: float, alpha: float, rng: np.random.Generator) -> Tuple[float, float, float]:
    """(lam, box centre y, box centre x as shares of the image); lam = 1: no mix this batch."""
    lam = float(rng.beta(alpha, alpha)) if rng.random() < p else 1.0
    return lam, float(rng.random()), float(rng.random())


def cutmix_box(height: int, width: int, lam: float, cy: float, cx: float) -> Tuple[int, int, int, int]:
    """(y0, y1, x0, x1): a box of (1 - lam) of the image centred at (cy, cx) (shares), clipped at the edges."""
    cut = math.sqrt(max(1.0 - lam, 0.0))
    bh, bw = int(round(height * cut)), int(round(width * cut))
    y, x = int(cy * height), int(cx * width)
    return max(y - bh // 2, 0), min(y + bh - bh // 2, height), max(x - bw // 2, 0), min(x + bw - bw // 2, width)


def mix_batch(images: torch.Tensor, kind: str, lam: float, cy: float = 0.5, cx: float = 0.5,
              perm: torch.Tensor | None = None) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed images, the partner permutation, the share of each image that is its own)."""
    if kind not in MIX_KINDS:
        raise ValueError(f"mix must be one of {MIX_KINDS}, got {kind!r}")
    n, _, h, w = images.shape
    perm = (torch.randperm(n) if perm is None else perm).to(images.device)
    if lam >= 1.0:
        return images, perm, 1.0
    if kind == "mixup":
        return images * lam + images[perm] * (1.0 - lam), perm, lam
    y0, y1, x0, x1 = cutmix_box(h, w, lam, cy, cx)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    # The box is clipped at the borders: the weight is the share actually pasted. Every rank gets the same
    # box (same lam and centre) and image size, so the same weight.
    return mixed, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def mixed_loss(model: torch.nn.Module, head: Callable, images: torch.Tensor, labels: torch.Tensor, kind: str,
               p: float, alpha: float, key: tuple, rank: int) -> torch.Tensor:
    """With probability p a mixed batch; lam * head(emb, labels) + (1 - lam) * head(emb, labels[perm]).

    `key` (seed, step, micro batch) draws lam and the box alike on every rank; (key, rank) the pairs."""
    lam, cy, cx = draw_mix(p, alpha, step_generator(*key))
    perm = torch.from_numpy(step_generator(*key, "perm", rank).permutation(images.shape[0]))
    mixed, perm, own = mix_batch(images, kind, lam, cy, cx, perm)
    emb = model(mixed)
    return head(emb, labels) * own + head(emb, labels[perm]) * (1.0 - own)
