"""AAFace's network (Alipour Talemi et al., ICIP 2023, sections 2-3), registered as the backbone "aaface".

    x -> backbone (the convolutional layers of a ResNet-50: conv1 .. layer4, [B, 512, 7, 7])
      -> conv_a (shared by both branches) -> conv_fr -> F_FR   Br_FR: two convolutions + GAP
                                          -> conv_sb -> F_SB   Br_SB: Br_FR's first convolution + its own
    F_SB -> GAP -> one logit per attribute (binary classifiers)
    stages "fr", "sb":  embedding = GAP(F_FR)
    stage "joint":      embedding = GAP(AAI(F_FR, F_SB))          Br_FR.fused

    AAI (eq. 3):  F = Ms * (Mc * F_FR) + (1 - Ms) * ((1 - Mc) * F_SB), with
        X  = F_FR + F_SB
        Mc = sigmoid(P(GAP_s(X)) + P(GMP_s(X)) + Q(X) + b_c)                        channel sub-module
        Y  = Mc * F_FR + (1 - Mc) * F_SB
        Ms = sigmoid(conv7x7([mean_c(Y), max_c(Y)]) + R(Y) + b_s)                   spatial sub-module
    P: a point-wise bottleneck shared by the two pooled descriptors; Q: the global-context descriptor's own
    point-wise bottleneck on the whole map; R: a 3x3 convolutional bottleneck on the whole map. All reduce
    the channels by r = 8 (the paper's best, Table 2). Mc and Ms have the input feature's shape [B, C, H, W].

Stages (section 3.2, `set_stage`): "fr" trains Br_FR (conv_a, conv_fr) with the backbone frozen; "sb"
trains Br_SB (conv_sb and the attribute classifiers) with the backbone and conv_a frozen; "joint" trains
both branches and the AAI. The backbone stays frozen in the joint stage too (the paper names only the
branches as trained in its third step); `freeze_backbone=False` trains it in "fr" and "joint" instead, for
a backbone that does not start from trained weights. Frozen parts keep their BatchNorm statistics. The
backbone's parameter names are insightface's IResNet names (`init_weights` loads a released
IResNet-50 into it, `init_weights_target`); the paper's backbone is a ResNet-50 trained on VGGFace2, whose
closest published face weights in this family are insightface's IResNet-50.

Where the paper leaves a detail open (its Fig. 1-2 are not in the text), the choices made here:
- Branch convolutions are 3x3, stride 1, `branch_channels` (512) wide; conv_a is conv-BN-PReLU (IResNet's
  unit), conv_fr / conv_sb are conv-BN without an activation, so that the GAP embedding can take either
  sign (as the BN-ended embeddings of ArcFace's IResNet) and has `embedding_size` channels.
- "Global context descriptor" (section 2.2) is read as AFF's (ref. [12], MS-CAM): the map itself, through
  its own bottleneck at every position (that term is what gives Mc the input's shape); the GAP and GMP
  descriptors share the other bottleneck (CBAM, ref. [10]). The spatial sub-module mirrors it: CBAM's
  7x7 convolution of the channel-pooled maps, plus a 3x3 convolutional bottleneck on the map; the
  bottlenecks on whole maps end in BatchNorm as AFF's do.
- The gates start at sigmoid(init_logit) = 0.95 (each sub-module's last layer starts at zero), so the joint
  stage starts from F ~= 0.9 * F_FR: the features the FR classifier was trained on in stage "fr".
- The attribute classifiers are one linear layer on GAP(F_SB) (n binary classifiers, eq. 1-2).
Its plain `forward(images)` gives the embedding, so evaluation and export treat it as any backbone.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.backbones import build_backbone, register_backbone
from trainer.backbones.iresnet import IResNet

STAGES = ("fr", "sb", "joint")
_TRUNK_PARTS = ("conv1", "bn1", "prelu", "layer1", "layer2", "layer3", "layer4")
# An IResNet's embedding layer: not part of AAFace's backbone (Br_FR's GAP gives the embedding).
IRESNET_HEAD_PREFIXES = ("bn2.", "dropout.", "fc.", "features.")


def _bottleneck(channels: int, hidden: int, kernel: int, norm: bool) -> nn.Sequential:
    """channels -> hidden -> channels; the last layer starts at zero (the gate starts at its bias)."""
    pad = kernel // 2
    layers = [nn.Conv2d(channels, hidden, kernel, padding=pad, bias=not norm)]
    layers += [nn.BatchNorm2d(hidden)] if norm else []
    layers += [nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, kernel, padding=pad, bias=not norm)]
    layers += [nn.BatchNorm2d(channels)] if norm else []
    nn.init.zeros_(layers[-1].weight)
    if layers[-1].bias is not None:
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class ChannelAttention(nn.Module):
    """Mc [B, C, H, W]: the pooled descriptors through a shared bottleneck plus the global-context
    descriptor (the map) through its own point-wise bottleneck, broadcast-added."""

    def __init__(self, channels: int, reduction: int = 8, init_logit: float = 3.0):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pooled = _bottleneck(channels, hidden, 1, norm=False)  # [B, C, 1, 1] descriptors: no batch BN
        self.context = _bottleneck(channels, hidden, 1, norm=True)
        self.bias = nn.Parameter(torch.full((1, channels, 1, 1), float(init_logit)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(F.adaptive_avg_pool2d(x, 1)) + self.pooled(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(pooled + self.context(x) + self.bias)


class SpatialAttention(nn.Module):
    """Ms [B, C, H, W]: the channel-pooled descriptors [mean_c, max_c] through a 7x7 convolution plus the
    global-context descriptor (the map) through a 3x3 convolutional bottleneck, broadcast-added."""

    def __init__(self, channels: int, reduction: int = 8, kernel: int = 7, init_logit: float = 3.0):
        super().__init__()
        self.pooled = nn.Conv2d(2, 1, kernel, padding=kernel // 2)
        nn.init.zeros_(self.pooled.weight)
        nn.init.zeros_(self.pooled.bias)
        self.context = _bottleneck(channels, max(channels // reduction, 1), 3, norm=True)
        self.bias = nn.Parameter(torch.full((1, 1, 1, 1), float(init_logit)))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.pooled(pooled) + self.context(y) + self.bias)


class AAIModule(nn.Module):
    """Attribute-aware attentional integration (eq. 3) of an FR and an SB feature map of one shape."""

    def __init__(self, channels: int, reduction: int = 8, spatial_kernel: int = 7, init_logit: float = 3.0):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction, init_logit)
        self.spatial = SpatialAttention(channels, reduction, spatial_kernel, init_logit)

    def forward(self, f_fr: torch.Tensor, f_sb: torch.Tensor) -> torch.Tensor:
        if f_fr.shape != f_sb.shape:
            raise ValueError(f"AAI needs maps of one shape, got {tuple(f_fr.shape)} and {tuple(f_sb.shape)}")
        mc = self.channel(f_fr + f_sb)
        fr, sb = mc * f_fr, (1.0 - mc) * f_sb
        ms = self.spatial(fr + sb)
        return ms * fr + (1.0 - ms) * sb


def conv_bn(cin: int, cout: int, activation: bool) -> nn.Sequential:
    """A branch convolution: 3x3 conv -> BN (-> PReLU)."""
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.PReLU(cout)] if activation else []))


class IResNetTrunk(nn.Module):
    """The convolutional layers of a built IResNet (conv1 .. layer4) under insightface's names, without its
    embedding layer: `[B, 3, 112, 112]` -> `[B, 512, 7, 7]`."""

    def __init__(self, net: IResNet):
        super().__init__()
        for name in _TRUNK_PARTS:
            setattr(self, name, getattr(net, name))
        self.grad_checkpoint = net.grad_checkpoint
        self.out_channels = net.bn2.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return IResNet.forward_features(self, x)


class AAFaceNet(nn.Module):
    """backbone -> Br_FR and Br_SB (shared first convolution) -> AAI -> GAP embedding; GAP(F_SB) ->
    attribute logits.

    `forward(x)` returns the embedding; `forward(x, with_attributes=True)` returns `(embedding or None,
    attribute logits or None)`, computing only what the stage trains ("sb": no embedding, "fr": no logits).
    """

    def __init__(self, backbone: nn.Module, in_channels: int, num_attributes: int, embedding_size: int = 512,
                 branch_channels: int = 512, reduction: int = 8, init_logit: float = 3.0,
                 freeze_backbone: bool = True):
        super().__init__()
        if num_attributes < 1:
            raise ValueError(f"AAFace needs at least one attribute, got num_attributes={num_attributes}")
        self.backbone = backbone
        self.conv_a = conv_bn(in_channels, branch_channels, activation=True)
        self.conv_fr = conv_bn(branch_channels, embedding_size, activation=False)
        self.conv_sb = conv_bn(branch_channels, embedding_size, activation=False)
        self.aai = AAIModule(embedding_size, reduction, init_logit=init_logit)
        self.sb_classifier = nn.Linear(embedding_size, num_attributes)
        self.num_attributes = num_attributes
        self.freeze_backbone = freeze_backbone
        self.stage = "joint"
        self.set_stage("joint")

    def init_weights_target(self) -> Tuple[nn.Module, Tuple[str, ...]]:
        """What published backbone weights initialise (trainer/init_weights.py): the backbone, and the
        prefixes of the source's keys it has no place for (an IResNet's embedding layer)."""
        return self.backbone, IRESNET_HEAD_PREFIXES

    def stage_parts(self, stage: str) -> Tuple[nn.Module, ...]:
        """The sub-modules trained in `stage`."""
        backbone = () if self.freeze_backbone else (self.backbone,)
        if stage == "fr":
            return (*backbone, self.conv_a, self.conv_fr)
        if stage == "sb":
            return self.conv_sb, self.sb_classifier
        if stage == "joint":
            return (*backbone, self.conv_a, self.conv_fr, self.conv_sb, self.sb_classifier, self.aai)
        raise ValueError(f"AAFace stage must be one of {', '.join(STAGES)}, got {stage!r}")

    def set_stage(self, stage: str) -> None:
        """Freezes everything not trained in `stage` (no gradient, BN statistics frozen too)."""
        trained = {id(m) for m in self.stage_parts(stage)}
        self.stage = stage
        for child in self.children():
            child.requires_grad_(id(child) in trained)
        self.train(self.training)

    def get_extra_state(self) -> torch.Tensor:
        # The stage picks the embedding path, so checkpoints and model.pt carry it: as a tensor (its index
        # in STAGES), because the trainer's checkpoints treat every state_dict value as one.
        return torch.tensor(STAGES.index(self.stage))

    def set_extra_state(self, state) -> None:
        self.set_stage(state["stage"] if isinstance(state, dict) else STAGES[int(state)])

    def train(self, mode: bool = True) -> "AAFaceNet":
        super().train(mode)
        if mode:
            # Frozen parts keep their BN running statistics: "frozen" must not drift.
            trained = {id(m) for m in self.stage_parts(self.stage)}
            for child in self.children():
                if id(child) not in trained:
                    child.eval()
        return self

    def forward(self, x: torch.Tensor, with_attributes: bool = False):
        h = self.conv_a(self.backbone(x))
        need_embedding = not with_attributes or self.stage != "sb"
        need_sb = (with_attributes and self.stage != "fr") or (need_embedding and self.stage == "joint")
        f_sb = self.conv_sb(h) if need_sb else None
        embedding = None
        if need_embedding:
            f_fr = self.conv_fr(h)
            embedding = (self.aai(f_fr, f_sb) if self.stage == "joint" else f_fr).mean(dim=(2, 3))
        if not with_attributes:
            return embedding
        attributes = self.sb_classifier(f_sb.mean(dim=(2, 3))) if f_sb is not None else None
        return embedding, attributes


@register_backbone("aaface")
def aaface(embedding_size: int = 512, dropout: float = 0.0, base: str = "r50", num_attributes: int = 1,
           branch_channels: int = 512, reduction: int = 8, init_logit: float = 3.0,
           freeze_backbone: bool = True, **base_kwargs) -> AAFaceNet:
    """AAFace on the convolutional layers of an IResNet `base` (insightface's names, so `init_weights`
    loads its released weights); the GAP output of Br_FR (fused in the joint stage) is the embedding."""
    if dropout:
        raise ValueError(f"AAFace's embedding is a GAP output, with no dropout layer; got dropout={dropout}")
    net = build_backbone(base, **base_kwargs)
    if not isinstance(net, IResNet):
        raise TypeError(f"AAFace's backbone is an IResNet (r18 .. r200); {base!r} is a {type(net).__name__}")
    trunk = IResNetTrunk(net)
    return AAFaceNet(trunk, trunk.out_channels, num_attributes, embedding_size, branch_channels, reduction,
                     init_logit, freeze_backbone)
