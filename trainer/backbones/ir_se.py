"""IR-SE-50/100/152: the SE-IResNets of FaceX-Zoo's backbone table ("ResNet152-irse" and its siblings).

This is insightface's SE-IResNet as FaceX-Zoo builds it (its backbone/ResNets.py, `net_mode: ir_se`, taken
from TreB1eN's PyTorch port of insightface): a 3x3 stem at 112x112, four stages of 64/128/256/512 channels
that each halve the map, and the unit

    BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN -> SE (reduction 16, bias-free 1x1 convs, sigmoid)

added to the shortcut: a 1x1 max-pool of stride s (a plain subsampling) when the width stays, else a
strided 1x1 conv + BN. Unlike arcface_torch's IResNet (trainer/backbones/iresnet.py) there is no BN between
the first conv and the PReLU, the first unit of stage 1 subsamples through the max-pool, and the output
layer is BN2d -> dropout -> FC (with bias) -> BN1d with a learnt scale.

    name       units per stage   params (d=512)   FaceX-Zoo's Resnet(depth, mode="ir_se")
    ir_se50    3  4 14  3        43,797,696       same count
    ir_se100   3 13 30  3        65,502,016       same count
    ir_se152   3  8 36  3        71,148,736       same count

Module names are FaceX-Zoo's / TreB1eN's (input_layer, body.N.res_layer, output_layer), so their weights
load as they are. FaceX-Zoo trains these with drop_ratio 0.4 (`dropout`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from trainer.backbones import register_backbone
from trainer.backbones._blocks import run_blocks
from trainer.backbones.iresnet import STAGE_WIDTHS, STEM_WIDTH

IR_SE_UNITS = {
    "ir_se50": (3, 4, 14, 3),
    "ir_se100": (3, 13, 30, 3),
    "ir_se152": (3, 8, 36, 3),
}
SE_REDUCTION = 16


class SEModule(nn.Module):
    """Channel gate with bias-free 1x1 convs (SENet's reduction 16)."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class IRSEUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        if in_ch == out_ch:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                                nn.BatchNorm2d(out_ch))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            SEModule(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSENet(nn.Module):
    """`[B, 3, 112, 112]` -> `[B, embedding_size]`; `input_size` a multiple of 16 sets the FC's map size."""

    def __init__(self, units: Sequence[int], embedding_size: int = 512, dropout: float = 0.0,
                 input_size: int = 112, grad_checkpoint: bool = False):
        super().__init__()
        if len(units) != len(STAGE_WIDTHS):
            raise ValueError(f"IR-SE has {len(STAGE_WIDTHS)} stages, got units {tuple(units)}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.grad_checkpoint = grad_checkpoint
        self.input_layer = nn.Sequential(nn.Conv2d(3, STEM_WIDTH, 3, 1, 1, bias=False), nn.BatchNorm2d(STEM_WIDTH),
                                         nn.PReLU(STEM_WIDTH))
        body, in_ch = [], STEM_WIDTH
        for n, width in zip(units, STAGE_WIDTHS):
            body += [IRSEUnit(in_ch, width, 2)] + [IRSEUnit(width, width, 1) for _ in range(n - 1)]
            in_ch = width
        self.body = nn.Sequential(*body)
        side = input_size // 16
        self.output_layer = nn.Sequential(nn.BatchNorm2d(in_ch), nn.Dropout(dropout), nn.Flatten(),
                                          nn.Linear(in_ch * side * side, embedding_size),
                                          nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.body, self.input_layer(x), self.grad_checkpoint and self.training)
        return self.output_layer(x)


def _factory(name: str):
    def build(embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> IRSENet:
        return IRSENet(IR_SE_UNITS[name], embedding_size=embedding_size, dropout=dropout, **kwargs)

    build.__name__ = name
    build.__doc__ = f"IR-SE-{name[5:]}: units per stage {IR_SE_UNITS[name]}."
    return register_backbone(name)(build)


ir_se50 = _factory("ir_se50")
ir_se100 = _factory("ir_se100")
ir_se152 = _factory("ir_se152")
