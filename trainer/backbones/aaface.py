"""AAFace's network (Alipour Talemi et al., ICIP 2023), registered as the backbone "aaface".

A multi-branch network on a shared backbone: the face-recognition (FR) branch and a soft-biometric (SB)
branch of binary attribute classifiers, fused by the attribute-aware attentional integration (AAI)
module before the FR embedding layer:

    X  = F_FR + F_SB
    Mc = sigmoid(local(X) + mlp(GAP(X)) + mlp(GMP(X)) + mlp(GC(X)))     multi-scale channel attention
    Y  = Mc * F_FR + (1 - Mc) * F_SB
    Ms = sigmoid(conv7x7([mean_c(Y), max_c(Y)]))                         spatial attention
    F  = Ms * (Mc * F_FR) + (1 - Ms) * ((1 - Mc) * F_SB)

`local` is a point-wise bottleneck (the per-position scale), `mlp` a shared bottleneck on the three
global descriptors: average pooling, max pooling and a global context (attention-weighted pooling with a
softmax over positions); both reduce channels by r = 8. The last layer of each starts at zero and the
gates at a bias of `init_logit` (sigmoid(3) = 0.95), so the joint stage starts from F ~= F_FR, the map
the FR output layer was trained on in stage 1.

Stages (`set_stage`): "fr" (the FR branch alone, shared backbone included), "sb" (the SB branch alone,
everything else frozen), "joint" (all of it, AAI included); trainer/modes/aaface.py trains it. Its plain
`forward(images)` gives the embedding, so evaluation and export treat it as any backbone (kwargs: base,
num_attributes, split_after, ...).
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.backbones import build_backbone, register_backbone

STAGES = ("fr", "sb", "joint")
_IRESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _bottleneck(channels: int, hidden: int, norm: bool) -> nn.Sequential:
    layers = [nn.Conv2d(channels, hidden, 1, bias=not norm)]
    layers += [nn.BatchNorm2d(hidden)] if norm else []
    layers += [nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1, bias=not norm)]
    layers += [nn.BatchNorm2d(channels)] if norm else []
    return nn.Sequential(*layers)


class AAIModule(nn.Module):
    """Attribute-aware attentional integration of an FR and an SB feature map of the same shape."""

    def __init__(self, channels: int, reduction: int = 8, spatial_kernel: int = 7, init_logit: float = 3.0):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.local = _bottleneck(channels, hidden, norm=True)
        self.mlp = _bottleneck(channels, hidden, norm=False)
        self.context = nn.Conv2d(channels, 1, 1)
        self.channel_bias = nn.Parameter(torch.full((1, channels, 1, 1), float(init_logit)))
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)
        # Gates start at sigmoid(init_logit) everywhere: zero the last layer of each attention path.
        nn.init.zeros_(self.local[-1].weight)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        nn.init.zeros_(self.spatial.weight)
        nn.init.constant_(self.spatial.bias, float(init_logit))

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Mc [B, C, H, W] from the integrated map X = F_FR + F_SB."""
        b, c, h, w = x.shape
        weights = torch.softmax(self.context(x).reshape(b, 1, h * w), dim=-1)
        context = torch.bmm(x.reshape(b, c, h * w), weights.transpose(1, 2)).reshape(b, c, 1, 1)
        descriptors = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1), context])
        global_logit = self.mlp(descriptors).reshape(3, b, c, 1, 1).sum(0)
        return torch.sigmoid(self.local(x) + global_logit + self.channel_bias)

    def spatial_attention(self, y: torch.Tensor) -> torch.Tensor:
        """Ms [B, 1, H, W] from the channel-weighted map."""
        pooled = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, f_fr: torch.Tensor, f_sb: torch.Tensor) -> torch.Tensor:
        if f_fr.shape != f_sb.shape:
            raise ValueError(f"AAI needs maps of one shape, got {tuple(f_fr.shape)} and {tuple(f_sb.shape)}")
        mc = self.channel_attention(f_fr + f_sb)
        fr, sb = mc * f_fr, (1.0 - mc) * f_sb
        ms = self.spatial_attention(fr + sb)
        return ms * fr + (1.0 - ms) * sb


class _IResNetOutput(nn.Module):
    """IResNet's embedding layer (BN -> dropout -> FC -> BN) taken from a built IResNet."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.bn2, self.dropout, self.fc, self.features = net.bn2, net.dropout, net.fc, net.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


class AAFaceNet(nn.Module):
    """Shared stem -> FR branch and SB branch -> AAI -> FR embedding; SB branch -> attribute logits.

    `stage` ("fr", "sb", "joint", see `set_stage`) picks the path: before the joint stage the embedding
    comes from the FR branch alone. `forward(x)` returns the embedding; `forward(x, with_attributes=True)`
    returns `(embedding or None, attribute logits or None)`, computing only what the stage trains.
    """

    def __init__(self, stem: nn.Module, fr_branch: nn.Module, sb_branch: nn.Module, fr_output: nn.Module,
                 channels: int, num_attributes: int, reduction: int = 8, init_logit: float = 3.0):
        super().__init__()
        if num_attributes < 1:
            raise ValueError(f"AAFace needs at least one attribute, got num_attributes={num_attributes}")
        self.stem, self.fr_branch, self.sb_branch, self.fr_output = stem, fr_branch, sb_branch, fr_output
        self.aai = AAIModule(channels, reduction, init_logit=init_logit)
        self.sb_classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                           nn.Linear(channels, num_attributes))
        self.num_attributes = num_attributes
        self.stage = "joint"
        # Parameters the parts keep fixed by design (IResNet's embedding BN scale): no stage trains them.
        self._always_frozen = [p for p in self.parameters() if not p.requires_grad]

    def stage_parts(self, stage: str) -> Tuple[nn.Module, ...]:
        """The sub-modules trained in `stage`."""
        if stage == "fr":
            return self.stem, self.fr_branch, self.fr_output
        if stage == "sb":
            return self.sb_branch, self.sb_classifier
        if stage == "joint":
            return tuple(self.children())
        raise ValueError(f"AAFace stage must be one of {', '.join(STAGES)}, got {stage!r}")

    def set_stage(self, stage: str) -> None:
        """Freezes everything not trained in `stage` (no gradient, BN statistics frozen too)."""
        trained = {id(m) for m in self.stage_parts(stage)}
        self.stage = stage
        for child in self.children():
            child.requires_grad_(id(child) in trained)
        for p in self._always_frozen:
            p.requires_grad_(False)
        self.train(self.training)

    def get_extra_state(self) -> torch.Tensor:
        # The stage picks the embedding path, so checkpoints and model.pt carry it: as a tensor (its index
        # in STAGES), because the trainer's checkpoints treat every state_dict value as one.
        return torch.tensor(STAGES.index(self.stage))

    def set_extra_state(self, state) -> None:
        self.set_stage(state["stage"] if isinstance(state, dict) else STAGES[int(state)])

    def train(self, mode: bool = True) -> "AAFaceNet":
        super().train(mode)
        if mode and self.stage != "joint":
            # Frozen parts keep their BN running statistics: "frozen" must not drift.
            trained = {id(m) for m in self.stage_parts(self.stage)}
            for child in self.children():
                if id(child) not in trained:
                    child.eval()
        return self

    def forward(self, x: torch.Tensor, with_attributes: bool = False):
        shared = self.stem(x)
        need_embedding = not with_attributes or self.stage != "sb"
        need_sb = with_attributes and self.stage != "fr" or (need_embedding and self.stage == "joint")
        f_sb = self.sb_branch(shared) if need_sb else None
        embedding = None
        if need_embedding:
            f_fr = self.fr_branch(shared)
            embedding = self.fr_output(self.aai(f_fr, f_sb) if self.stage == "joint" else f_fr)
        if not with_attributes:
            return embedding
        attributes = self.sb_classifier(f_sb) if f_sb is not None else None
        return embedding, attributes


@register_backbone("aaface")
def aaface(embedding_size: int = 512, dropout: float = 0.0, base: str = "r50", num_attributes: int = 1,
           split_after: str = "layer2", reduction: int = 8, init_logit: float = 3.0,
           **base_kwargs) -> AAFaceNet:
    """AAFace on an IResNet `base`: stem and stages up to `split_after` shared, the later stages once per
    branch (the SB copy starts as a copy of the FR one), IResNet's embedding layer after the AAI."""
    net = build_backbone(base, embedding_size=embedding_size, dropout=dropout, **base_kwargs)
    parts = ("conv1", "bn1", "prelu", *_IRESNET_LAYERS, "bn2", "fc", "features")
    missing = [a for a in parts if not hasattr(net, a)]
    if missing:
        raise TypeError(f"AAFace splits an IResNet; backbone {base!r} lacks {', '.join(missing)}")
    if split_after not in _IRESNET_LAYERS[:-1]:
        raise ValueError(f"split_after must be one of {', '.join(_IRESNET_LAYERS[:-1])}, got {split_after!r}")
    cut = _IRESNET_LAYERS.index(split_after) + 1
    stem = nn.Sequential(net.conv1, net.bn1, net.prelu, *[getattr(net, n) for n in _IRESNET_LAYERS[:cut]])
    fr_branch = nn.Sequential(*[getattr(net, n) for n in _IRESNET_LAYERS[cut:]])
    return AAFaceNet(stem, fr_branch, copy.deepcopy(fr_branch), _IResNetOutput(net), net.bn2.num_features,
                     num_attributes, reduction, init_logit)
