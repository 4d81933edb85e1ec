"""LVFace's two-stage curriculum (You et al., ICCV 2025, "Progressive Cluster Optimization").

Stage "ncs" (epochs [0, switch_epoch)): ArcFace (s=64, m=0.5) with Partial FC's negative class
sub-sampling (`sample_rate < 1`), for a fast, robust first alignment of features and centres from a
random start.

Stage "epl" (epochs [switch_epoch, ...)): sub-sampling off (every negative, every step) and the class
centres stabilised with the expectation of each class's features: a running mean of the class's
normalised embeddings is mixed into its centre,

    w~_c = normalize((1 - alpha) * normalize(w_c) + alpha * normalize(mu_c)),

and the logits are the cosines against w~_c. The gradient still reaches w_c (through the first term);
mu_c is a statistic, held constant. A class not yet seen keeps its plain centre. The paper switches at
40 of 100 epochs; AdamW with weight decay 0.1.

The running means are a per-class buffer of the head (sharded like Partial FC's weight; a checkpoint
re-shards it through `per_class_state`). They are updated from the whole gathered batch, every rank for
its own classes, so 1 rank and N ranks stay identical. They are kept up to date in both stages, so the
expectation is ready at the switch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.heads import Head
from trainer.losses import ArcFace, at_least_fp32
from trainer.modes import standard
from trainer.modes.standard import StandardMode
from trainer.partial_fc import PartialFC

STAGES = ("ncs", "epl")

# The mode's config keys and defaults: the margin head's (ArcFace: scale, margin_list[1]; `sample_rate` is
# the NCS stage's) and the curriculum's.
CONFIG = {
    **standard.CONFIG,
    "lvface_switch_epoch": 40.0,  # epochs of NCS before EPL (the paper switches at 40 of 100 epochs)
    "lvface_epl_alpha": 0.5,  # weight of the class mean in the mixed centre
    "lvface_epl_momentum": 0.9,  # EMA momentum of the class means
}


class EPLHead(Head):
    """ArcFace margin plus the per-class running feature means that `LVFacePartialFC` mixes into the
    class centres while `epl_enabled` is set."""

    per_class_state = ("class_mean", "class_seen")

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5,
                 alpha: float = 0.5, momentum: float = 0.9) -> None:
        super().__init__()
        self.check(alpha, momentum)
        self.margin = ArcFace(s=s, m=m)
        self.alpha, self.momentum = float(alpha), float(momentum)
        _, num_local = distributed.shard_range(num_classes, distributed.get_rank(),
                                               distributed.get_world_size())
        self.register_buffer("class_mean", torch.zeros(num_local, embedding_size))
        self.register_buffer("class_seen", torch.zeros(num_local, dtype=torch.bool))
        self.epl_enabled = False

    @staticmethod
    def check(alpha: float, momentum: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EPL mixing weight alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EPL momentum must be in [0, 1), got {momentum}")

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.margin(cosine, labels)

    def centres(self, weight: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        """Normalised class centres for the rows `index` of the local weight (None: all rows)."""
        w = F.normalize(at_least_fp32(weight), dim=1)
        if not self.epl_enabled or self.alpha == 0.0:
            return w
        mean = self.class_mean if index is None else self.class_mean[index]
        # A copy: the mask is kept for backward, and update_means changes the buffer before that.
        seen = self.class_seen.clone() if index is None else self.class_seen[index]
        mixed = (1.0 - self.alpha) * w + self.alpha * F.normalize(mean.to(w.dtype), dim=1)
        return torch.where(seen[:, None], F.normalize(mixed, dim=1), w)

    @torch.no_grad()
    def update_means(self, embeddings: torch.Tensor, local_labels: torch.Tensor) -> None:
        """EMA of each local class's mean normalised embedding over the gathered batch.

        Without a host sync (issue I item 10): every row takes part, weighted by whether its class is in
        this shard, and only the batch's classes are written. A row of another shard points at the class
        of this shard's first row, so that every write to a class row carries the same value."""
        mine = local_labels != -1
        first = local_labels.index_select(0, torch.argmax(mine.to(torch.uint8)).reshape(1))  # -1 if none
        classes = torch.where(mine, local_labels, first).clamp_min(0)
        weight = mine.to(self.class_mean.dtype)
        feats = F.normalize(embeddings.detach().to(self.class_mean.dtype), dim=1) * weight[:, None]
        sums = torch.zeros_like(self.class_mean).index_add_(0, classes, feats)
        counts = torch.zeros(self.class_mean.shape[0], dtype=sums.dtype, device=sums.device)
        counts.index_add_(0, classes, weight)
        present = counts[classes] > 0  # every row unless no row is this shard's
        batch_mean = sums[classes] / counts[classes].clamp_min(1.0)[:, None]
        old = self.class_mean[classes]
        # A class seen for the first time starts at its batch mean rather than decaying from zero.
        keep = torch.where(self.class_seen[classes], self.momentum, 0.0).to(sums.dtype)[:, None]
        new = torch.where(present[:, None], keep * old + (1.0 - keep) * batch_mean, old)
        self.class_mean.index_put_((classes,), new)
        self.class_seen.index_put_((classes,), present | self.class_seen[classes])


class LVFacePartialFC(PartialFC):
    """Partial FC whose class centres go through an `EPLHead` (the mixing above) and whose forward
    updates the head's running class means from the gathered batch."""

    def __init__(self, margin_loss: EPLHead, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, **kwargs) -> None:
        if not isinstance(margin_loss, EPLHead):
            raise TypeError(f"LVFacePartialFC needs an EPLHead, got {type(margin_loss).__name__}")
        super().__init__(margin_loss, embedding_size, num_classes, sample_rate, **kwargs)
        self._batch_local_labels: Optional[torch.Tensor] = None

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        # Partial FC maps the gathered labels here right before computing the cosines; keep them for
        # the mean update (they are the class rows, before any re-numbering by sampling).
        local = super().local_labels(labels)
        self._batch_local_labels = local
        return local

    def cosine(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        head: EPLHead = self.margin_loss
        centres = head.centres(weight, self.sampled_index)
        out = at_least_fp32(F.linear(F.normalize(at_least_fp32(embeddings), dim=1), centres))
        if self.training and self._batch_local_labels is not None:
            # After the logits: a sample's own features enter its class's mean from the next step on.
            head.update_means(embeddings, self._batch_local_labels)
            self._batch_local_labels = None
        return out


class LVFaceCurriculum:
    """Which stage an epoch is in, and the switch applied to an `LVFacePartialFC`."""

    def __init__(self, switch_epoch: float = 40.0, ncs_sample_rate: float = 0.3) -> None:
        if switch_epoch < 0:
            raise ValueError(f"switch_epoch must be >= 0, got {switch_epoch}")
        if not 0.0 < ncs_sample_rate <= 1.0:
            raise ValueError(f"ncs_sample_rate must be in (0, 1], got {ncs_sample_rate}")
        self.switch_epoch, self.ncs_sample_rate = float(switch_epoch), float(ncs_sample_rate)

    def stage(self, epoch: float) -> str:
        return "ncs" if epoch < self.switch_epoch else "epl"

    def apply(self, partial_fc: LVFacePartialFC, epoch: float) -> str:
        """Sets sampling and EPL for `epoch` (fractional: step / steps_per_epoch); returns the stage."""
        stage = self.stage(epoch)
        partial_fc.sample_rate = self.ncs_sample_rate if stage == "ncs" else 1.0
        partial_fc.margin_loss.epl_enabled = stage == "epl"
        return stage


def build_lvface_partial_fc(embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                            ncs_sample_rate: float = 0.3, epl_alpha: float = 0.5, epl_momentum: float = 0.9,
                            **partial_fc_kwargs) -> LVFacePartialFC:
    """Partial FC for LVFace, starting in the NCS stage (build it after init_process_group)."""
    head = EPLHead(num_classes, embedding_size, s=s, m=m, alpha=epl_alpha, momentum=epl_momentum)
    return LVFacePartialFC(head, embedding_size, num_classes, sample_rate=ncs_sample_rate,
                           **partial_fc_kwargs)


class LVFaceMode(StandardMode):
    """The trainer's LVFace mode: ArcFace (s = `scale`, m = `margin_list[1]`) through an LVFacePartialFC;
    epochs before `lvface_switch_epoch` sub-sample negatives at `sample_rate` (NCS), later ones use EPL."""

    name = "lvface"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.loss not in ("combined", "arcface"):
            raise ConfigError(f"mode lvface trains ArcFace (scale, margin_list[1]); loss={cfg.loss!r} is not "
                              "used: set loss=combined")
        try:
            self.curriculum = LVFaceCurriculum(cfg.lvface_switch_epoch, cfg.sample_rate)
            EPLHead.check(cfg.lvface_epl_alpha, cfg.lvface_epl_momentum)
        except ValueError as e:
            raise ConfigError(f"mode lvface: {e}") from None
        self.stage: Optional[str] = None

    def build_head(self, backbone: torch.nn.Module, num_classes: int, world_size: int) -> LVFacePartialFC:
        cfg = self.cfg
        return build_lvface_partial_fc(cfg.embedding_size, num_classes, s=cfg.scale, m=cfg.margin_list[1],
                                       ncs_sample_rate=cfg.sample_rate, epl_alpha=cfg.lvface_epl_alpha,
                                       epl_momentum=cfg.lvface_epl_momentum,
                                       embedding_grad_scale=float(world_size), seed=cfg.seed)

    def begin_step(self, backbone: torch.nn.Module, head: LVFacePartialFC, epoch: float) -> Optional[str]:
        stage = self.curriculum.apply(head, epoch)
        changed, self.stage = stage != self.stage, stage
        return stage if changed else None

    def log_fields(self, head: LVFacePartialFC) -> dict:
        return {"stage": self.stage, "sample_rate": head.sample_rate}


__all__ = ["CONFIG", "EPLHead", "LVFacePartialFC", "LVFaceCurriculum", "LVFaceMode", "build_lvface_partial_fc",
           "STAGES"]

