"""The CrossScanViT + ResNet-50 hybrid of the competition report, its final model ("ResNet50 +
ASPPCrossScanViT", the last row of its Table 1), laid out as the report's section 3 describes it:

    image (any size; 112x112 faces)
      -> SE-ResNet-50 (bottleneck blocks with an SE gate, section 3.5): stem 7x7/2 + max-pool/2, layer1,
         layer2 (stride 8 in all), layer3 and layer4 dilated (2, 4) instead of strided (section 3.2)
      -> ASPP on layer4 (section 3.3, its code): 1x1 | 3x3 dil 3 | 3x3 dil 5 | 3x3 dil 7 | image pooling,
         plain convs, concatenated, then 1x1 conv, BN, ReLU
      -> CrossScanViT on the ASPP map (section 3.4): the map in four directions (as it is, flipped
         vertically and horizontally, transposed, flipped then transposed); each patch-embedded by a conv
         with kernel = stride = patch, read row by row, given a sinusoidal position encoding generated
         for the length of the sequence at hand, and encoded by one shared pre-norm transformer;
         each direction's tokens averaged to a vector
      -> direction fusion (section 3.4.3, FeatureFusion): SE (FC 4C -> 4C/16, ReLU, FC, sigmoid) on the
         four concatenated vectors gives per-direction channel weights; the direction with the largest
         mean weight enters at weight 1, the others weighted
      -> embedding: dropout -> FC (C -> d) -> BN1d (the report's classifier FC, as a face embedding)

Nothing in the network depends on the input size (the position encoding is computed, the fusion
pools), so a model built once runs on 112x112 faces and on the report's 224x224 crops alike.

The report leaves the ViT's width, depth, heads and patch size open: 256 wide, 4 blocks, 8 heads and
2x2 patches (a 14x14 map at 112x112 becomes 49 tokens per direction) are this module's choice. The SE
reduction is 16 in the fusion (the report's code) and in the bottlenecks (SENet's).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone
from .input_norm import build_input_norm
from .vit import Block, PatchEmbed

SE_REDUCTION = 16


class SqueezeExcite(nn.Module):
    """SENet's channel gate on a map: GAP -> FC (C/r) -> ReLU -> FC -> sigmoid -> rescale."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)), inplace=True))
        return x * torch.sigmoid(s)


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck (1x1, 3x3 with stride/dilation, 1x1 x4) with SE on the residual branch."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.se = SqueezeExcite(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.se(self.bn3(self.conv3(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _layer(inplanes: int, planes: int, blocks: int, stride: int, dilation: int, first_dilation: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
    layers = [Bottleneck(inplanes, planes, stride, first_dilation, downsample)]
    layers += [Bottleneck(planes * 4, planes, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ASPP(nn.Module):
    """The report's ASPP: four plain (bias-free) convs at dilations 1/3/5/7 and a pooled 1x1 branch,
    concatenated, then 1x1 conv -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int = 256, dilations=(3, 5, 7)):
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(cin, cout, 1, bias=False)] +
                                      [nn.Conv2d(cin, cout, 3, padding=d, dilation=d, bias=False) for d in dilations])
        self.pool = nn.Conv2d(cin, cout, 1, bias=False)
        self.project = nn.Sequential(nn.Conv2d(cout * (len(dilations) + 2), cout, 1, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        # The report upsamples the 1x1 pooled map bilinearly: from a single pixel that is a broadcast.
        outs.append(self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, 4, C, ., .]`: the map as it is, flipped along both axes, transposed, and
    flipped then transposed (the report's cross_scan). Read row by row these are the row-major order,
    its reverse, the column-major order and its reverse. Needs a square map to stack."""
    flipped = torch.flip(x, dims=[2, 3])
    return torch.stack([x, flipped, x.transpose(2, 3), flipped.transpose(2, 3)], dim=1)


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Transformer sine/cosine encoding `[length, dim]`, generated for whatever length the input gives."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    enc = torch.zeros(length, dim, device=device, dtype=torch.float32)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return enc.to(dtype)


class DirectionFusion(nn.Module):
    """The report's FeatureFusion: SE over the four directions' pooled vectors `[B, 4, C]` concatenated
    (FC 4C -> 4C/r -> ReLU -> FC -> sigmoid), reshaped to per-direction channel weights; the direction
    with the largest mean weight is added as it is, the others times their weights. Output `[B, C]`."""

    def __init__(self, channels: int, directions: int = 4, reduction: int = SE_REDUCTION):
        super().__init__()
        self.directions = directions
        self.fc1 = nn.Linear(channels * directions, channels * directions // reduction)
        self.fc2 = nn.Linear(channels * directions // reduction, channels * directions)

    def weights(self, vectors: torch.Tensor) -> torch.Tensor:
        """`[B, D, C]` -> the SE weights `[B, D, C]` in (0, 1)."""
        b, d, c = vectors.shape
        return torch.sigmoid(self.fc2(F.relu(self.fc1(vectors.reshape(b, d * c))))).reshape(b, d, c)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        w = self.weights(vectors)
        strongest = w.mean(dim=2).argmax(dim=1)  # [B]
        keep = F.one_hot(strongest, self.directions).to(w.dtype).unsqueeze(2)  # [B, D, 1]
        return ((keep + (1 - keep) * w) * vectors).sum(dim=1)


class CrossScanViT(nn.Module):
    """`[B, cin, H, W]` (H = W) -> `[B, dim]`: four directions, patch embedding, shared encoder, fusion."""

    def __init__(self, cin: int, dim: int, depth: int = 4, heads: int = 8, patch_size: int = 2,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.dim = dim
        self.patch_embed = PatchEmbed(patch_size, dim, in_channels=cin)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.Sequential(*(Block(dim, heads, 4.0, r) for r in rates))
        self.norm = nn.LayerNorm(dim)
        self.fusion = DirectionFusion(dim)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x.shape[2] != x.shape[3]:
            raise ValueError(f"cross scan stacks the map with its transpose: it needs a square map, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        # The four directions share the embedding and the encoder: one batch of 4B maps.
        tokens = self.patch_embed(cross_scan(x).flatten(0, 1))  # [4B, N, dim], direction-major per sample
        tokens = tokens + sinusoidal_positions(tokens.shape[1], self.dim, tokens.device, tokens.dtype)
        tokens = self.norm(self.blocks(tokens))
        return self.fusion(tokens.mean(dim=1).reshape(b, 4, self.dim))


class CrossScanResNet50(nn.Module):
    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, vit_dim: int = 256, vit_depth: int = 4,
                 vit_heads: int = 8, patch_size: int = 2, aspp_channels: int = 256, drop_path_rate: float = 0.0,
                 input_norm: Optional[str] = None):
        super().__init__()
        # the report feeds ImageNet-normalised pixels: input_norm="imagenet" re-normalises the readers' [-1, 1]
        self.input_norm = build_input_norm(input_norm)
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        self.layer1 = _layer(64, 64, 3, stride=1, dilation=1, first_dilation=1)
        self.layer2 = _layer(256, 128, 4, stride=2, dilation=1, first_dilation=1)
        self.layer3 = _layer(512, 256, 6, stride=1, dilation=2, first_dilation=1)
        self.layer4 = _layer(1024, 512, 3, stride=1, dilation=4, first_dilation=2)
        self.aspp = ASPP(2048, aspp_channels)
        self.cross_scan = CrossScanViT(aspp_channels, vit_dim, vit_depth, vit_heads, patch_size, drop_path_rate)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(vit_dim, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)  # each residual block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(self.input_norm(x))))))
        x = self.cross_scan(self.aspp(x))
        return self.features(self.fc(self.dropout(x)))


@register_backbone("crossscan_r50")
def crossscan_r50(**kwargs) -> CrossScanResNet50:
    return CrossScanResNet50(**kwargs)
