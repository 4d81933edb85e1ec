"""ResSaNet (Chang, Tsai, Lo, ICCVW 2021): IResNet with SE-IBasic.F blocks and IBasic Transformer blocks.

The network is insightface's IResNet (3x3 stem at full resolution, four stages that each halve the map,
BN -> dropout -> FC -> BN embedding head) with its blocks swapped per stage:

| stage | channels | ResSaNet-50 | ResSaNet-100 | block                                                   |
|-------|----------|-------------|--------------|---------------------------------------------------------|
| 1     | 64       | 3           | 3            | IBasic                                                  |
| 2     | 128      | 4           | 13           | SE-IBasic.F: SE (reduction 0.25) and FReLU activation   |
| 3     | 256      | 14          | 30           | SE-IBasic.F                                             |
| 4     | 512      | 3           | 3            | IBasic Transformer (IBT): MHSA + MBConv feed-forward    |

An IBasic block is BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut. IBT replaces its
second 3x3 conv with 4-head self-attention whose logits are q k^T + q r^T (r: 2-D relative position
embeddings, as in BoTNet), keeps the BNs and the PReLU, and follows the block with an MBConv feed-forward
(1x1 expand, depth-wise 3x3, 1x1 project, residual). IBSA is the same block without the feed-forward.

Details the paper leaves open, chosen so that the sizes land on its table (ResSaNet-50: 44.13M params,
6.29 GMACs; ResSaNet-100: 66.35M, 12.11 GMACs at 112x112, 512-d embedding):
- The attention takes the place of the *second* conv (the one that carries the stride), and in the
  first, strided block of the stage the map is 2x2 average-pooled *before* the attention (BoTNet pools
  after it), so attention always runs on the 7x7 map. Pooling after would give ResSaNet-50 6.51 GMACs,
  3.5% over the paper; pooling before gives 6.34 (+0.7%), and ResSaNet-100 12.13 (+0.2%).
- The MBConv feed-forward expands 3x; with it an IBT block has almost exactly the parameters of the
  IBasic block it replaces (44.21M / 66.43M in all, +0.2% / +0.1%), which is what the paper's table says:
  its +0.54M over IResNet-50 is exactly what SE + FReLU in stages 2-3 add.
- The SE bottleneck uses ReLU and a sigmoid gate (SENet); FReLU's spatial condition is depth-wise
  3x3 conv + BN (its paper's default).

Why ours has more multiply-adds than IResNet-50 (6.34G against 6.31G) where the paper has fewer (6.29G):
measured, not guessed (tests/test_ressanet_ablations.py checks each term to the multiply-add):
- ResSaNet-50 minus IResNet-50 is +27.59M MACs = FReLU's depth-wise convs in stages 2-3 (+14.00M; they run at
  the first conv's resolution, 56x56 in the first block of stage 2) + SE (+0.49M) + three IBT blocks at
  +4.37M each (q/k/v 1x1 convs +38.5M, attention and relative-position products +3.7M, MBConv FFN +77.8M,
  against the 3x3 conv they replace, -115.6M).
- The paper's parameter column fixes the stage-4 swap as parameter-neutral: its ResSaNet-minus-IResNet
  differences (+0.56M, +1.19M) are exactly what SE + FReLU add in stages 2-3 (0.54M, 1.19M). Every weight
  IBT adds is a 1x1 or depth-wise conv on the same 7x7 map as the conv it removes (49 MACs per weight),
  so a parameter-neutral swap is also MAC-neutral, and FReLU's depth-wise convs only add. The paper's
  -0.02G would need 35-50M fewer MACs in stage 4, i.e. 0.7-1.0M fewer weights there, which its own
  parameter column rules out; we found no layout of the blocks it describes that gives both numbers.
- The paper's own column mixes counters: 6.31G for IResNet-50 is a conv + FC count (ours: 6.309G), while
  12.12G for IResNet-100 is ptflops's (insightface's flops.py tool; ptflops 0.6.6 gives 12.122G, and 6.330G
  for IResNet-50; ours: 12.090G). Under ptflops ResSaNet-50 / -100 are 6.350G / 12.160G, also above.
So we keep the layout that matches the parameter counts (+0.2% / +0.1%) and report the MACs as counted.

The ablation rows of the paper's Tables 2-4 (SE per stage, SE with IBSA in stage 4, IBSA per stage and per
block position) are `ressanet50_ablation` with network_kwargs {"row": NAME} (ABLATION_ROWS), trained with
the masked-face recipe: `--config ressanet_masked network=ressanet50_ablation 'network_kwargs={"row": ...}'`.
"""
from __future__ import annotations

from itertools import chain
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone
from ._blocks import run_blocks
from .iresnet import STAGE_WIDTHS, IBasicBlock

BN_EPS = 1e-5  # insightface's IResNet value


class FaceEmbeddingHead(nn.Module):
    """IResNet's output layer: BN2d -> dropout -> flatten -> FC -> BN1d (scale frozen at 1).

    Freezing the last BN's scale keeps the embedding's norm from being learnt away, as insightface does.
    """

    def __init__(self, channels: int, spatial: Tuple[int, int], embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * spatial[0] * spatial[1], embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn(x))
        # flatten(1) of a channels_last tensor still orders features C, H, W, so both layouts agree.
        x = self.fc(x.flatten(1))
        return self.features(x)


class SqueezeExcite(nn.Module):
    """Channel gate: global pool -> 1x1 (C -> C*reduction) -> ReLU -> 1x1 -> sigmoid -> rescale."""

    def __init__(self, channels: int, reduction: float = 0.25):
        super().__init__()
        hidden = max(1, int(round(channels * reduction)))
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.expand(F.relu(self.reduce(s), inplace=True))
        return x * torch.sigmoid(s)


class FReLU(nn.Module):
    """Funnel activation: max(x, T(x)) with T a depth-wise 3x3 conv + BN (Ma et al., 2020)."""

    def __init__(self, channels: int):
        super().__init__()
        self.spatial = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.bn(self.spatial(x)))


class SEIBasicBlock(IBasicBlock):
    """SE-IBasic.F: the IBasic block with an SE gate on its residual branch and FReLU for its PReLU
    (each optional, for the ablation placements)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, se: bool = True, frelu: bool = True,
                 se_reduction: float = 0.25):
        super().__init__(in_ch, out_ch, stride)
        if frelu:
            self.prelu = FReLU(out_ch)
        self.se = SqueezeExcite(out_ch, se_reduction) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.se is not None:
            out = self.se(out)
        return out + (x if self.downsample is None else self.downsample(x))


class RelPosSelfAttention(nn.Module):
    """Multi-head self-attention over a fixed-size map with BoTNet's 2-D relative position logits.

    logits[q, k] = (q . k + q . (r_h[row(k) - row(q)] + r_w[col(k) - col(q)])) / sqrt(d_head); the
    relative term enters scaled_dot_product_attention as an additive bias, so the fused kernel is kept.
    """

    def __init__(self, dim: int, size: Tuple[int, int], heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.size = heads, tuple(size)
        self.head_dim = dim // heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        h, w = self.size
        self.rel_h = nn.Parameter(torch.randn(2 * h - 1, self.head_dim) * self.head_dim ** -0.5)
        self.rel_w = nn.Parameter(torch.randn(2 * w - 1, self.head_dim) * self.head_dim ** -0.5)
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        self.register_buffer("idx_h", (rows[None, :] - rows[:, None] + h - 1), persistent=False)
        self.register_buffer("idx_w", (cols[None, :] - cols[:, None] + w - 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != self.size:
            raise ValueError(f"relative-position attention was built for a {self.size} map, got {(h, w)}; "
                             f"build the backbone with the input size you feed it")
        qkv = self.qkv(x).reshape(b, 3, self.heads, self.head_dim, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(1)  # each [B, heads, HW, head_dim]
        rel = self.rel_h[self.idx_h] + self.rel_w[self.idx_w]  # [HW(q), HW(k), head_dim]
        bias = torch.einsum("bnqd,qkd->bnqk", q, rel.to(q.dtype)) * self.head_dim ** -0.5
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(-1, -2).reshape(b, c, h, w)


class MBConvFFN(nn.Module):
    """MBConv used as a transformer feed-forward: 1x1 expand -> depth-wise 3x3 -> 1x1 project, residual."""

    def __init__(self, channels: int, expansion: float = 3.0):
        super().__init__()
        hidden = int(round(channels * expansion))
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden, eps=BN_EPS), nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, eps=BN_EPS), nn.PReLU(hidden),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels, eps=BN_EPS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class IBasicTransformerBlock(IBasicBlock):
    """IBT (ffn_expansion > 0) or IBSA (ffn_expansion == 0): the IBasic block whose strided 3x3 conv is
    replaced by (2x2 average pool when strided, then) relative-position MHSA; BN and PReLU stay. `se`:
    an SE gate on the residual branch as in SE-IBasic (Table 3's SE in stage 4 with IBSA)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, out_size: Tuple[int, int], heads: int = 4,
                 ffn_expansion: float = 3.0, se: bool = False, se_reduction: float = 0.25):
        super().__init__(in_ch, out_ch, stride)
        pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv2 = nn.Sequential(pool, RelPosSelfAttention(out_ch, out_size, heads))
        self.se = SqueezeExcite(out_ch, se_reduction) if se else None
        self.ffn = MBConvFFN(out_ch, ffn_expansion) if ffn_expansion > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.se is not None:
            out = self.se(out)
        out = out + (x if self.downsample is None else self.downsample(x))
        return out if self.ffn is None else self.ffn(out)


BLOCK_KINDS = ("ibasic", "se", "f", "se_f", "ibt", "ibsa", "ibt_se", "ibsa_se")


class ResSaNet(nn.Module):
    """IResNet skeleton whose four stages use the blocks named in `stage_blocks`: per stage either one
    kind for all its blocks or a list of kinds, one per block position. Kinds: "ibasic", "se" (SE only),
    "f" (FReLU only), "se_f", "ibt", "ibsa", and "ibt_se" / "ibsa_se" (attention block with an SE gate).
    The ablation tables' rows are in ABLATION_ROWS."""

    def __init__(self, layers: Sequence[int],
                 stage_blocks: Sequence[Union[str, Sequence[str]]] = ("ibasic", "se_f", "se_f", "ibt"),
                 embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112, heads: int = 4,
                 ffn_expansion: float = 3.0, se_reduction: float = 0.25, grad_checkpoint: bool = False):
        super().__init__()
        if len(layers) != 4 or len(stage_blocks) != 4:
            raise ValueError("ResSaNet needs four stages: layers and stage_blocks of length 4")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.grad_checkpoint = grad_checkpoint
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        stages, in_ch, size = [], STAGE_WIDTHS[0], input_size
        for depth, width, kinds in zip(layers, STAGE_WIDTHS, stage_blocks):
            size //= 2
            if isinstance(kinds, str):
                kinds = [kinds] * depth
            if len(kinds) != depth:
                raise ValueError(f"a stage of {depth} blocks got {len(kinds)} block kinds: {list(kinds)}")
            blocks = []
            for i, kind in enumerate(kinds):
                blocks.append(_block(kind, in_ch, width, 2 if i == 0 else 1, (size, size), heads, ffn_expansion,
                                     se_reduction))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = FaceEmbeddingHead(in_ch, (size, size), embedding_size, dropout)
        # IResNet's init for its own convs; attention, SE, FReLU and MBConv keep PyTorch's fan-in scaled
        # defaults (N(0, 0.1) on 512-wide q/k projections would saturate the softmax from step one).
        own = {id(c) for m in self.modules() if isinstance(m, (RelPosSelfAttention, SqueezeExcite, FReLU, MBConvFFN))
               for c in m.modules()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in own:
                nn.init.normal_(m.weight, 0, 0.1)
        # Every residual branch starts at zero, so each block starts as the identity: with self-attention
        # and FReLU branches this keeps the first steps of a 100-layer net stable.
        for m in self.modules():
            if isinstance(m, IBasicBlock):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, MBConvFFN):
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return self.head(run_blocks(chain(*stages), x, self.grad_checkpoint and self.training))


def _block(kind: str, in_ch: int, out_ch: int, stride: int, out_size: Tuple[int, int], heads: int,
           ffn_expansion: float, se_reduction: float) -> nn.Module:
    if kind == "ibasic":
        return IBasicBlock(in_ch, out_ch, stride)
    if kind in ("se", "f", "se_f"):
        return SEIBasicBlock(in_ch, out_ch, stride, se=kind != "f", frelu=kind != "se", se_reduction=se_reduction)
    if kind in ("ibt", "ibsa", "ibt_se", "ibsa_se"):
        return IBasicTransformerBlock(in_ch, out_ch, stride, out_size, heads,
                                      ffn_expansion if kind.startswith("ibt") else 0.0, se=kind.endswith("_se"),
                                      se_reduction=se_reduction)
    raise ValueError(f"unknown ResSaNet block kind {kind!r}; one of {', '.join(BLOCK_KINDS)}")


@register_backbone("ressanet50")
def ressanet50(**kwargs) -> ResSaNet:
    return ResSaNet([3, 4, 14, 3], **kwargs)


@register_backbone("ressanet100")
def ressanet100(**kwargs) -> ResSaNet:
    return ResSaNet([3, 13, 30, 3], **kwargs)


@register_backbone("ressanet50_ibsa")
def ressanet50_ibsa(**kwargs) -> ResSaNet:
    return ResSaNet([3, 4, 14, 3], stage_blocks=("ibasic", "se_f", "se_f", "ibsa"), **kwargs)


@register_backbone("ressanet100_ibsa")
def ressanet100_ibsa(**kwargs) -> ResSaNet:
    return ResSaNet([3, 13, 30, 3], stage_blocks=("ibasic", "se_f", "se_f", "ibsa"), **kwargs)


# The paper's ablation rows on ResSaNet-50 ((units per stage), stage_blocks). FReLU sits in stages 2-3 as in
# ResSaNet; "R50_FReLU" is that without SE. Table 3 moves SE on R50_FReLU_IBSA; Table 4 moves IBSA on
# R50_FReLU: six IBSA blocks in stage 4, or the last two blocks of stage 3 as IBSA too.
_R50 = (3, 4, 14, 3)
ABLATION_ROWS = {
    # Table 2: R50 + IBSA, + FReLU (+ masked data: same network), + SE (= ResSaNet-50-IBSA)
    "t2_ibsa": (_R50, ("ibasic", "ibasic", "ibasic", "ibsa")),
    "t2_ibsa_frelu": (_R50, ("ibasic", "f", "f", "ibsa")),
    "t2_ibsa_frelu_se": (_R50, ("ibasic", "se_f", "se_f", "ibsa")),
    # Table 3: SE position on R50_FReLU_IBSA
    "t3_se_none": (_R50, ("ibasic", "f", "f", "ibsa")),
    "t3_se_2_3": (_R50, ("ibasic", "se_f", "se_f", "ibsa")),
    "t3_se_1_2_3": (_R50, ("se", "se_f", "se_f", "ibsa")),
    "t3_se_2_3_4": (_R50, ("ibasic", "se_f", "se_f", "ibsa_se")),
    # Table 4: IBSA position on R50_FReLU
    "t4_ibsa_s4x3": (_R50, ("ibasic", "f", "f", "ibsa")),
    "t4_ibsa_s4x6": ((3, 4, 14, 6), ("ibasic", "f", "f", "ibsa")),
    "t4_ibsa_s3x2_s4x3": (_R50, ("ibasic", "f", ("f",) * 12 + ("ibsa",) * 2, "ibsa")),
}


@register_backbone("ressanet50_ablation")
def ressanet50_ablation(row: str = "t3_se_2_3", **kwargs) -> ResSaNet:
    """One row of the paper's Tables 2-4 by name (ABLATION_ROWS), e.g. network_kwargs={"row": "t3_se_2_3_4"}."""
    if row not in ABLATION_ROWS:
        raise ValueError(f"unknown ResSaNet ablation row {row!r}; known: {', '.join(ABLATION_ROWS)}")
    layers, stage_blocks = ABLATION_ROWS[row]
    return ResSaNet(list(layers), stage_blocks=stage_blocks, **kwargs)
