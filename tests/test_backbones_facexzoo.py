"""The backbones FaceX-Zoo's Table 1 uses that arcface_torch lacks: IR-SE-50/100/152, FaceX-Zoo's 1x-wide
MobileFaceNet, TF-NAS-A. Sizes against the published / released counts, structure, forward + backward.

FaceX-Zoo's paper prints no parameter counts, so the counts are those of FaceX-Zoo's own modules
(backbone/ResNets.py, MobileFaceNets.py, TF_NAS.py at 112x112, 512-d), plus MobileFaceNet's paper (0.99M
at 128-d). With FACEXZOO_ROOT naming a FaceX-Zoo checkout (or a folder holding those three files), the
peer test also loads FaceX-Zoo's initialised weights into ours and compares the embeddings.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainer.backbones import available_backbones, build_backbone
from trainer.backbones.ir_se import IRSEUnit
from trainer.backbones.tf_nas import TF_NAS_A, MBInvertedResBlock
from trainer.model_io.flops import count_params

NEW = ["ir_se50", "ir_se100", "ir_se152", "mbf_facexzoo", "tf_nas_a"]


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


def test_registered():
    assert set(NEW) <= set(available_backbones())


@pytest.mark.parametrize("name,params", [
    ("ir_se50", 43_797_696),   # FaceX-Zoo Resnet(50, mode="ir_se")
    ("ir_se100", 65_502_016),
    ("ir_se152", 71_148_736),  # "ResNet152-irse" of FaceX-Zoo's Table 1
    ("mbf_facexzoo", 1_200_512),
    ("tf_nas_a", 39_590_703),  # "TF-NAS-A" of Table 1
])
def test_parameter_counts_match_facexzoo(name, params):
    assert count_params(on_meta(name)) == params


def test_mobilefacenet_matches_its_paper_and_is_half_as_wide_as_mbf():
    # MobileFaceNet (Chen et al. 2018), Table 1 / text: 0.99M parameters with the 128-d embedding
    assert count_params(on_meta("mbf_facexzoo", embedding_size=128)) / 1e6 == pytest.approx(0.99, rel=0.015)
    ours, wide = on_meta("mbf_facexzoo"), on_meta("mbf")
    assert ours.layers[0].layers[0].out_channels == 64 and wide.layers[0].layers[0].out_channels == 128


def test_ir_se_structure():
    model = on_meta("ir_se50")
    units = [m for m in model.body]
    assert len(units) == 3 + 4 + 14 + 3 and all(isinstance(u, IRSEUnit) for u in units)
    assert [u.res_layer[3].stride[0] for u in units].count(2) == 4
    assert isinstance(units[0].shortcut_layer, nn.MaxPool2d)  # 64 -> 64: subsampling, not a conv
    se = units[-1].res_layer[5]
    assert (se.fc1.in_channels, se.fc1.out_channels, se.fc1.bias) == (512, 32, None)  # reduction 16
    assert len(on_meta("ir_se152").body) == 3 + 8 + 36 + 3


def test_tf_nas_structure():
    model = on_meta("tf_nas_a")
    blocks = [b for name in TF_NAS_A for b in (getattr(model, name).children() if name != "second_stem"
                                                 else [model.second_stem])]
    assert len(blocks) == 1 + 2 + 3 + 4 + 4 + 4 + 1
    assert all(isinstance(b, MBInvertedResBlock) for b in blocks)
    assert sum(b.depth_conv.conv.stride[0] == 2 for b in blocks) == 4  # 112 -> 7 with the stride-1 stem
    assert model.second_stem.inverted_bottleneck is None  # 32 -> 32: nothing to expand
    assert isinstance(model.stage1[0].depth_conv.act, nn.ReLU) and isinstance(model.stage2[0].depth_conv.act,
                                                                                nn.SiLU)
    assert model.output_layer[2].in_features == 1280 * 7 * 7


@pytest.mark.parametrize("name,side", [("ir_se50", 48), ("mbf_facexzoo", 112), ("tf_nas_a", 48)])
def test_forward_backward(name, side):
    torch.manual_seed(0)
    kwargs = {} if name == "mbf_facexzoo" else {"input_size": side}
    model = build_backbone(name, embedding_size=64, dropout=0.2, **kwargs).train()
    x = torch.randn(2, 3, side, side)
    y = model(x)
    assert y.shape == (2, 64)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        a = model.eval()(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ir_se_grad_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_backbone("ir_se50", embedding_size=16, input_size=32)
    ckpt = build_backbone("ir_se50", embedding_size=16, input_size=32, grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt):
        m.eval()  # the same BN statistics both ways
        m(x).sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


# --- against FaceX-Zoo's own modules ----------------------------------------------------------------------

def _facexzoo(module: str):
    root = os.environ.get("FACEXZOO_ROOT")
    if not root:
        pytest.skip("set FACEXZOO_ROOT to a checkout of JDAI-CV/FaceX-Zoo (or a folder with its backbone files)")
    for path in (Path(root) / f"{module}.py", Path(root) / "backbone" / f"{module}.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location(f"facexzoo_{module}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    pytest.skip(f"no {module}.py under FACEXZOO_ROOT={root}")


@pytest.mark.parametrize("ours,build_theirs", [
    ("ir_se50", lambda: _facexzoo("ResNets").Resnet(50, 0.0, "ir_se")),
    ("tf_nas_a", lambda: _facexzoo("TF_NAS").TF_NAS_A(7, 7, 512, 0.0)),
    ("mbf_facexzoo", lambda: _facexzoo("MobileFaceNets").MobileFaceNet(512, 7, 7)),
])
def test_same_embedding_as_facexzoo(ours, build_theirs):
    torch.manual_seed(0)
    theirs = build_theirs().eval()
    g = torch.Generator().manual_seed(3)
    for m in theirs.modules():  # informative BN statistics, so a misplaced tensor cannot go unseen
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    model = build_backbone(ours).eval()
    src = theirs.state_dict()
    if ours == "mbf_facexzoo":  # arcface_torch's module names: the same tensors in the same order
        dst = model.state_dict()
        assert [v.shape for v in src.values()] == [v.shape for v in dst.values()]
        src = dict(zip(dst, src.values()))
    model.load_state_dict(src, strict=True)
    x = torch.rand(2, 3, 112, 112, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-4, atol=1e-4)
