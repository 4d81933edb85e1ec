"""AAFace (Alipour Talemi et al., ICIP 2023): face recognition helped by soft-biometric attributes.

The network is the backbone "aaface" (trainer/backbones/aaface.py: a shared backbone, the FR and SB branches
of two convolutions + GAP with a shared first convolution, fused by the AAI module); this module is the
training mode: attribute targets and loss, the stage schedule, and the objective.

Loss (eq. 4): lambda_FR * L_FR + sum_i lambda_i * L_i, L_FR the margin loss through Partial FC (AdaFace in
the paper), L_i the binary cross-entropy of attribute i (eq. 2; `aaface_pos_weight` may weight its
positives). Schedule (section 3.2): "fr" (Br_FR alone, the backbone frozen), "sb" (Br_SB alone, the backbone
and Br_FR's first convolution frozen), "joint" (both branches and the AAI). Attribute targets come from the
record label vector by name (`label_fields` in the manifest): CelebA's attributes packed with
`pipeline pack --attributes list_attr_celeba.txt`, or `masked` from maskgen.

Defaults are the paper's: its five CelebA attributes (Male, Bald, Big_Nose, Chubby, Narrow_Eyes) with
lambda_Male = lambda_Bald = 1 and 0.5 for the rest, lambda_FR = 3.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import distributed
from trainer.backbones.aaface import AAFaceNet
from trainer.config import Config, ConfigError
from trainer.modes import standard
from trainer.modes.standard import StandardMode

# The paper's attributes (section 1) under CelebA's names (list_attr_celeba.txt), and their loss weights
# (section 3.2: lambda_Male = lambda_Bald = 1, all the rest 0.5).
PAPER_ATTRIBUTES = ("Male", "Bald", "Big_Nose", "Chubby", "Narrow_Eyes")
PAPER_LAMBDAS = (1.0, 1.0, 0.5, 0.5, 0.5)

# The mode's config keys and defaults: the margin head's (L_FR) and the attributes'. Attributes are binary,
# by name from the manifest's label_fields ("masked" from maskgen, or packed with `pipeline pack
# --attributes`); the loss is aaface_lambda_fr * L_FR + sum_i aaface_lambdas[i] * BCE_i.
CONFIG = {
    **standard.CONFIG,
    "aaface_attributes": list(PAPER_ATTRIBUTES),
    "aaface_lambdas": list(PAPER_LAMBDAS),  # one per attribute; [] = 1.0 each
    "aaface_lambda_fr": 3.0,
    "aaface_pos_weight": [],  # BCE positive weight per attribute (#neg / #pos balances it); [] = 1.0 each
    "aaface_stage_epochs": (10.0, 5.0, 5.0),  # (FR branch alone, SB branch alone, joint); sum = num_epoch
}

# ----------------------------------------------------------------------------------------- attributes

def attribute_targets(label_vectors: torch.Tensor, label_fields: Sequence[str],
                      names: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Binary targets `[B, A]` and a validity mask for attributes `names` of the record label vectors.

    A value of 0 or 1 is a label; NaN or a negative value means "unknown" (masked out of the loss).
    """
    fields = list(label_fields)
    missing = [n for n in names if n not in fields]
    if missing:
        raise KeyError(f"attributes {missing} are not in the dataset's label_fields {fields}")
    values = label_vectors[:, [fields.index(n) for n in names]].float()
    valid = torch.isfinite(values) & (values >= 0)
    known = values[valid]
    if known.numel() and not torch.all((known == 0) | (known == 1)):
        bad = sorted({float(v) for v in known[(known != 0) & (known != 1)].tolist()})[:5]
        raise ValueError(f"attributes {list(names)} must be binary (0/1, NaN or < 0 = unknown); got {bad}")
    return torch.where(valid, values, torch.zeros_like(values)), valid


def balanced_pos_weight(targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-attribute BCE positive weight #negatives / #positives (1 where a class is absent)."""
    pos = (targets * valid).sum(0)
    neg = ((1 - targets) * valid).sum(0)
    return torch.where((pos > 0) & (neg > 0), neg / pos.clamp_min(1), torch.ones_like(pos))


class AttributeLoss(nn.Module):
    """sum_i lambda_i * weighted BCE_i, each BCE the mean over the samples whose attribute is known.

    The mean runs over the global batch: the count of known labels is all-reduced, and each rank's
    term is scaled so that DistributedDataParallel's gradient average is the gradient of that global
    mean. The returned value is the global loss on every rank.
    """

    def __init__(self, names: Sequence[str], lambdas: Optional[Sequence[float]] = None,
                 pos_weight: Optional[Sequence[float]] = None):
        super().__init__()
        self.names = list(names)
        n = len(self.names)
        lambdas = [1.0] * n if lambdas is None else list(lambdas)
        pos_weight = [1.0] * n if pos_weight is None else list(pos_weight)
        if len(lambdas) != n or len(pos_weight) != n:
            raise ValueError(f"{n} attributes but {len(lambdas)} lambdas and {len(pos_weight)} pos weights")
        self.register_buffer("lambdas", torch.tensor(lambdas, dtype=torch.float32))
        self.register_buffer("pos_weight", torch.tensor(pos_weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (total loss, per-attribute BCE `[A]`, both global values)."""
        per = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight,
                                                 reduction="none") * valid
        sums = per.sum(0)
        stats = torch.stack([sums.detach(), valid.sum(0).to(sums.dtype)])
        distributed.all_reduce_(stats, "sum")
        counts = stats[1].clamp_min(1.0)
        world = distributed.get_world_size()
        local = sums * world / counts  # DDP averages over ranks: the mean of these is the global mean
        per_attribute = local + (stats[0] / counts - local).detach()
        return (self.lambdas * per_attribute).sum(), per_attribute.detach()


# ----------------------------------------------------------------------------------------- schedule

class AAFaceSchedule:
    """Epochs [0, fr_epochs): "fr"; then sb_epochs of "sb"; then "joint"."""

    def __init__(self, fr_epochs: float, sb_epochs: float) -> None:
        if fr_epochs < 0 or sb_epochs < 0:
            raise ValueError(f"stage lengths must be >= 0, got fr={fr_epochs} sb={sb_epochs}")
        self.fr_epochs, self.sb_epochs = float(fr_epochs), float(sb_epochs)

    def stage(self, epoch: float) -> str:
        if epoch < self.fr_epochs:
            return "fr"
        return "sb" if epoch < self.fr_epochs + self.sb_epochs else "joint"

    def apply(self, model: AAFaceNet, epoch: float) -> bool:
        """Puts `model` in the stage of `epoch`; True when the stage changed (the trainer must then
        re-wrap the model in DDP, whose gradient buckets follow `requires_grad`)."""
        stage = self.stage(epoch)
        if stage == model.stage:  # a new AAFaceNet is in "joint"
            return False
        model.set_stage(stage)
        return True


class AAFaceObjective:
    """The total loss lambda_FR * L_FR + sum_i lambda_i * L_i of one batch, for the model's stage."""

    def __init__(self, attribute_names: Sequence[str], label_fields: Sequence[str], lambda_fr: float = 3.0,
                 lambdas: Optional[Sequence[float]] = None, pos_weight: Optional[Sequence[float]] = None):
        self.names, self.label_fields = list(attribute_names), list(label_fields)
        missing = [n for n in self.names if n not in self.label_fields]
        if missing:
            raise KeyError(f"attributes {missing} are not in the dataset's label_fields {self.label_fields}")
        self.lambda_fr = float(lambda_fr)
        self.attribute_loss = AttributeLoss(self.names, lambdas, pos_weight)

    def __call__(self, model: nn.Module, partial_fc: Optional[nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, label_vectors: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """`model` may be the DDP wrapper of an AAFaceNet; returns (loss, logged parts)."""
        net = model.module if hasattr(model, "module") else model
        embedding, logits = model(images, with_attributes=True)
        parts: Dict[str, float] = {}
        loss = images.new_zeros(())
        if net.stage in ("fr", "joint"):
            if partial_fc is None:
                raise ValueError(f"AAFace stage {net.stage!r} trains the FR branch: pass the Partial FC")
            fr = partial_fc(embedding, labels)
            loss = loss + self.lambda_fr * fr
            parts["loss_fr"] = float(fr.detach())
        if net.stage in ("sb", "joint"):
            self.attribute_loss.to(logits.device)
            targets, valid = attribute_targets(label_vectors, self.label_fields, self.names)
            attr, per = self.attribute_loss(logits, targets.to(logits.device), valid.to(logits.device))
            loss = loss + attr
            parts["loss_attr"] = float(attr.detach())
            parts.update({f"loss_{n}": float(v) for n, v in zip(self.names, per)})
        return loss, parts


class AAFaceMode(StandardMode):
    """The trainer's AAFace mode: backbone "aaface", the loader's label vectors, the 3-stage schedule
    `aaface_stage_epochs` (fr, sb, joint: they add up to num_epoch) and the loss
    `aaface_lambda_fr * L_FR + sum_i aaface_lambdas[i] * BCE_i` over `aaface_attributes`, named in the
    manifest's label_fields. L_FR is Partial FC with the head `loss` (AdaFace in the paper)."""

    name = "aaface"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        names, n = list(cfg.aaface_attributes), len(cfg.aaface_attributes)
        if cfg.network != "aaface":
            raise ConfigError(f"mode aaface needs network=aaface (its base backbone in network_kwargs), "
                              f"got network={cfg.network!r}")
        if not names:
            raise ConfigError("mode aaface needs aaface_attributes: names from the dataset's label_fields")
        for key in ("aaface_lambdas", "aaface_pos_weight"):
            if cfg[key] and len(cfg[key]) != n:
                raise ConfigError(f"{key} has {len(cfg[key])} values for {n} aaface_attributes {names}")
        stages = tuple(float(x) for x in cfg.aaface_stage_epochs)
        if len(stages) != 3 or min(stages) < 0:
            raise ConfigError(f"aaface_stage_epochs is (fr, sb, joint) epochs >= 0, "
                              f"got {cfg.aaface_stage_epochs}")
        if abs(sum(stages) - cfg.num_epoch) > 1e-6:
            raise ConfigError(f"aaface_stage_epochs {stages} add up to {sum(stages):g} epochs, "
                              f"but num_epoch is {cfg.num_epoch}")
        freeze = cfg.network_kwargs.get("freeze_backbone", True)
        if freeze and not cfg.init_weights:
            raise ConfigError("mode aaface freezes its backbone in every stage, as the paper does: set "
                              "init_weights to trained weights (an insightface IResNet state dict, a "
                              "model.pt or a run folder), or network_kwargs freeze_backbone=False to train it")
        self.names = names
        self.schedule = AAFaceSchedule(stages[0], stages[1])
        self.objective: Optional[AAFaceObjective] = None
        self.stage: Optional[str] = None

    def bind_data(self, loader) -> None:
        fields = list(getattr(loader, "label_fields", []))
        missing = [n for n in self.names if n not in fields]
        if missing:
            raise ConfigError(f"aaface_attributes {missing} are not in {self.cfg.data}'s label_fields "
                              f"{fields} (add them with `pipeline pack --attributes FILE`, or with "
                              "`maskgen build` for 'masked')")
        cfg = self.cfg
        self.objective = AAFaceObjective(self.names, fields, cfg.aaface_lambda_fr,
                                         cfg.aaface_lambdas or None, cfg.aaface_pos_weight or None)

    def network_kwargs(self) -> dict:
        return {"num_attributes": len(self.names)}

    def begin_step(self, backbone: nn.Module, head: nn.Module, epoch: float) -> Optional[str]:
        self.schedule.apply(backbone, epoch)
        changed, self.stage = backbone.stage != self.stage, backbone.stage
        return self.stage if changed else None

    def loss(self, model: nn.Module, head: nn.Module, batch: Sequence[torch.Tensor]
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        images, labels, label_vectors = batch
        return self.objective(model, head, images, labels, label_vectors)

    def log_fields(self, head: nn.Module) -> dict:
        return {"stage": self.stage}


__all__ = ["CONFIG", "AAFaceMode", "attribute_targets", "balanced_pos_weight", "AttributeLoss", "AAFaceSchedule",
           "AAFaceObjective"]
