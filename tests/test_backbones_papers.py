"""The papers' backbones (ResSaNet, LVFace's ViT, CrossScanViT hybrid, LightCNN, AttentionNet, the timm
zoo): sizes against the papers, forward + backward at 112x112, AMP / channels_last, and the FLOP counter."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from trainer.backbones import available_backbones, build_backbone
from trainer.backbones.ressanet import RelPosSelfAttention, ResSaNet
from trainer.backbones.timm_adapter import FACEX_ZOO_TIMM, TimmUnavailable, import_timm, timm_available
from trainer.backbones.vit import FaceViT
from trainer.model_io.flops import count_flops, count_gmacs, count_params

OWN = ["ressanet50", "ressanet100", "ressanet50_ibsa", "ressanet100_ibsa", "vit_t", "vit_s", "vit_b", "vit_l",
       "crossscan_r50", "lightcnn9", "lightcnn29", "lightcnn29_v2", "attention56", "attention92"]
TIMM = sorted(FACEX_ZOO_TIMM)
# Forward + backward with real numbers at 112x112 for one network of each block design; the others (deeper or
# wider twins, and timm's models, whose code timm tests) run the exact same pass on the meta device: every
# shape and every parameter's gradient of the full-size network, without the minutes of CPU arithmetic.
REAL = ["ressanet50", "vit_t", "crossscan_r50", "lightcnn9", "lightcnn29", "lightcnn29_v2", "attention56"]
REAL_TIMM = ["efficientnet_b0", "ghostnet_100", "repvgg_a0"]
needs_timm = pytest.mark.skipif(not timm_available(), reason="timm is not installed (see scripts/setup.sh)")


def on_meta(name: str, **kwargs) -> nn.Module:
    """Build without allocating or initialising weights: sizes and FLOPs of big models in milliseconds."""
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


@pytest.fixture(scope="module")
def faces(glint24) -> torch.Tensor:
    """Two real aligned faces of different people, normalised as the loader does."""
    people = sorted(p for p in glint24.iterdir() if p.is_dir())[:2]
    imgs = [np.asarray(Image.open(sorted(p.glob("*.png"))[0]).convert("RGB"), dtype=np.float32) for p in people]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    assert x.shape == (2, 3, 112, 112)
    # contiguous NCHW, as the loader yields (channels_last input is tested on its own below)
    return ((x - 127.5) / 127.5).contiguous()


def test_every_backbone_is_registered():
    names = set(available_backbones())
    assert set(OWN) <= names
    assert set(TIMM) | {"timm"} <= names


# --- sizes against the papers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,params_m,gmacs", [
    ("ressanet50", 44.13, 6.29),     # ResSaNet paper, table of backbones
    ("ressanet100", 66.35, 12.11),
])
def test_ressanet_size_matches_paper(name, params_m, gmacs):
    model = on_meta(name)
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.02)
    assert count_gmacs(model) == pytest.approx(gmacs, rel=0.02)


def test_ressanet_skeleton_is_iresnet():
    # With plain IBasic blocks everywhere the network must be IResNet-50 itself, parameter for parameter.
    with torch.device("meta"):
        plain = ResSaNet([3, 4, 14, 3], stage_blocks=("ibasic",) * 4)
    assert count_params(plain) == count_params(on_meta("r50"))
    assert count_gmacs(plain) == pytest.approx(count_gmacs(on_meta("r50")), rel=1e-6)


def test_ressanet_ablation_placements_change_the_blocks():
    # SE-IBasic.F adds exactly SE (2 x C x C/4 + biases) and FReLU (dw 3x3 + BN) per block of stages 2-3.
    with torch.device("meta"):
        base = ResSaNet([3, 4, 14, 3], stage_blocks=("ibasic",) * 4)
        sef = ResSaNet([3, 4, 14, 3], stage_blocks=("ibasic", "se_f", "se_f", "ibasic"))
        ibsa = ResSaNet([3, 4, 14, 3], stage_blocks=("ibasic", "se_f", "se_f", "ibsa"))
        ibt = ResSaNet([3, 4, 14, 3])
    se = lambda c: c * (c // 4) * 2 + c // 4 + c  # noqa: E731
    frelu_minus_prelu = lambda c: c * 9 + 2 * c - c  # noqa: E731
    extra = 4 * (se(128) + frelu_minus_prelu(128)) + 14 * (se(256) + frelu_minus_prelu(256))
    assert count_params(sef) - count_params(base) == extra
    # IBSA swaps each stage-4 strided 3x3 conv (512x512x9) for q/k/v 1x1 convs + relative embeddings.
    rel = (13 + 13) * 128
    assert count_params(sef) - count_params(ibsa) == 3 * (512 * 512 * 9 - 3 * 512 * 512 - rel)
    assert count_params(ibt) > count_params(ibsa)
    with pytest.raises(ValueError, match="unknown ResSaNet block"):
        ResSaNet([1, 1, 1, 1], stage_blocks=("ibasic", "se_f", "nope", "ibt"))


def test_vit_b_flops_match_insightface_config():
    assert count_gmacs(on_meta("vit_b")) == pytest.approx(11.4, rel=0.01)
    # Each size is the insightface configuration: width x depth.
    for name, width, depth in [("vit_t", 256, 12), ("vit_s", 512, 12), ("vit_b", 512, 24), ("vit_l", 768, 24)]:
        model = on_meta(name)
        assert (model.embed_dim, len(model.blocks), model.num_patches) == (width, depth, 144)


@pytest.mark.parametrize("name,params_m,gmacs,rel", [
    ("attention56", 31.9, 6.3, 0.01),   # Residual Attention Network paper, ImageNet 224x224, 1000 classes
    ("attention92", 51.3, 10.4, 0.025),  # ours has 2.3% more parameters: mask-branch details the paper omits
])
def test_attentionnet_size_matches_paper_in_imagenet_setting(name, params_m, gmacs, rel):
    model = on_meta(name, input_size=224, imagenet_stem=True)
    trunk = count_params(model) - count_params(model.head)
    classifier = 2048 * 1000 + 1000

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net.forward_features(x)

    macs = count_flops(Trunk(), (1, 3, 224, 224)) / 2 + 2048 * 1000
    assert (trunk + classifier) / 1e6 == pytest.approx(params_m, rel=rel)
    assert macs / 1e9 == pytest.approx(gmacs, rel=rel)


def _lightcnn_released_params(res_blocks, v2: bool) -> int:
    """Parameters of the authors' released LightCNN definitions (1x128x128 grey input, 256-d feature),
    summed from their layer list rather than from our modules."""
    mfm = lambda cin, cout, k: 2 * cout * (cin * k * k + 1)  # noqa: E731
    total = mfm(1, 48, 5)
    widths = (48, 96, 192, 128, 128)
    for n, cin, cout in zip(res_blocks, widths[:-1], widths[1:]):
        total += n * 2 * mfm(cin, cin, 3) + mfm(cin, cin, 1) + mfm(cin, cout, 3)
    flat = 8 * 8 * 128
    return total + ((flat + 1) * 256 if v2 else mfm(flat, 256, 1))


@pytest.mark.parametrize("name,res_blocks,v2", [
    ("lightcnn9", (0, 0, 0, 0), False), ("lightcnn29", (1, 2, 3, 4), False), ("lightcnn29_v2", (1, 2, 3, 4), True)])
def test_lightcnn_matches_released_architecture(name, res_blocks, v2):
    paper_setting = on_meta(name, in_channels=1, input_size=128, embedding_size=256)
    assert count_params(paper_setting) == _lightcnn_released_params(res_blocks, v2)
    face = on_meta(name)
    assert face.fc(torch.zeros(1, 128 * 7 * 7, device="meta")).shape == (1, 512)


# --- forward and backward at 112x112 ---------------------------------------------------------------------

def _forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    y = model(x)
    assert y.shape == (x.shape[0], 512)
    assert torch.isfinite(y).all()
    # A fixed random projection, not y.sum(): the closing BatchNorm1d makes the sum's gradient zero.
    y.mul(torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    # DDP (no find_unused_parameters) needs a gradient for every trainable parameter on every step.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return y


@pytest.mark.parametrize("name", REAL)
def test_forward_backward(name, faces):
    torch.manual_seed(0)
    _forward_backward(build_backbone(name), faces)


@needs_timm
@pytest.mark.parametrize("name", REAL_TIMM)
def test_timm_forward_backward(name, faces):
    torch.manual_seed(0)
    model = build_backbone(name)
    assert not any(p.is_meta for p in model.parameters())
    _forward_backward(model, faces)


@pytest.mark.parametrize("name", [n for n in OWN if n not in REAL] +
                         [pytest.param(n, marks=needs_timm) for n in TIMM if n not in REAL_TIMM])
def test_forward_backward_full_size_on_meta(name):
    model = on_meta(name).train()
    y = model(torch.zeros(2, 3, 112, 112, device="meta"))
    assert y.shape == (2, 512)
    y.mul(torch.ones(y.shape, device="meta")).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@needs_timm
def test_timm_generic_adapter_and_map_sizes():
    model = build_backbone("timm", model_name="resnet18", embedding_size=128, dropout=0.1)
    assert model.head.fc.in_features == 512 * 4 * 4  # stride 32: 112 -> 4 (rounded up)
    assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 128)
    assert on_meta("seresnet50").head.fc.in_features == 2048 * 7 * 7  # dilated last stage
    assert on_meta("hrnet_w18").head.fc.in_features == 2048 * 4 * 4   # whole trunk, run at 128x128


def test_missing_timm_is_a_clear_error(monkeypatch):
    import importlib.util
    import sys

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "timm" else real(n, *a))
    with pytest.raises(TimmUnavailable, match="pip install --no-deps"):
        import_timm()
    with pytest.raises(TimmUnavailable):
        build_backbone("efficientnet_b0")


# --- mixed precision and channels_last ---------------------------------------------------------------------

# A small instance of every backbone with the same block types and options (masking, checkpointing, IBSA...):
# on a CPU without native bf16, PyTorch runs bf16 convolutions (depth-wise and dilated ones above all)
# through slow reference kernels, minutes for the full-size networks. The convolutional ones run at 48x48.
IBSA = ("ibasic", "se_f", "se_f", "ibsa")


def _small(name: str, **kwargs):
    return lambda: build_backbone(name, **kwargs)


SMALL = {
    "ressanet50": lambda: ResSaNet([1, 1, 1, 1], input_size=48),
    "ressanet100": lambda: ResSaNet([1, 1, 1, 1], input_size=48),
    "ressanet50_ibsa": lambda: ResSaNet([1, 1, 1, 1], stage_blocks=IBSA, input_size=48),
    "ressanet100_ibsa": lambda: ResSaNet([1, 1, 1, 1], stage_blocks=IBSA, input_size=48),
    **{n: _small(n, embed_dim=64, depth=2, heads=4) for n in ("vit_t", "vit_s", "vit_b", "vit_l")},
    "crossscan_r50": _small("crossscan_r50", vit_dim=32, vit_depth=1, vit_heads=4, aspp_channels=32),
    **{n: _small(n, input_size=48) for n in ("lightcnn9", "lightcnn29", "lightcnn29_v2", "attention56",
                                             "attention92")},
}
INPUT_SIZE = {n: 48 for n in SMALL if not n.startswith("vit")}  # 48x48: a fifth of the arithmetic of 112x112


def test_every_backbone_has_a_mixed_precision_test():
    assert set(SMALL) == set(OWN)


@pytest.mark.parametrize("name", OWN + [pytest.param(n, marks=needs_timm) for n in TIMM])
def test_bf16_autocast_and_channels_last(name, faces):
    """Inference: channels_last gives the fp32 result, bf16 autocast a close one in bf16. Our own networks
    (the timm ones are timm's code) also take a bf16 training step, masking and checkpointing included."""
    torch.manual_seed(0)
    model = (SMALL[name]() if name in SMALL else build_backbone(name)).eval()
    side = INPUT_SIZE.get(name, 112)
    x = faces if side == 112 else F.interpolate(faces, size=(side, side), mode="bilinear",
                                                align_corners=False)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        same = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    # relative to the whole output: fresh pre-activation nets (AttentionNet) give outputs in the thousands
    assert (same - ref).norm() / ref.norm() < 1e-4
    assert low.dtype == torch.bfloat16 and low.shape == (2, 512)
    assert F.cosine_similarity(low.float(), ref).min() > 0.98
    if name in SMALL:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().mul(torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --- the parts that carry the papers' ideas -----------------------------------------------------------------

def test_relative_position_attention_equals_botnet_formula():
    torch.manual_seed(0)
    h, w, heads, dim = 3, 4, 2, 8
    attn = RelPosSelfAttention(dim, (h, w), heads).eval()
    x = torch.randn(2, dim, h, w)
    q, k, v = attn.qkv(x).reshape(2, 3, heads, dim // heads, h * w).unbind(1)  # [B, heads, d, HW]
    d = dim // heads
    out = torch.zeros(2, heads, d, h * w)
    for b in range(2):
        for n in range(heads):
            for i in range(h * w):
                logits = []
                for j in range(h * w):
                    r = attn.rel_h[j // w - i // w + h - 1] + attn.rel_w[j % w - i % w + w - 1]
                    logits.append((q[b, n, :, i] @ k[b, n, :, j] + q[b, n, :, i] @ r) / math.sqrt(d))
                weights = torch.stack(logits).softmax(0)
                out[b, n, :, i] = v[b, n] @ weights
    assert torch.allclose(attn(x), out.reshape(2, dim, h, w), atol=1e-5)
    with pytest.raises(ValueError, match="built for"):
        attn(torch.randn(1, dim, w, h))


# The cross-scan hybrid's parts: tests/test_backbones_crossscan.py


def _tiny_vit(**kwargs) -> FaceViT:
    return FaceViT(embed_dim=32, depth=2, heads=4, embedding_size=16, **kwargs)


def test_vit_patch_masking_and_gradient_checkpointing():
    x = torch.randn(4, 3, 112, 112)
    torch.manual_seed(0)
    masked = _tiny_vit(mask_ratio=0.25, drop_path_rate=0.0)
    torch.manual_seed(1)
    a = masked(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, masked(x))  # another random mask
    a.square().sum().backward()
    assert masked.mask_token.grad is not None and masked.mask_token.grad.abs().sum() > 0
    masked.eval()
    assert torch.equal(masked(x), masked(x))  # no masking at inference
    assert _tiny_vit(mask_ratio=0.0).mask_token is None  # nothing unused under DDP
    with pytest.raises(ValueError, match="mask_ratio"):
        _tiny_vit(mask_ratio=1.0)  # would keep no patch

    torch.manual_seed(0)
    plain = _tiny_vit(mask_ratio=0.0, drop_path_rate=0.0)
    ckpt = _tiny_vit(mask_ratio=0.0, drop_path_rate=0.0, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    for model in (plain, ckpt):
        model(x).square().sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    with pytest.raises(ValueError, match="112x112"):
        plain(torch.randn(1, 3, 128, 128))


# --- the FLOP counter --------------------------------------------------------------------------------------

def test_flop_counter_counts_multiply_adds():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    macs = 3 * 8 * 9 * 100 + 8 * 9 * 100 + 800 * 5  # conv, depth-wise conv, linear; BN/ReLU not counted
    assert count_flops(model, (1, 3, 10, 10)) == 2 * macs
    assert count_gmacs(model, 10) == pytest.approx(macs / 1e9)
    assert model.training  # the mode is restored


def test_flop_counter_counts_cpu_attention():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            q = (x * self.w).reshape(1, 2, 9, 16)  # batch 1, 2 heads, 9 tokens, 16 dims
            return F.scaled_dot_product_attention(q, q, q)

    assert count_flops(Attn(), (1, 3, 4, 24)) == 2 * (2 * 9 * 9 * 16 * 2)  # q k^T and attn v
    fwd_bwd = count_flops(Attn(), (1, 3, 4, 24), backward=True)
    assert fwd_bwd == 3 * count_flops(Attn(), (1, 3, 4, 24))
