"""MobileFaceNet (Chen et al. 2018), in the widened form that insightface's arcface_torch trains.

Inverted-residual bottlenecks (1x1 expand -> 3x3 depthwise -> 1x1 linear projection), ending in a
global depthwise conv (GDC, a 7x7 depthwise conv in place of global pooling, so that the position of
each facial part keeps its own weight), a bias-free FC and BN. Channels are `scale` times the paper's;
the expansion widths are fixed, as in arcface_torch.

    stage (input 112x112)        out ch (s = scale)   units   stride   expansion width
    conv3x3                      64s                  1       2        -
    depthwise conv3x3 (or units) 64s                  b0      1        64 groups / 128
    bottleneck                   64s                  1 + b1  2        128
    bottleneck                   128s                 1 + b2  2        256
    bottleneck                   128s                 1 + b3  2        512 / 256
    conv1x1                      512                  1       1        -
    GDC 7x7 -> FC -> BN          d                    1       -        -

    name          scale  units b0..b3   params (d=512)
    mbf_facexzoo  1      1 4 6 2         1.20M   (FaceX-Zoo's; the paper's width)
    mbf           2      1 4 6 2         2.06M
    mbf_large     4      2 8 12 4        6.31M

Module names follow arcface_torch's, so its released MobileFaceNet weights load as they are.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.backbones import register_backbone
from trainer.backbones.input_norm import build_input_norm

__all__ = ["MobileFaceNet"]


class ConvBNPReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.PReLU(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvBN(nn.Module):
    """Conv + BN with no activation: a linear projection (keeps low-dimensional features intact)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 padding: int = 0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """1x1 expand to `width` -> 3x3 depthwise (stride) -> 1x1 linear projection (+ identity)."""

    def __init__(self, in_ch: int, out_ch: int, width: int, stride: int = 1, residual: bool = False):
        super().__init__()
        if residual and (in_ch != out_ch or stride != 1):
            raise ValueError("a residual bottleneck needs in_ch == out_ch and stride 1")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBNPReLU(in_ch, width, 1),
            ConvBNPReLU(width, width, 3, stride, groups=width),
            ConvBN(width, out_ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStage(nn.Module):
    def __init__(self, channels: int, units: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(*[Bottleneck(channels, channels, width, residual=True)
                                      for _ in range(units)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the 7x7 map, then FC (no bias: BN follows) and BN."""

    def __init__(self, channels: int, embedding_size: int, dropout: float = 0.0, map_size: int = 7):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(channels, channels, kernel=map_size, groups=channels),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        # Outside `layers` so that the module names stay arcface_torch's.
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gdc, flatten, fc, bn = self.layers
        return bn(fc(self.dropout(flatten(gdc(x)))))


class MobileFaceNet(nn.Module):
    """`[B, 3, 112, 112]` in [-1, 1] -> `[B, embedding_size]` (not normalised).

    `resolution` < 112 shrinks the input (area average) before the stem: every feature map is then
    smaller by that factor squared, which is what makes a CPU run of a few minutes learn (the CPU
    demo trains at 56x56). The GDC kernel follows the last map's size. `input_norm` (`"lcn"`,
    `"imagenet"`) runs before that, on the full crop (`trainer.backbones.input_norm`).
    """

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, units: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2, resolution: int = 112, input_norm: Optional[str] = None):
        super().__init__()
        self.input_norm = build_input_norm(input_norm)
        if not 16 <= resolution <= 112:
            raise ValueError(f"MobileFaceNet resolution must lie in [16, 112], got {resolution}")
        self.resolution = resolution
        if len(units) != 4:
            raise ValueError(f"MobileFaceNet has 4 stages of units, got {tuple(units)}")
        c1, c2 = 64 * scale, 128 * scale
        first = (ConvBNPReLU(c1, c1, 3, groups=64) if units[0] == 1
                 else ResidualStage(c1, units[0], width=128))
        self.layers = nn.ModuleList([
            ConvBNPReLU(3, c1, 3, stride=2),
            first,
            Bottleneck(c1, c1, width=128, stride=2),
            ResidualStage(c1, units[1], width=128),
            Bottleneck(c1, c2, width=256, stride=2),
            ResidualStage(c2, units[2], width=256),
            Bottleneck(c2, c2, width=512, stride=2),
            ResidualStage(c2, units[3], width=256),
        ])
        self.conv_sep = ConvBNPReLU(c2, 512, 1)
        map_size = resolution
        for _ in range(4):  # four stride-2 3x3 convs with padding 1
            map_size = (map_size + 1) // 2
        self.features = GDC(512, embedding_size, dropout, map_size=map_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


@register_backbone("mbf")
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> MobileFaceNet:
    """MobileFaceNet, arcface_torch's `mbf`: scale 2, units (1, 4, 6, 2) unless given (`network_kwargs`)."""
    return MobileFaceNet(embedding_size, dropout, **{"units": (1, 4, 6, 2), "scale": 2, **kwargs})


@register_backbone("mbf_large")
def mobilefacenet_large(embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> MobileFaceNet:
    """arcface_torch's `mbf_large`: scale 4, units (2, 8, 12, 4) unless given (`network_kwargs`)."""
    return MobileFaceNet(embedding_size, dropout, **{"units": (2, 8, 12, 4), "scale": 4, **kwargs})


@register_backbone("mbf_facexzoo")
def mobilefacenet_facexzoo(embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> MobileFaceNet:
    """FaceX-Zoo's MobileFaceNet (its backbone/MobileFaceNets.py, the network of its tables and SST): the
    paper's own width (scale 1: 64/128 channels), units (1, 4, 6, 2), GDC, 512-d. 1,200,512 parameters
    at d=512, FaceX-Zoo's count; 1.00M at the paper's d=128 (it quotes 0.99M)."""
    return MobileFaceNet(embedding_size, dropout, **{"units": (1, 4, 6, 2), "scale": 1, **kwargs})
