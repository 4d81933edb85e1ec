"""trainer/init_weights.py: the `init_weights` config key loads trained weights into a new backbone."""
from __future__ import annotations

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.backbones import build_backbone
from trainer.checkpoint import CheckpointError
from trainer.init_weights import load_init_weights


def _differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_insightface_iresnet50_state_dict_into_aaface_backbone(tmp_path):
    # Our iresnet50's state_dict has insightface's key names: it stands for a released backbone.pth.
    torch.manual_seed(0)
    released = build_backbone("r50")
    path = tmp_path / "backbone.pth"
    torch.save(released.state_dict(), path)
    torch.manual_seed(1)
    net = build_backbone("aaface", base="r50", embedding_size=64, branch_channels=64, num_attributes=5)
    branches = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    report = load_init_weights(net, path)
    trunk = net.backbone.state_dict()
    assert trunk and all(torch.equal(v, released.state_dict()[k]) for k, v in trunk.items())
    # The branches and the AAI are left as they were; IResNet's embedding layer has no place here.
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in branches.items())
    assert report.endswith("(left out the 12 of bn2, fc, features: it has no place for them)")
    with torch.no_grad():
        x = torch.randn(1, 3, 112, 112)
        torch.testing.assert_close(net.backbone(x), released.eval().forward_features(x))


def test_whole_model_from_a_state_dict_model_pt_or_run_folder(tmp_path):
    torch.manual_seed(0)
    trained = build_backbone("r18", embedding_size=32)
    # A DDP-saved state dict (module. prefixes), our model.pt, and a run folder holding one.
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "ddp.pth")
    run = tmp_path / "run"
    run.mkdir()
    ckpt.save_model(run / ckpt.MODEL_FILE, trained, "r18", {"embedding_size": 32})
    for source in (tmp_path / "ddp.pth", run / ckpt.MODEL_FILE, run):
        torch.manual_seed(1)
        net = build_backbone("r18", embedding_size=32)
        assert _differs(net, trained)
        assert "left out" not in load_init_weights(net, source)
        assert not _differs(net, trained)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    r18 = build_backbone("r18", embedding_size=32).state_dict()
    path = tmp_path / "r18.pth"
    torch.save({**r18, "extra.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as e:
        load_init_weights(build_backbone("r34", embedding_size=64), path)
    msg = str(e.value)
    assert str(path) in msg and "missing: layer1.2.bn1.weight" in msg and "unexpected: extra.weight" in msg
    assert "shape mismatch: fc.weight (file (32, 25088), model (64, 25088))" in msg
    with pytest.raises(CheckpointError, match="no checkpoint and no model.pt"):
        load_init_weights(build_backbone("r18"), tmp_path)
    # AAFace on another IResNet depth: the backbone's own missing keys are named.
    with pytest.raises(CheckpointError, match="IResNetTrunk: missing: layer1.2"):
        load_init_weights(build_backbone("aaface", base="r34", embedding_size=32, branch_channels=32), path)
