"""The CrossScanViT + ResNet-50 hybrid against its report (crossscanvit-resnet50.txt, section 3): the
sequential layout, SE in the bottlenecks, the four directions, the report's FeatureFusion, the patch
embedding and a position encoding for any input size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainer.backbones import build_backbone
from trainer.backbones.crossscan import (
    ASPP,
    Bottleneck,
    CrossScanViT,
    DirectionFusion,
    cross_scan,
    sinusoidal_positions,
)
from trainer.model_io.flops import count_params

# torchvision's resnet50 without its 1000-way FC: the trunk our SE-ResNet-50 adds SE gates to
RESNET50_TRUNK = 25_557_032 - (2048 * 1000 + 1000)


def small(**kwargs) -> nn.Module:
    return build_backbone("crossscan_r50", **{"vit_dim": 32, "vit_depth": 1, "vit_heads": 4, "aspp_channels": 32,
                                              **kwargs})


def test_cross_scan_directions_are_the_reports():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    d = cross_scan(x)
    assert d.shape == (2, 4, 3, 4, 4)
    rows = [m[0, 0].flatten().tolist() for m in d.unbind(1)]  # each direction read row by row
    grid = x[0, 0]
    assert rows[0] == grid.flatten().tolist()                     # row-major
    assert rows[1] == grid.flatten().flip(0).tolist()             # its reverse (flip H and W)
    assert rows[2] == grid.t().flatten().tolist()                 # column-major (transpose)
    assert rows[3] == grid.t().flatten().flip(0).tolist()         # its reverse (flip, then transpose)


def _report_feature_fusion(fusion: DirectionFusion, x_c: torch.Tensor) -> torch.Tensor:
    """The report's FeatureFusion.forward (section 3.4.3), on pooled vectors [B, 4, C], line by line."""
    b, d, c = x_c.shape
    w_c = fusion.weights(x_c)
    w_c_mean = w_c.mean(dim=2)
    _, i_max = torch.max(w_c_mean, dim=1)
    fused = torch.zeros(b, c)
    for i in range(d):
        mask = (i == i_max).float().unsqueeze(1)
        fused += mask * x_c[:, i, :] + (1 - mask) * (w_c[:, i, :] * x_c[:, i, :])
    return fused


def test_direction_fusion_is_the_reports_feature_fusion():
    torch.manual_seed(0)
    fusion = DirectionFusion(32)
    # SE on the concatenated 4C vector, reduction 16, sigmoid weights
    assert (fusion.fc1.in_features, fusion.fc1.out_features, fusion.fc2.out_features) == (128, 8, 128)
    x = torch.randn(5, 4, 32)
    w = fusion.weights(x)
    assert ((w > 0) & (w < 1)).all()
    torch.testing.assert_close(fusion(x), _report_feature_fusion(fusion, x))
    # the strongest direction (largest mean weight) enters at weight 1, the others times their weights
    fixed = torch.full((5, 4, 32), 0.2)
    fixed[:, 2] = 0.9
    fusion.weights = lambda v: fixed
    torch.testing.assert_close(fusion(x), x[:, 2] + 0.2 * (x[:, 0] + x[:, 1] + x[:, 3]))
    del fusion.weights
    out = fusion(x)
    out.sum().backward()
    assert fusion.fc1.weight.grad.abs().sum() > 0


def test_layout_is_sequential_aspp_feeds_the_cross_scan_vit():
    model = small().eval()
    seen = {}
    model.aspp.register_forward_hook(lambda m, i, o: seen.__setitem__("aspp", o))
    model.cross_scan.register_forward_hook(lambda m, i, o: seen.__setitem__("vit_in", i[0]))
    model.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("layer4", o))
    with torch.no_grad():
        model(torch.randn(2, 3, 112, 112))
    assert seen["vit_in"] is seen["aspp"]
    assert seen["layer4"].shape == (2, 2048, 14, 14)  # dilated layer3/4: stride 8
    assert model.fc.in_features == 32  # the embedding is made from the fused ViT vector alone
    dilations = {m.dilation for m in model.aspp.branches}
    assert dilations == {(1, 1), (3, 3), (5, 5), (7, 7)} and isinstance(model.aspp, ASPP)


def test_se_in_every_bottleneck_and_resnet50_trunk():
    with torch.device("meta"):
        model = build_backbone("crossscan_r50")
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 3 + 4 + 6 + 3
    se_params = 0
    for b in blocks:
        c = b.conv3.out_channels
        assert (b.se.fc1.in_channels, b.se.fc1.out_channels) == (c, c // 16)
        se_params += count_params(b.se)
    trunk = sum(count_params(getattr(model, n)) for n in ("stem", "layer1", "layer2", "layer3", "layer4"))
    assert trunk - se_params == RESNET50_TRUNK


def test_patch_embedding_is_a_conv_with_kernel_equal_stride():
    for patch in (1, 2, 7):
        vit = CrossScanViT(16, 32, depth=1, heads=4, patch_size=patch)
        conv = vit.patch_embed.proj
        assert conv.kernel_size == (patch, patch) and conv.stride == (patch, patch)
        assert vit.patch_embed(torch.randn(1, 16, 14, 14)).shape == (1, (14 // patch) ** 2, 32)


def test_any_input_size():
    torch.manual_seed(0)
    model = small().eval()
    with torch.no_grad():
        for side in (64, 112, 224):  # faces, and the report's 224x224 crops
            assert model(torch.randn(2, 3, side, side)).shape == (2, 512)
    assert not any("pos" in name for name, _ in model.named_parameters())  # nothing sized by the input
    with pytest.raises(ValueError, match="square"):
        model.cross_scan(torch.randn(1, 32, 14, 12))


def test_sinusoidal_positions():
    enc = sinusoidal_positions(196, 32)
    assert enc.shape == (196, 32)
    torch.testing.assert_close(sinusoidal_positions(49, 32), enc[:49])  # a prefix: same code per position
    assert torch.allclose(enc[:, 0], torch.sin(torch.arange(196.0)))
    assert torch.allclose(enc[:, 1], torch.cos(torch.arange(196.0)))
    assert len({tuple(r) for r in enc.round(decimals=4).tolist()}) == 196  # every position distinct


def test_trains():
    torch.manual_seed(0)
    model = small(dropout=0.1).train()
    y = model(torch.randn(4, 3, 64, 64))
    y.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_imagenet_input_norm_is_the_reports_normalisation_inside_the_network():
    """crossscan_r50 (input_norm="imagenet", as its config sets it) on the readers' [-1, 1] pixels equals
    the same weights on ImageNet mean/std-normalised pixels, the report's input."""
    from trainer.backbones.input_norm import build_input_norm

    torch.manual_seed(0)
    normed = small(input_norm="imagenet").eval()
    plain = small().eval()
    plain.load_state_dict(normed.state_dict())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(normed(x), plain(((x + 1) / 2 - mean) / std), atol=1e-5)
        assert torch.allclose(build_input_norm("imagenet")(x), ((x + 1) / 2 - mean) / std, atol=1e-6)
