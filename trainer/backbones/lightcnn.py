"""Light CNN (Wu, He, Sun, Tan, "A Light CNN for Deep Face Representation with Noisy Labels", TIFS 2018).

Every activation is Max-Feature-Map (MFM): a layer computes 2n maps and keeps the element-wise maximum of
its two halves, a competitive, learnt feature selection in place of ReLU. Four 2x2 poolings take the
face from 112 to 7 (the paper's 128 to 8), then one fully connected layer gives the embedding:

| layer      | LightCNN-9              | LightCNN-29 (v2)                                      |
|------------|-------------------------|-------------------------------------------------------|
| conv1      | 5x5 MFM 48, pool        | 5x5 MFM 48, pool                                      |
| stage 1    | group 48 -> 96, pool    | 1 res block (48), group 48 -> 96, pool                |
| stage 2    | group 96 -> 192, pool   | 2 res blocks (96), group 96 -> 192, pool              |
| stage 3    | group 192 -> 128        | 3 res blocks (192), group 192 -> 128                  |
| stage 4    | group 128 -> 128, pool  | 4 res blocks (128), group 128 -> 128, pool            |
| embedding  | MFM fc 256              | MFM fc 256 (v2: plain fc 256)                         |

A group is a 1x1 MFM conv then a 3x3 MFM conv; a res block is two 3x3 MFM convs plus the identity.
v2 pools with max + average instead of max alone. Dropout (the paper's, between the embedding and
the classifier) acts on the embedding in training. The paper's networks take 128x128 grey images;
here the input is the 112x112 RGB face and the embedding 512-d, like every backbone of the trainer
(`in_channels=1, input_size=128, embedding_size=256` rebuild the paper's setting).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone


class MFM(nn.Module):
    """Conv (or linear) to 2n outputs, then the element-wise max of the two halves."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, padding: int = 1, linear: bool = False):
        super().__init__()
        self.filter = nn.Linear(cin, 2 * cout) if linear else nn.Conv2d(cin, 2 * cout, kernel, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.filter(x).chunk(2, dim=1)
        return torch.maximum(a, b)


class Group(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(MFM(cin, cin, 1, 0), MFM(cin, cout, 3, 1))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = MFM(channels, channels)
        self.conv2 = MFM(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class Pool(nn.Module):
    """2x2 max pooling (v1, ceil mode as the original) or max + average pooling (v2)."""

    def __init__(self, with_average: bool):
        super().__init__()
        self.with_average = with_average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_average:
            return F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)
        return F.max_pool2d(x, 2, ceil_mode=True)


class LightCNN(nn.Module):
    def __init__(self, res_blocks: Sequence[int] = (0, 0, 0, 0), v2: bool = False, embedding_size: int = 512,
                 dropout: float = 0.0, in_channels: int = 3, input_size: int = 112):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        widths = (48, 96, 192, 128, 128)
        layers = [MFM(in_channels, 48, 5, 2), Pool(v2)]
        for stage, (n, cin, cout) in enumerate(zip(res_blocks, widths[:-1], widths[1:])):
            layers += [ResBlock(cin) for _ in range(n)]
            layers.append(Group(cin, cout))
            if stage != 2:  # the third stage keeps its resolution in every Light CNN
                layers.append(Pool(v2))
        self.features = nn.Sequential(*layers)
        side = input_size // 16
        flat = widths[-1] * side * side
        self.fc = nn.Linear(flat, embedding_size) if v2 else MFM(flat, embedding_size, linear=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc(self.features(x).flatten(1)))


@register_backbone("lightcnn9")
def lightcnn9(**kwargs) -> LightCNN:
    return LightCNN((0, 0, 0, 0), **kwargs)


@register_backbone("lightcnn29")
def lightcnn29(**kwargs) -> LightCNN:
    return LightCNN((1, 2, 3, 4), **kwargs)


@register_backbone("lightcnn29_v2")
def lightcnn29_v2(**kwargs) -> LightCNN:
    return LightCNN((1, 2, 3, 4), v2=True, **kwargs)
