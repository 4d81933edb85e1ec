"""FaceX-Zoo's heads (ArcFace, AdaCos, AdaM-Softmax, CircleLoss, CurricularFace, MV-Softmax, NPCFace,
MagFace) and AdaFace on Partial FC's sharded cosine logits, registered by name (trainer.heads).

Sharding: the batch dimension is already global (Partial FC all-gathers the embeddings), so every
statistic over the batch (CurricularFace's t, AdaFace's norm mean/std, MagFace's regulariser) is the
same on every rank without communication. What is split is the class dimension: a sample's target
cosine lives on one rank only, and sums over classes (AdaCos's B_avg, NPCFace's hard-negative mean,
AdaM-Softmax's margin sum) are partial. Those are all-reduced (when a process group is initialised),
so 1 rank and N ranks give the same logits and loss.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

from trainer import distributed
from trainer.heads.registry import Head, register_head
from trainer.losses import ArcFace, at_least_fp32, gather_target, prepare_logits, scatter_target, target_columns


def _global_target_cosine(cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The target cosine of every sample `[B]` (no gradient), whichever rank holds its class."""
    mine, cols = target_columns(labels)
    packed = torch.stack([torch.where(mine, gather_target(cosine.detach(), cols), 0.0), mine.to(cosine.dtype)])
    distributed.all_reduce_(packed, "sum")
    owners = packed[1]
    try:  # on a GPU the check runs on the device, without a host sync; on the CPU it raises here
        torch._assert_async(torch.all(owners == 1), "a sample's class is not held by exactly one rank")
    except RuntimeError:
        bad = int(torch.nonzero(owners != 1)[0])
        raise ValueError(
            f"sample {bad}'s class is held by {int(owners[bad])} ranks (expected exactly 1): labels must "
            "be local columns on the owning rank and -1 elsewhere"
        ) from None
    return packed[0]


def _cos_theta_plus(cosine: torch.Tensor, margin) -> torch.Tensor:
    """cos(theta + m) from cos(theta), for a float or a per-sample tensor margin."""
    if isinstance(margin, torch.Tensor):
        cos_m, sin_m = torch.cos(margin), torch.sin(margin)
    else:
        cos_m, sin_m = math.cos(margin), math.sin(margin)
    # The clamp keeps the gradient finite at |cos| = 1, where sqrt' is infinite.
    return cosine * cos_m - torch.sqrt((1.0 - cosine * cosine).clamp_min(1e-7)) * sin_m


def _all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks whose backward sums the gradients of all ranks (identity on one process)."""
    if not distributed.is_distributed():
        return tensor
    return dist_nn.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


@register_head("facex_arcface")
class FaceXArcFace(Head):
    """FaceX-Zoo's ArcFace: s * cos(theta + m_arc) at the target, and where theta + m_arc > pi the
    target falls back to cos(theta) - m_am (insightface subtracts sin(m) * m instead)."""

    def __init__(self, s: float = 32.0, m_arc: float = 0.35, m_am: float = 0.0,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.s, self.m_arc, self.m_am = s, m_arc, m_am
        self.threshold = math.cos(math.pi - m_arc)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine, labels = prepare_logits(cosine, labels)
        cosine = cosine.clamp(-1.0, 1.0)
        mine, cols = target_columns(labels)
        target = gather_target(cosine, cols)
        target = torch.where(target > self.threshold, _cos_theta_plus(target, self.m_arc), target - self.m_am)
        return scatter_target(cosine * self.s, mine, cols, target * self.s)


@register_head("adacos")
class AdaCos(Head):
    """AdaCos (Zhang et al. 2019): no margin; the scale adapts every step to
    s = log(B_avg) / cos(min(pi/4, theta_med)), B_avg the batch mean of sum_{k != y} exp(s_old cos),
    theta_med the median target angle of the batch. It starts at sqrt(2) * log(C - 1)."""

    def __init__(self, num_classes: Optional[int] = None) -> None:
        super().__init__()
        if num_classes is None or num_classes < 2:
            raise ValueError(f"AdaCos needs num_classes >= 2 (got {num_classes})")
        self.register_buffer("scale", torch.tensor(math.sqrt(2.0) * math.log(num_classes - 1)))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine, labels = prepare_logits(cosine, labels)
        with torch.no_grad():
            target = _global_target_cosine(cosine, labels)
            theta_med = torch.median(torch.acos(target.clamp(-1.0 + 1e-7, 1.0 - 1e-7)))
            # log of the sum of exp over every negative of every rank, stably: global max first.
            scaled = cosine * self.scale
            mine, cols = target_columns(labels)
            scatter_target(scaled, mine, cols, -math.inf)
            peak = scaled.amax().reshape(1) if scaled.numel() else scaled.new_full((1,), -math.inf)
            distributed.all_reduce_(peak, "max")
            total = torch.exp(scaled - peak).sum().reshape(1)
            distributed.all_reduce_(total, "sum")
            log_b_avg = peak + torch.log(total) - math.log(cosine.shape[0])
            self.scale.copy_((log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4))).reshape(()))
        return cosine * self.scale


@register_head("adam_softmax")
class AdaMSoftmax(Head):
    """AdaM-Softmax (AdaptiveFace, Liu et al. 2019): CosFace with a learnable margin per class, kept in
    [0, 1], plus lamda * (1 - mean margin) so that the margins grow. The margins are sharded like
    Partial FC's weight (`margins`: this rank's classes)."""

    needs_class_index = True
    per_class_state = ("margins",)

    def __init__(self, num_classes: Optional[int] = None, s: float = 32.0, lamda: float = 70.0,
                 init_range: Tuple[float, float] = (0.3, 0.4), seed: int = 0) -> None:
        super().__init__()
        if num_classes is None or num_classes < 1:
            raise ValueError(f"AdaM-Softmax needs num_classes >= 1 (got {num_classes})")
        self.s, self.lamda, self.num_classes = s, lamda, num_classes
        start, num_local = distributed.shard_range(num_classes, distributed.get_rank(),
                                                   distributed.get_world_size())
        # Drawn for all classes from one seed and sliced, so the start is the same on any world size.
        low, high = init_range
        full = torch.rand(num_classes, generator=torch.Generator().manual_seed(seed))
        self.margins = nn.Parameter(low + (high - low) * full[start: start + num_local])

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor,
                class_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        cosine, labels = prepare_logits(cosine, labels)
        if class_index is None and cosine.shape[1] != self.margins.shape[0]:
            raise ValueError(
                f"AdaM-Softmax holds {self.margins.shape[0]} local classes but got {cosine.shape[1]} "
                "columns and no class_index (Partial FC with sample_rate < 1 must pass class_index)"
            )
        with torch.no_grad():
            self.margins.clamp_(0.0, 1.0)
        mine, cols = target_columns(labels)
        cosine = cosine.clamp(-1.0, 1.0)
        target = gather_target(cosine, cols)
        if cosine.shape[1] > 0:  # else no row is this shard's and there is no margin to index
            target = target - self.margins[cols if class_index is None else class_index[cols]]
        total = _all_reduce_sum_with_grad(self.margins.sum().reshape(1))[0]
        extra = self.lamda * (1.0 - total / self.num_classes)
        return scatter_target(cosine * self.s, mine, cols, target * self.s), extra


@register_head("circleloss")
class CircleLoss(Head):
    """Circle loss in its classification form (Sun et al. 2020): target gamma * a_p (cos - (1 - m)),
    negatives gamma * a_n (cos - m), with a_p = [1 + m - cos]_+ and a_n = [cos + m]_+ held constant."""

    def __init__(self, m: float = 0.25, gamma: float = 256.0, num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.m, self.gamma = m, gamma

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine, labels = prepare_logits(cosine, labels)
        cosine = cosine.clamp(-1.0, 1.0)
        logits = torch.clamp_min(cosine.detach() + self.m, 0.0) * (cosine - self.m) * self.gamma
        mine, cols = target_columns(labels)
        target = gather_target(cosine, cols)
        alpha_p = torch.clamp_min(1.0 + self.m - target.detach(), 0.0)
        return scatter_target(logits, mine, cols, alpha_p * (target - (1.0 - self.m)) * self.gamma)


@register_head("curricularface")
class CurricularFace(Head):
    """CurricularFace (Huang et al. 2020): ArcFace target; a negative harder than the target's
    cos(theta + m) becomes cos * (t + cos), t a running mean (momentum 0.01) of the target cosine."""

    def __init__(self, s: float = 64.0, m: float = 0.5, momentum: float = 0.01,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.s, self.m, self.momentum = s, m, momentum
        # Its target, fallback included (cos - sin(m) * m past theta + m > pi), is insightface's ArcFace.
        self.arc = ArcFace(s=s, m=m)
        self.register_buffer("t", torch.zeros(()))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine, labels = prepare_logits(cosine, labels)
        cosine = cosine.clamp(-1.0, 1.0)
        target_all = _global_target_cosine(cosine, labels)
        with torch.no_grad():
            self.t.mul_(1.0 - self.momentum).add_(self.momentum * target_all.mean())
            hard = cosine > _cos_theta_plus(target_all, self.m).unsqueeze(1)
        logits = torch.where(hard, cosine * (self.t + cosine), cosine) * self.s
        mine, cols = target_columns(labels)
        return scatter_target(logits, mine, cols, self.arc.target_logit(gather_target(cosine, cols)) * self.s)


@register_head("mv_softmax")
class MVSoftmax(Head):
    """MV-Softmax (Wang et al. 2020): the mis-classified negatives (cosine above the target's margin
    logit) become t * cos + t - 1. Target margin as FaceX-Zoo applies it: AM (`is_am`: cos - m where
    cos > m) or arc (cos(theta + m) where cos > 0)."""

    def __init__(self, s: float = 32.0, m: float = 0.35, t: float = 1.12, is_am: bool = True,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.s, self.m, self.t, self.is_am = s, m, t, bool(is_am)
        self.arc = None if self.is_am else ArcFace(s=s, m=m, easy_margin=True)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine, labels = prepare_logits(cosine, labels)
        target_all = _global_target_cosine(cosine, labels)
        with torch.no_grad():
            bar = target_all - self.m if self.is_am else _cos_theta_plus(target_all, self.m)
            misclassified = cosine > bar.unsqueeze(1)
        logits = torch.where(misclassified, self.t * cosine + (self.t - 1.0), cosine) * self.s
        mine, cols = target_columns(labels)
        target = gather_target(cosine, cols)
        if self.is_am:
            target = torch.where(target > self.m, target - self.m, target)
        else:
            target = self.arc.target_logit(target)
        return scatter_target(logits, mine, cols, target * self.s)


@register_head("npcface")
class NPCFace(Head):
    """NPCFace (Zeng et al. 2020): hard negatives (cosine above cos(theta_y + m)) become t * cos + a,
    and the target margin grows with the sample's mean hard-negative cosine, m0 + m1 * mean (applied
    where the target cosine is > 0). The mean runs over the hard negatives of all classes."""

    def __init__(self, s: float = 32.0, m: float = 0.35, m0: float = 0.40, m1: float = 0.20,
                 t: float = 1.10, a: float = 0.20, num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.s, self.m, self.m0, self.m1, self.t, self.a = s, m, m0, m1, t, a

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine, labels = prepare_logits(cosine, labels)
        cosine = cosine.clamp(-1.0, 1.0)
        mine, cols = target_columns(labels)
        target_all = _global_target_cosine(cosine, labels)
        with torch.no_grad():
            hard = scatter_target(cosine > _cos_theta_plus(target_all, self.m).unsqueeze(1), mine, cols, False)
            stats = torch.stack([(cosine * hard).sum(1), hard.to(cosine.dtype).sum(1)])
            distributed.all_reduce_(stats, "sum")
            new_margin = self.m0 + self.m1 * stats[0] / stats[1].clamp_min(1.0)
        logits = torch.where(hard, self.t * cosine + self.a, cosine) * self.s
        target = gather_target(cosine, cols)
        target = torch.where(target > 0, _cos_theta_plus(target, new_margin), target)
        return scatter_target(logits, mine, cols, target * self.s)


@register_head("magface")
class MagFace(Head):
    """MagFace (Meng et al. 2021) as FaceX-Zoo has it: an arc margin growing linearly with the feature
    norm a (clamped to [l_a, u_a]) from l_margin to u_margin, plus lamda * mean(a / u_a^2 + 1 / a),
    which pushes easy samples to large norms. The gradient flows through the norms."""

    needs_norms = True

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_margin: float = 0.45,
                 u_margin: float = 0.8, lamda: float = 20.0, m_am: float = 0.0,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.s, self.l_a, self.u_a, self.lamda, self.m_am = s, l_a, u_a, lamda, m_am
        self.l_margin, self.u_margin = l_margin, u_margin

    def margin(self, norms: torch.Tensor) -> torch.Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return (self.u_margin - self.l_margin) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_margin

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor,
                norms: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        cosine, labels = prepare_logits(cosine, labels)
        if norms is None or norms.reshape(-1).shape != labels.shape:
            raise ValueError("MagFace needs norms= the [B] norms of the gathered embeddings")
        a = at_least_fp32(norms.reshape(-1)).clamp(self.l_a, self.u_a)
        extra = self.lamda * (a / self.u_a ** 2 + 1.0 / a).mean()
        cosine = cosine.clamp(-1.0, 1.0)
        mine, cols = target_columns(labels)
        margin = self.margin(a)
        target = gather_target(cosine, cols)
        target = torch.where(target > torch.cos(math.pi - margin), _cos_theta_plus(target, margin),
                             target - self.m_am)
        return scatter_target(cosine * self.s, mine, cols, target * self.s), extra


@register_head("adaface")
class AdaFace(Head):
    """AdaFace (Kim et al. 2022): the margin adapts to image quality, measured by the feature norm.
    With z = clip(h * (norm - mu) / (sigma + eps), -1, 1) (mu, sigma: running batch mean and std of
    the norms, momentum t_alpha) the target becomes cos(theta - m z) - (m + m z). Norms are detached."""

    needs_norms = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 eps: float = 1e-3, num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.s, self.m, self.h, self.t_alpha, self.eps = s, m, h, t_alpha, eps
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor,
                norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        cosine, labels = prepare_logits(cosine, labels)
        if norms is None or norms.reshape(-1).shape != labels.shape:
            raise ValueError("AdaFace needs norms= the [B] norms of the gathered embeddings")
        safe = at_least_fp32(norms.detach().reshape(-1)).clamp(0.001, 100.0)
        with torch.no_grad():
            self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe.mean())
            if safe.numel() > 1:  # one sample has no spread: keep the running std
                self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe.std())
        z = ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)
        cosine = cosine.clamp(-1.0 + self.eps, 1.0 - self.eps)
        mine, cols = target_columns(labels)
        theta = torch.acos(gather_target(cosine, cols))
        target = torch.cos((theta - self.m * z).clamp(self.eps, math.pi - self.eps)) - (self.m + self.m * z)
        return scatter_target(cosine * self.s, mine, cols, target * self.s)
