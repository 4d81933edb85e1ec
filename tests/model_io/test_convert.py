"""Our face ViT against insightface's arcface_torch ViT: the same keys, the same embeddings, both ways,
through `python -m trainer.model_io.convert`; and weights saved under the old module names still load. IResNet and
MobileFaceNet weights of arcface_torch's own iresnet.py / mobilefacenet.py convert 1:1 too.

The peers are insightface's own recognition/arcface_torch/backbones/{vit,iresnet,mobilefacenet}.py, from a
checkout named by INSIGHTFACE_ROOT (the repository root, or a folder holding those files); those tests skip
without it.
Its code is never part of this repository. It imports three helpers from timm (DropPath, to_2tuple,
trunc_normal_); when timm is not importable they are supplied here (DropPath is inactive in eval mode,
the others only shape arguments and initialise), so the peer's forward pass is its own.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainer.backbones import build_backbone
from trainer.backbones.vit import upgrade_state_dict
from trainer.checkpoint import save_model
from trainer.model_io.convert import INSIGHTFACE_NETWORKS
from trainer.model_io.convert import main as convert_main
from trainer.model_io.load import load_backbone


def _peer_path(name: str = "vit") -> Path | None:
    root = os.environ.get("INSIGHTFACE_ROOT")
    if not root:
        return None
    for candidate in (Path(root) / f"{name}.py", Path(root) / f"recognition/arcface_torch/backbones/{name}.py"):
        if candidate.is_file():
            return candidate
    return None


def _timm_stub() -> dict[str, types.ModuleType]:
    class DropPath(nn.Module):
        def __init__(self, p: float = 0.0):
            super().__init__()
            self.p = p

        def forward(self, x):
            assert not self.training or self.p == 0, "the stub DropPath is for eval-mode comparisons"
            return x

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    layers.trunc_normal_ = nn.init.trunc_normal_
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers}


@pytest.fixture(scope="module")
def peer():
    path = _peer_path()
    if path is None:
        pytest.skip("set INSIGHTFACE_ROOT to a checkout of deepinsight/insightface (or a folder with its vit.py)")
    saved = {k: sys.modules.get(k) for k in ("timm", "timm.models", "timm.models.layers")}
    try:
        import timm.models.layers  # noqa: F401
    except Exception:  # missing, or broken against this torch (torchvision mismatch)
        for k in saved:
            sys.modules.pop(k, None)
        sys.modules.update(_timm_stub())
    try:
        spec = importlib.util.spec_from_file_location("insightface_vit_peer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def _their_vit(peer, embed_dim: int, depth: int, mask_ratio: float, drop_path_rate: float = 0.1):
    # arcface_torch's get_model arguments for its vit_* networks
    return peer.VisionTransformer(img_size=112, patch_size=9, num_classes=512, embed_dim=embed_dim, depth=depth,
                                  num_heads=8, drop_path_rate=drop_path_rate, norm_layer="ln",
                                  mask_ratio=mask_ratio)


# vit_t's layout (8 heads, 9x9 patches, 144 tokens) at a width and depth that keep the CPU test short
SMALL = {"embed_dim": 64, "depth": 3}


def _faces(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _randomise_norms(model: nn.Module) -> None:
    # fresh BN / LN parameters are 1 and 0: make them informative so a swapped tensor cannot go unseen
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


@pytest.mark.parametrize("name,width,depth", [("vit_b", 512, 24)])
def test_state_dict_keys_are_insightfaces(peer, name, width, depth):
    with torch.device("meta"):
        ours = build_backbone(name)
    theirs = _their_vit(peer, width, depth, mask_ratio=0.1)  # their linspace(...).item() needs real tensors
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_ours_to_theirs_same_embedding(peer, tmp_path):
    torch.manual_seed(0)
    kwargs = {**SMALL, "mask_ratio": 0.0, "drop_path_rate": 0.05}  # as insightface's vit_t_dp005_mask0
    ours = build_backbone("vit_t", **kwargs)
    _randomise_norms(ours)
    save_model(tmp_path / "model.pt", ours, "vit_t", kwargs)
    assert convert_main(["to-insightface", str(tmp_path / "model.pt"), str(tmp_path / "theirs.pt")]) == 0
    theirs = _their_vit(peer, SMALL["embed_dim"], SMALL["depth"], mask_ratio=0.0, drop_path_rate=0.05)
    theirs.load_state_dict(torch.load(tmp_path / "theirs.pt", weights_only=True), strict=True)
    x = _faces()
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_theirs_to_ours_same_embedding(peer, tmp_path):
    torch.manual_seed(0)
    theirs = _their_vit(peer, SMALL["embed_dim"], SMALL["depth"], mask_ratio=0.1)
    _randomise_norms(theirs)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    assert convert_main(["from-insightface", str(tmp_path / "theirs.pt"), str(tmp_path / "model.pt"),
                         "--network", "vit_t", "--network-kwargs", json.dumps(SMALL)]) == 0
    ours = load_backbone(tmp_path / "model.pt")
    assert ours.network == "vit_t"
    torch.testing.assert_close(ours.mask_token, theirs.mask_token)
    x = _faces()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-4, atol=1e-4)
    # and back: the very tensors insightface started from
    assert convert_main(["to-insightface", str(tmp_path / "model.pt"), str(tmp_path / "again.pt")]) == 0
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert set(again) == set(theirs.state_dict())
    assert all(torch.equal(again[k], v) for k, v in theirs.state_dict().items())


# --- without the peer -----------------------------------------------------------------------------------

def _old_names(state_dict: dict) -> dict:
    """The names FaceViT's modules had before they took insightface's."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")
        out[k.replace("patch_embed.proj.", "patch_embed.")] = v
    return out


def test_the_rename_touches_98_of_vit_bs_282_keys():
    with torch.device("meta"):
        keys = list(build_backbone("vit_b").state_dict())
    old = _old_names(dict.fromkeys(keys))
    assert len(keys) == 282  # insightface's count, mask token included
    assert sum(a != b for a, b in zip(keys, old)) == 98  # 24 blocks x fc1/fc2 x weight/bias + patch conv's 2
    # insightface's mask token is there even without masking; ours only with it (to_insightface adds one)
    with torch.device("meta"):
        assert len(build_backbone("vit_b", mask_ratio=0.0).state_dict()) == 281
    assert list(upgrade_state_dict(old)) == keys


def test_weights_saved_under_the_old_names_still_load(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_t", **SMALL).eval()
    old = _old_names(model.state_dict())
    assert "blocks.0.mlp.0.weight" in old and "patch_embed.weight" in old
    fresh = build_backbone("vit_t", **SMALL).eval()
    fresh.load_state_dict(old, strict=True)
    x = _faces(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    torch.save({"network": "vit_t", "network_kwargs": SMALL, "state_dict": old}, tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path / "model.pt")(x), model(x), rtol=0, atol=0)


def test_converter_refuses_what_has_no_counterpart(tmp_path, capsys):
    model = build_backbone("lightcnn9")
    save_model(tmp_path / "model.pt", model, "lightcnn9", {})
    assert convert_main(["to-insightface", str(tmp_path / "model.pt"), str(tmp_path / "out.pt")]) == 1
    assert "no arcface_torch counterpart" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    assert convert_main(["from-insightface", str(tmp_path / "bad.pt"), str(tmp_path / "m.pt"),
                         "--network", "r18"]) == 1
    assert "do not fit r18" in capsys.readouterr().err
    assert convert_main(["from-insightface", str(tmp_path / "bad.pt"), str(tmp_path / "m.pt"),
                         "--network", "r1000"]) == 1
    assert "no arcface_torch network" in capsys.readouterr().err


def test_iresnet_round_trip_is_the_identity(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("r18", embedding_size=128)
    save_model(tmp_path / "model.pt", model, "r18", {"embedding_size": 128})
    assert convert_main(["to-insightface", str(tmp_path / "model.pt"), str(tmp_path / "theirs.pt")]) == 0
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items()) and len(theirs) == len(
        model.state_dict())
    assert convert_main(["from-insightface", str(tmp_path / "theirs.pt"), str(tmp_path / "back.pt"),
                         "--network", "r18", "--embedding-size", "128"]) == 0
    back = load_backbone(tmp_path / "back.pt")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert set(INSIGHTFACE_NETWORKS) >= {"r50", "r100", "mbf", "vit_b", "vit_l_dp005_mask_005"}


@pytest.mark.parametrize("ours,peer_file,build", [
    ("r18", "iresnet", lambda mod: mod.iresnet18(False)),
    ("mbf", "mobilefacenet", lambda mod: mod.get_mbf(False, 512)),
])
def test_iresnet_and_mbf_are_insightfaces_key_for_key(ours, peer_file, build, tmp_path):
    path = _peer_path(peer_file)
    if path is None:
        pytest.skip(f"set INSIGHTFACE_ROOT to a checkout of deepinsight/insightface (or a folder with {peer_file}.py)")
    spec = importlib.util.spec_from_file_location(f"insightface_{peer_file}_peer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    theirs = build(mod).eval()
    g = torch.Generator().manual_seed(4)
    for m in theirs.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    assert convert_main(["from-insightface", str(tmp_path / "theirs.pt"), str(tmp_path / "model.pt"),
                         "--network", ours]) == 0
    model = load_backbone(tmp_path / "model.pt")
    x = _faces(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_converter_reads_a_training_checkpoint_too(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_t", **SMALL)
    step = tmp_path / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    # what trainer.checkpoint.save_checkpoint writes for the backbone, old module names included
    torch.save({"network": "vit_t", "network_kwargs": SMALL, "backbone": _old_names(model.state_dict())},
               step / "train_state.pt")
    assert convert_main(["to-insightface", str(step / "train_state.pt"), str(tmp_path / "theirs.pt")]) == 0
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    assert set(theirs) == set(model.state_dict())
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())


def test_a_training_checkpoint_saved_under_the_old_vit_names_passes_the_resume_check(tmp_path):
    """The resume check compares key sets before loading: an old ViT train_state must be upgraded first."""
    from trainer.checkpoint import _check_compatible

    model = build_backbone("vit_t", **SMALL)
    saved = {"num_classes": None, "embedding_size": None, "network": "vit_t",
             "backbone": _old_names(model.state_dict()), "replicated": {}}
    _check_compatible(saved, model, None, {}, tmp_path)
    model.load_state_dict(saved["backbone"])
