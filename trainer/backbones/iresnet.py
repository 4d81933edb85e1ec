"""IResNet (Improved ResNet, Duta et al. 2020) as used by ArcFace for 112x112 faces.

Residual unit: BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride) -> BN, added to the shortcut
(identity, or 1x1 conv stride 2 + BN at the first unit of a stage). The stem keeps 112x112
(3x3 conv, stride 1); the four stages halve it to 7x7. Head: BN -> dropout -> FC(512*7*7 -> d) ->
BN, the last BN with a fixed scale of 1 (only its shift learns), as in ArcFace.

    name   units per stage   params (d=512)
    r18    2  2  2  2        24.03M
    r34    3  4  6  3        34.14M
    r50    3  4 14  3        43.59M
    r100   3 13 30  3        65.16M
    r200   6 26 60  6       118.83M

These are the counts of arcface_torch's own iresnet.py (module names are the same, so its released
weights load as they are). The issue quotes 43.57M for IResNet-50; arcface_torch's model has 43.59M.
"""
from __future__ import annotations

from itertools import chain
from typing import Sequence

import torch
import torch.nn as nn

from trainer.backbones import register_backbone
from trainer.backbones._blocks import run_blocks

__all__ = ["IBasicBlock", "IResNet", "IRESNET_UNITS"]

IRESNET_UNITS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
# 112 -> 56 -> 28 -> 14 -> 7 after the four stride-2 stages.
FINAL_SPATIAL = 7


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """The IResNet residual unit (BN-Conv-BN-PReLU-Conv-BN)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """`[B, 3, 112, 112]` in [-1, 1] -> `[B, embedding_size]` (not normalised).

    `grad_checkpoint=True` recomputes each residual unit in the backward pass instead of storing its
    activations (less memory for r100/r200 at large batches, ~30% more compute). The recomputation
    updates the BN running statistics a second time per step (as insightface's `using_ckpt` does):
    the statistics still converge to the same averages, slightly faster.
    """

    def __init__(
        self,
        units: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        if len(units) != len(STAGE_WIDTHS):
            raise ValueError(f"IResNet has {len(STAGE_WIDTHS)} stages, got units {tuple(units)}")
        self.grad_checkpoint = grad_checkpoint
        self.conv1 = conv3x3(3, STEM_WIDTH)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH, eps=1e-5)
        self.prelu = nn.PReLU(STEM_WIDTH)
        in_ch = STEM_WIDTH
        stages = []
        for n, width in zip(units, STAGE_WIDTHS):
            blocks = [IBasicBlock(in_ch, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * FINAL_SPATIAL * FINAL_SPATIAL, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # A fixed unit scale on the embedding BN (ArcFace's choice): a learnable scale would only
        # rescale features that the loss normalises anyway.
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            # Each unit starts as the identity, which helps very deep variants start training.
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512x7x7 feature map after the last stage (before the output BN)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return run_blocks(chain(*stages), x, self.grad_checkpoint and self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.forward_features(x))
        x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))


def _factory(name: str):
    def build(embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> IResNet:
        return IResNet(IRESNET_UNITS[name], embedding_size=embedding_size, dropout=dropout, **kwargs)

    build.__name__ = f"iresnet{name[1:]}"
    build.__doc__ = f"IResNet-{name[1:]}: units per stage {IRESNET_UNITS[name]}."
    return register_backbone(name)(build)


iresnet18 = _factory("r18")
iresnet34 = _factory("r34")
iresnet50 = _factory("r50")
iresnet100 = _factory("r100")
iresnet200 = _factory("r200")
