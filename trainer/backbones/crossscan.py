"""The CrossScanViT + ResNet-50 hybrid of the masked-face competition report.

    image 112x112
      -> bottleneck ResNet-50: stem (7x7/2, max-pool/2) 28x28, layer1 28x28, layer2 14x14 (stride 8),
         layer3 and layer4 dilated (2, 4) instead of strided, so they stay at 14x14
      -> ASPP on layer4: 1x1 | 3x3 dil 3 | 3x3 dil 5 | 3x3 dil 7 | global pool, concat, 1x1, BN, ReLU
      -> CrossScanViT on layer2 (the mid-level map): 1x1 projection to tokens, the token grid read in four
         orders (row-major, row-major reversed, column-major, column-major reversed), one shared
         pre-norm transformer over all four sequences, each put back on the grid, and the four maps fused
         by SE-driven per-channel direction weights (softmax over the four directions)
      -> concat(ASPP, CrossScanViT) -> SE channel attention -> 3x3/2 conv to 7x7 -> BN, dropout, FC, BN

Reading the grid in four orders gives the transformer's position embeddings four different notions of
"next token", so the fused map sees the face along rows and columns in both directions; the direction
fusion lets each channel choose which reading it trusts (masks hide the lower rows, for example).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone
from .ressanet import FaceEmbeddingHead, SqueezeExcite
from .vit import Block


class Bottleneck(nn.Module):
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
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
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


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int = 256, dilations=(3, 5, 7)):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)] +
                                      [_conv_bn_relu(cin, cout, 3, d) for d in dilations])
        self.pool = _conv_bn_relu(cin, cout, 1)
        self.project = _conv_bn_relu(cout * (len(dilations) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        # The pooled branch is computed on the 1x1 map and broadcast back: image-level context.
        outs.append(self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


class DirectionFusion(nn.Module):
    """SE-style fusion of the four scan directions: squeeze their sum, excite one weight per direction and
    channel, softmax across directions, weighted sum."""

    def __init__(self, channels: int, directions: int = 4, reduction: float = 0.25):
        super().__init__()
        hidden = max(8, int(channels * reduction))
        self.directions = directions
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.excite = nn.Linear(hidden, channels * directions)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # maps: [directions, B, C, H, W]
        d, b, c = maps.shape[:3]
        s = maps.sum(0).mean(dim=(2, 3))
        weights = self.excite(self.squeeze(s)).reshape(b, d, c).softmax(dim=1)
        return torch.einsum("dbchw,bdc->bchw", maps, weights.to(maps.dtype))


class CrossScanViT(nn.Module):
    def __init__(self, cin: int, dim: int, size: int, depth: int = 4, heads: int = 8, drop_path_rate: float = 0.0):
        super().__init__()
        self.size = size
        self.proj = nn.Sequential(nn.Conv2d(cin, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, size * size, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.Sequential(*(Block(dim, heads, 4.0, r) for r in rates))
        self.norm = nn.LayerNorm(dim)
        self.fusion = DirectionFusion(dim)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def scan(x: torch.Tensor) -> List[torch.Tensor]:
        """[B, C, H, W] -> four token sequences [B, HW, C]: rows, rows reversed, columns, columns reversed."""
        rows = x.flatten(2).transpose(1, 2)
        cols = x.transpose(2, 3).flatten(2).transpose(1, 2)
        return [rows, rows.flip(1), cols, cols.flip(1)]

    @staticmethod
    def unscan(seqs: List[torch.Tensor], h: int, w: int) -> torch.Tensor:
        """Inverse of `scan`: four [B, HW, C] sequences -> [4, B, C, H, W] maps on the original grid."""
        rows, rows_rev, cols, cols_rev = seqs
        b, _, c = rows.shape
        as_rows = lambda s: s.transpose(1, 2).reshape(b, c, h, w)  # noqa: E731
        as_cols = lambda s: s.transpose(1, 2).reshape(b, c, w, h).transpose(2, 3)  # noqa: E731
        return torch.stack([as_rows(rows), as_rows(rows_rev.flip(1)), as_cols(cols), as_cols(cols_rev.flip(1))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        b, c, h, w = x.shape
        if (h, w) != (self.size, self.size):
            raise ValueError(f"CrossScanViT was built for a {self.size}x{self.size} map, got {h}x{w}")
        # The four directions share the encoder, so they run as one batch of 4B sequences.
        tokens = torch.cat(self.scan(x), dim=0) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        maps = self.unscan(list(tokens.chunk(4, dim=0)), h, w)
        return self.fusion(maps)


class CrossScanResNet50(nn.Module):
    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                 vit_dim: int = 256, vit_depth: int = 4, vit_heads: int = 8, aspp_channels: int = 256,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        self.layer1 = _layer(64, 64, 3, stride=1, dilation=1, first_dilation=1)
        self.layer2 = _layer(256, 128, 4, stride=2, dilation=1, first_dilation=1)
        self.layer3 = _layer(512, 256, 6, stride=1, dilation=2, first_dilation=1)
        self.layer4 = _layer(1024, 512, 3, stride=1, dilation=4, first_dilation=2)
        mid = input_size // 8
        self.aspp = ASPP(2048, aspp_channels)
        self.cross_scan = CrossScanViT(512, vit_dim, mid, vit_depth, vit_heads, drop_path_rate)
        fused = aspp_channels + vit_dim
        self.se = SqueezeExcite(fused, 0.25)
        self.reduce = nn.Sequential(nn.Conv2d(fused, 512, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(512),
                                    nn.PReLU(512))
        out = (mid + 1) // 2
        self.head = FaceEmbeddingHead(512, (out, out), embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)  # each residual block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        mid = self.layer2(x)
        deep = self.layer4(self.layer3(mid))
        x = torch.cat([self.aspp(deep), self.cross_scan(mid)], dim=1)
        return self.head(self.reduce(self.se(x)))


@register_backbone("crossscan_r50")
def crossscan_r50(**kwargs) -> CrossScanResNet50:
    return CrossScanResNet50(**kwargs)
