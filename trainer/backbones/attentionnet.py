"""Residual Attention Network (Wang et al., CVPR 2017), FaceX-Zoo's AttentionNet, for 112x112 faces.

Pre-activation bottleneck residual units, with attention modules between the stages. A module's trunk
(t = 2 units) is multiplied by (1 + M), M a soft mask in (0, 1) from an hourglass branch that pools
down to 7x7 and back up, with skip units between scales (r = 1 unit per scale, p = 1 unit before and
after the split). The stem takes a 112 face to 56x56 where ImageNet's took 224 to 56x56, so every
stage runs at the paper's resolutions:

| stage | output | Attention-56 | Attention-92 | mask branch depth          |
|-------|--------|--------------|--------------|----------------------------|
| stem  | 56x56  | 3x3 conv 64, max pool /2 (ImageNet: 7x7/2 conv, max pool /2) |  |
| 1     | 56x56  | unit 256, 1 attention module  | 1 module | 56 -> 28 -> 14 -> 7 and up  |
| 2     | 28x28  | unit 512 /2, 1 module         | 2        | 28 -> 14 -> 7 and up        |
| 3     | 14x14  | unit 1024 /2, 1 module        | 3        | 14 -> 7 and up              |
| 4     | 7x7    | 3 units 2048 (first /2)       | 3        |                            |

Head as in FaceX-Zoo / IResNet: BN, dropout, FC over the 2048x7x7 map, BN.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone
from .ressanet import FaceEmbeddingHead


class PreActBottleneck(nn.Module):
    """BN-ReLU-1x1, BN-ReLU-3x3(stride), BN-ReLU-1x1 (width out/4), identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cout // 4
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class MaskBranch(nn.Module):
    """Bottom-up (max pool + r units) `levels` times, then top-down (upsample + add skip + r units)."""

    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.down = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(levels))
        self.skips = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(levels - 1))
        self.bottom = PreActBottleneck(channels, channels)  # the coarsest scale gets 2r units
        self.up = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(levels - 1))
        self.to_mask = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes, skips = [], []
        for i, unit in enumerate(self.down):
            sizes.append(x.shape[-2:])
            x = unit(F.max_pool2d(x, 3, stride=2, padding=1))
            if i < len(self.skips):
                skips.append(self.skips[i](x))
        x = self.bottom(x)
        for unit, skip in zip(self.up, reversed(skips)):
            x = unit(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip)
        return self.to_mask(F.interpolate(x, size=sizes[0], mode="bilinear", align_corners=False))


class AttentionModule(nn.Module):
    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.pre = PreActBottleneck(channels, channels)
        self.trunk = nn.Sequential(PreActBottleneck(channels, channels), PreActBottleneck(channels, channels))
        self.mask = MaskBranch(channels, levels)
        self.post = PreActBottleneck(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        # Attention residual learning: (1 + M) * T keeps the trunk's signal where the mask is near 0.
        x = (1 + self.mask(x)) * self.trunk(x)
        return self.post(x)


class AttentionNet(nn.Module):
    def __init__(self, modules_per_stage: Sequence[int] = (1, 1, 1), embedding_size: int = 512, dropout: float = 0.0,
                 input_size: int = 112, imagenet_stem: bool = False):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
            side = input_size // 4
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(2))
            side = input_size // 2
        if side % 8:
            raise ValueError(f"input_size {input_size} must give a stage-1 map divisible by 8")
        layers, cin = [], 64
        for stage, (n, cout) in enumerate(zip(modules_per_stage, (256, 512, 1024))):
            layers.append(PreActBottleneck(cin, cout, stride=1 if stage == 0 else 2))
            layers += [AttentionModule(cout, levels=3 - stage) for _ in range(n)]
            cin = cout
        layers += [PreActBottleneck(cin, 2048, stride=2), PreActBottleneck(2048, 2048), PreActBottleneck(2048, 2048)]
        self.body = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(2048)  # pre-activation units leave the last sum un-normalised
        self.head = FaceEmbeddingHead(2048, (side // 8, side // 8), embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 2048-channel map after the last stage, activated."""
        return F.relu(self.bn(self.body(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_backbone("attention56")
def attention56(**kwargs) -> AttentionNet:
    return AttentionNet((1, 1, 1), **kwargs)


@register_backbone("attention92")
def attention92(**kwargs) -> AttentionNet:
    return AttentionNet((1, 2, 3), **kwargs)
