"""Margin losses: they turn the cosine logits of one class shard into the logits fed to softmax.

A margin loss is a callable `(cosine_logits [B, C_local], labels [B]) -> logits [B, C_local]` (fp32).
`labels[i]` is the column of sample i's own class in this shard, or -1 when that class lives on
another rank (or was not sampled); only those target entries receive a margin, every other entry is
just scaled by `s`. The same convention serves Partial FC on any number of ranks and the heads of
`trainer.heads` (which registers these margins too), which reuse `prepare_logits`, `target_columns`,
`gather_target` and `scatter_target` from here.

CombinedMarginLoss is the general form of insightface's combined margin, for a target angle theta:

    target = s * (cos(m1 * theta + m2) - m3),   every other logit = s * cos

ArcFace is (1, m, 0), CosFace (1, 0, m), SphereFace-like margins use m1 > 1.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn

__all__ = [
    "ArcFace",
    "CosFace",
    "CombinedMarginLoss",
    "target_columns",
    "gather_target",
    "scatter_target",
    "prepare_logits",
    "at_least_fp32",
]

# Keeps acos / sqrt away from their infinite slopes at |cos| = 1.
_EPS = 1e-7


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32, or fp64 if it already is: softmax margins are never computed in half precision."""
    return t if t.dtype == torch.float64 else t.float()


def target_columns(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`mine` [B] (the row's class is in this shard) and `cols` [B] (that class's column; 0 in the other
    rows, a placeholder). Every row takes part and the mask says which count: selecting the rows instead
    (nonzero, a boolean index) would read their number back to the host on every step (issue I item 10)."""
    labels = labels.reshape(-1)
    return labels != -1, labels.clamp_min(0)


def gather_target(values: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """values[i, cols[i]] for every row `[B]` (zeros when the shard has no column)."""
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0])
    return values.gather(1, cols[:, None]).squeeze(1)


def scatter_target(logits: torch.Tensor, mine: torch.Tensor, cols: torch.Tensor, target) -> torch.Tensor:
    """`logits` with the entries (i, cols[i]) of the rows `mine` set to target[i] (a tensor [B] or a
    scalar); differentiable in both. The other rows get their own entry written back, value and gradient
    unchanged.

    Writes into `logits` (which must be a fresh intermediate, e.g. `cos * s`) to avoid another [B, C] copy;
    the overwritten entries get zero gradient and `target` gets theirs.
    """
    if logits.shape[1] == 0:
        return logits
    if torch.is_tensor(target):
        target = target.to(logits.dtype)
    # Indices rather than gather / scatter_: gather keeps its input for backward, which the in-place
    # write would then invalidate; indexing keeps only the indices.
    index = (torch.arange(logits.shape[0], device=logits.device), cols)
    return logits.index_put_(index, torch.where(mine, target, logits[index]))


def prepare_logits(cosine: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A head's inputs checked: (cosine in fp32 or fp64, labels [B] as int64)."""
    if cosine.dim() != 2:
        raise ValueError(f"cosine logits must be [B, C_local], got shape {tuple(cosine.shape)}")
    labels = labels.reshape(-1).long()
    if labels.shape[0] != cosine.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {cosine.shape[0]} rows of logits")
    # Statistics and margins are never computed in half precision, even under autocast.
    return at_least_fp32(cosine), labels


class CombinedMarginLoss(nn.Module):
    """target = s * (cos(m1 * theta + m2) - m3); negatives = s * cos.

    Where the margin would push the angle past pi (cos(m1*theta + m2) would start to rise again as
    theta grows, rewarding worse samples) the target falls back to a penalty that keeps decreasing in
    theta: for m1 = 1 insightface's `cos(theta) - m2 * sin(m2)`, otherwise the continuous
    `cos(theta) - cos(theta_t) - 1` with theta_t = (pi - m2) / m1. `easy_margin` instead applies the
    margin only where cos(theta) > 0.

    `interclass_filtering_threshold > 0` drops negatives whose cosine exceeds it (likely label noise,
    i.e. the same person under two identities), as insightface does: their cosine is set to 0, so they
    get no gradient and contribute a constant exp(0) to the softmax.

    Unlike insightface's arcface_torch (which computes the margin under no_grad, so the gradient is
    that of the plain scaled cosine) the gradient here is the true one of the margin function.
    """

    def __init__(
        self,
        s: float,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        interclass_filtering_threshold: float = 0.0,
        easy_margin: bool = False,
    ):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        if m1 <= 0:
            raise ValueError(f"multiplicative margin m1 must be positive, got {m1}")
        if not 0.0 <= m2 < math.pi:
            raise ValueError(f"additive angular margin m2 must be in [0, pi), got {m2}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.easy_margin = bool(easy_margin)
        # m1 == 1: cos(theta + m2) expands into cos / sin of theta without acos.
        self._cos_m, self._sin_m = math.cos(self.m2), math.sin(self.m2)
        self._arc_threshold = math.cos(math.pi - self.m2)  # cos(theta) below this: theta + m2 > pi
        self._arc_fallback = math.sin(self.m2) * self.m2
        if self.m1 != 1.0:
            self._theta_t = (math.pi - self.m2) / self.m1

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}, "
                f"easy_margin={self.easy_margin}")

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        """The margin-adjusted cosine of the target class (before the scale s)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_t - self.m3
        if self.m1 == 1.0:
            sin_t = (1.0 - cos_t * cos_t).clamp_min(_EPS).sqrt()
            with_margin = cos_t * self._cos_m - sin_t * self._sin_m
            if self.easy_margin:
                out = torch.where(cos_t > 0, with_margin, cos_t)
            else:
                out = torch.where(cos_t > self._arc_threshold, with_margin, cos_t - self._arc_fallback)
            return out - self.m3
        theta = torch.acos(cos_t.clamp(-1.0 + _EPS, 1.0 - _EPS))
        with_margin = torch.cos(self.m1 * theta + self.m2)
        if self.easy_margin:
            out = torch.where(cos_t > 0, with_margin, cos_t)
        else:
            fallback = cos_t - math.cos(self._theta_t) - 1.0
            out = torch.where(theta <= self._theta_t, with_margin, fallback)
        return out - self.m3

    def forward(self, cosine_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, labels = prepare_logits(cosine_logits, labels)
        mine, cols = target_columns(labels)
        if self.interclass_filtering_threshold > 0 and cos.shape[1] > 0:
            with torch.no_grad():
                dirty = scatter_target(cos > self.interclass_filtering_threshold, mine, cols, False)
            cos = cos.masked_fill(dirty, 0.0)
        return scatter_target(cos * self.s, mine, cols, self.target_logit(gather_target(cos, cols)) * self.s)


class ArcFace(CombinedMarginLoss):
    """Additive angular margin (Deng et al., 2019): s * cos(theta + m) for the target class."""

    def __init__(self, s: float = 64.0, m: float = 0.5, interclass_filtering_threshold: float = 0.0,
                 easy_margin: bool = False):
        super().__init__(s, 1.0, m, 0.0, interclass_filtering_threshold, easy_margin)


class CosFace(CombinedMarginLoss):
    """Additive cosine margin (Wang et al., 2018): s * (cos(theta) - m) for the target class."""

    def __init__(self, s: float = 64.0, m: float = 0.4, interclass_filtering_threshold: float = 0.0):
        super().__init__(s, 1.0, 0.0, m, interclass_filtering_threshold)
