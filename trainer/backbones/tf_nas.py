"""TF-NAS-A (Hu, Wu, He, ECCV 2020), the latency-constrained searched network, as FaceX-Zoo trains it for faces.

TF-NAS searches MobileNetV2-style inverted-residual blocks (1x1 expand -> depth-wise k x k -> optional SE
-> 1x1 linear projection, residual when shape allows) with per-block expansion widths, kernel sizes and SE
widths ("three search freedoms": operation, depth, width). The searched TF-NAS-A cell list below is the
one FaceX-Zoo uses (its backbone/TF_NAS.py); for 112x112 faces FaceX-Zoo keeps the first stem at stride 1,
so the four stride-2 blocks bring 112 to 7, and replaces ImageNet's pooled classifier with
dropout -> FC(1280 x 7 x 7 -> d) -> BN1d. The first two stages use ReLU, the rest Swish (x * sigmoid x),
SE layers included; a block whose expansion width is not above its input has no expansion conv.

    stage            blocks: (expansion width, SE width, out channels, kernel, stride)
    stem             conv3x3 3->32, BN, ReLU; then (32 [no expand], 8, 16, 3, 1)
    1 (ReLU)         (83, 32, 24, 3, 2) (128, 0, 24, 5, 1)
    2 (Swish)        (138, 48, 40, 3, 2) (297, 0, 40, 3, 1) (170, 80, 40, 5, 1)
    3                (248, 80, 80, 5, 2) (500, 0, 80, 3, 1) (424, 0, 80, 3, 1) (477, 0, 80, 3, 1)
    4                (504, 160, 112, 3, 1) (796, 0, 112, 3, 1) (723, 224, 112, 3, 1) (555, 224, 112, 3, 1)
    5                (813, 0, 192, 3, 2) (1370, 0, 192, 3, 1) (1138, 384, 192, 3, 1) (1359, 384, 192, 3, 1)
    6                (1203, 384, 320, 5, 1)
    feature mix      conv1x1 320->1280, BN (no activation)

39,590,703 parameters at d=512, FaceX-Zoo's count (32.1M of them in the 62720 x 512 FC). Module names
are FaceX-Zoo's, so its weights load as they are.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from trainer.backbones import register_backbone

# (in, expansion width, SE width, out, kernel, stride) per block, stage by stage (the searched TF-NAS-A)
TF_NAS_A = {
    "second_stem": [(32, 32, 8, 16, 3, 1)],
    "stage1": [(16, 83, 32, 24, 3, 2), (24, 128, 0, 24, 5, 1)],
    "stage2": [(24, 138, 48, 40, 3, 2), (40, 297, 0, 40, 3, 1), (40, 170, 80, 40, 5, 1)],
    "stage3": [(40, 248, 80, 80, 5, 2), (80, 500, 0, 80, 3, 1), (80, 424, 0, 80, 3, 1), (80, 477, 0, 80, 3, 1)],
    "stage4": [(80, 504, 160, 112, 3, 1), (112, 796, 0, 112, 3, 1), (112, 723, 224, 112, 3, 1),
               (112, 555, 224, 112, 3, 1)],
    "stage5": [(112, 813, 0, 192, 3, 2), (192, 1370, 0, 192, 3, 1), (192, 1138, 384, 192, 3, 1),
               (192, 1359, 384, 192, 3, 1)],
    "stage6": [(192, 1203, 384, 320, 5, 1)],
}
RELU_STAGES = ("second_stem", "stage1")
FEATURE_MIX = 1280


def _act(swish: bool) -> nn.Module:
    return nn.SiLU(inplace=True) if swish else nn.ReLU(inplace=True)


class ConvBN(nn.Module):
    """conv -> BN -> optional ReLU ("same" padding), FaceX-Zoo's ConvLayer."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.act is None else self.act(x)


class MBInvertedResBlock(nn.Module):
    def __init__(self, cin: int, mid: int, se: int, cout: int, kernel: int, stride: int, swish: bool):
        super().__init__()
        self.inverted_bottleneck = None
        if mid > cin:
            self.inverted_bottleneck = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(cin, mid, 1, bias=False), bn=nn.BatchNorm2d(mid), act=_act(swish)))
        else:
            mid = cin
        self.depth_conv = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            bn=nn.BatchNorm2d(mid), act=_act(swish)))
        self.squeeze_excite = None
        if se > 0:
            self.squeeze_excite = nn.Sequential(OrderedDict(
                conv_reduce=nn.Conv2d(mid, se, 1), act=_act(swish), conv_expand=nn.Conv2d(se, mid, 1)))
        self.point_linear = nn.Sequential(OrderedDict(conv=nn.Conv2d(mid, cout, 1, bias=False),
                                                      bn=nn.BatchNorm2d(cout)))
        self.has_residual = cin == cout and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.inverted_bottleneck is None else self.inverted_bottleneck(x)
        out = self.depth_conv(out)
        if self.squeeze_excite is not None:
            out = out * torch.sigmoid(self.squeeze_excite(out.mean(dim=(2, 3), keepdim=True)))
        out = self.point_linear(out)
        return out + x if self.has_residual else out


class TFNAS(nn.Module):
    """`[B, 3, 112, 112]` -> `[B, embedding_size]`; `input_size` a multiple of 16 sets the FC's map size."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.first_stem = ConvBN(3, 32, 3)
        for name, blocks in TF_NAS_A.items():
            layers = [MBInvertedResBlock(*b, swish=name not in RELU_STAGES) for b in blocks]
            setattr(self, name, layers[0] if name == "second_stem" else nn.Sequential(*layers))
        self.feature_mix_layer = ConvBN(TF_NAS_A["stage6"][-1][3], FEATURE_MIX, 1, relu=False)
        side = input_size // 16
        self.output_layer = nn.Sequential(nn.Dropout(dropout), nn.Flatten(),
                                          nn.Linear(FEATURE_MIX * side * side, embedding_size),
                                          nn.BatchNorm1d(embedding_size))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_stem(x)
        for name in TF_NAS_A:
            x = getattr(self, name)(x)
        return self.output_layer(self.feature_mix_layer(x))


@register_backbone("tf_nas_a")
def tf_nas_a(embedding_size: int = 512, dropout: float = 0.0, **kwargs) -> TFNAS:
    """TF-NAS-A as FaceX-Zoo's table trains it (drop_ratio 0.2 there)."""
    return TFNAS(embedding_size, dropout, **kwargs)
