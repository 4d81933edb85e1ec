"""trainer.model_io.export and .load: ONNX (dynamic batch) and TorchScript of a real backbone agree with
PyTorch within 1e-4; a file that would not is never written; bad checkpoints fail in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests._eval_helpers import EMBEDDING, REPO, last_json, run_module, save_model
from trainer.checkpoint import CheckpointError
from trainer.model_io import export
from trainer.model_io.load import load_backbone, read_checkpoint


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("export") / "model.pt", seed=1)


@pytest.mark.slow
def test_export_cli_onnx_and_torchscript_match_pytorch(model_pt, tmp_path):
    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.ts.pt"
    proc = run_module("trainer.model_io.export", "--checkpoint", str(model_pt), "--onnx", str(onnx_path),
                      "--torchscript", str(ts_path))
    result = last_json(proc.stdout)
    assert result["network"] == "mbf" and result["onnx_max_abs_diff"] <= 1e-4
    model = load_backbone(model_pt)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_path))
    for batch in (1, 3, 7):  # the batch axis is dynamic
        x = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        with torch.no_grad():
            want = model(x).numpy()
            got_ts = scripted(x).numpy()
        got = session.run(["embedding"], {"data": x.numpy()})[0]  # arcface_torch's input name
        assert got.shape == (batch, EMBEDDING)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got_ts, want, rtol=0, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["network"] == "mbf"
    assert json.loads(meta["network_kwargs"]) == {"embedding_size": EMBEDDING}
    assert "127.5" in meta["preprocessing"]


def test_export_refuses_a_file_over_tolerance(tmp_path):
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 8, 8), nn.Flatten(), nn.Linear(4 * 14 * 14, 8))
    with pytest.raises(export.ExportError, match="not written"):
        export.export_torchscript(model, tmp_path / "m.ts.pt", atol=-1.0)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one is left


@pytest.mark.slow
def test_load_backbone_round_trip_and_overrides(model_pt, tmp_path):
    model = load_backbone(model_pt)
    assert not model.training and model.network == "mbf"
    # A bare state_dict with DDP's "module." prefix loads when the network is named.
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, bare)
    with pytest.raises(CheckpointError, match="--network"):
        read_checkpoint(bare)
    again = load_backbone(bare, network="mbf", network_kwargs={"embedding_size": EMBEDDING})
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_backbone(bare, network="mbf", network_kwargs={"embedding_size": EMBEDDING + 1})
    with pytest.raises(CheckpointError, match="unknown backbone"):
        load_backbone(bare, network="no_such_net")


@pytest.mark.slow
def test_export_cli_fails_in_one_line_on_a_bad_checkpoint(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"\x00" * 100)
    proc = run_module("trainer.model_io.export", "--checkpoint", str(junk), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a loadable torch checkpoint" in proc.stderr
    assert list(tmp_path.iterdir()) == [junk]


@pytest.mark.slow
def test_export_insightface_state_dict_input_name_permissions_and_no_tracer_warning(model_pt, tmp_path):
    onnx_path, pth = tmp_path / "m.onnx", tmp_path / "backbone.pth"
    proc = subprocess.run([sys.executable, "-m", "trainer.model_io.export", "--checkpoint", str(model_pt),
                           "--onnx", str(onnx_path), "--insightface", str(pth), "--input-name", "img"],
                          cwd=REPO, capture_output=True, text=True, umask=0o022, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # The backbones' input-size checks become trace constants on purpose; nothing to tell the user.
    assert "TracerWarning" not in proc.stderr, proc.stderr
    result = last_json(proc.stdout)
    assert "torchscript" not in result  # the paths given pick the formats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pth", "m.onnx"]
    for path in (onnx_path, pth):
        assert os.stat(path).st_mode & 0o777 == 0o644, path  # not mkstemp's 0600
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["img"]
    # backbone.pth is what arcface_torch saves: a plain state_dict (for MobileFaceNet our names are
    # arcface_torch's, tests/model_io/test_convert.py) that a fresh network loads as it is.
    state = torch.load(pth, map_location="cpu", weights_only=True)
    model = load_backbone(model_pt)
    assert set(state) == set(model.state_dict()) and all(isinstance(v, torch.Tensor) for v in state.values())
    from trainer.backbones import build_backbone

    fresh = build_backbone("mbf", embedding_size=EMBEDDING).eval()
    fresh.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_export_paths_by_format_and_by_path(tmp_path):
    ckpt = tmp_path / "run" / "model.pt"
    none = {"onnx": None, "torchscript": None, "insightface": None}
    assert export.output_paths(ckpt, None, none) == {"onnx": ckpt.with_suffix(".onnx"),
                                                     "torchscript": ckpt.with_suffix(".torchscript.pt")}
    assert export.output_paths(ckpt, ["insightface"], none) == {"insightface": tmp_path / "run" / "backbone.pth"}
    given = {**none, "onnx": str(tmp_path / "x.onnx")}
    assert export.output_paths(ckpt, None, given) == {"onnx": tmp_path / "x.onnx"}
    assert export.output_paths(ckpt, ["torchscript"], given) == {"onnx": tmp_path / "x.onnx",
                                                                 "torchscript": ckpt.with_suffix(".torchscript.pt")}
    assert export.build_parser().parse_args(["--checkpoint", "m.pt"]).input_name == "data"
    with pytest.raises(SystemExit):
        export.build_parser().parse_args(["--checkpoint", "m.pt", "--format", "onnx,tflite"])


def test_backbone_pth_goes_through_the_converter(tmp_path):
    # A face ViT gets arcface_torch's names (its mask token included); a network that arcface_torch does not
    # have is refused in one line, and nothing is written.
    from trainer.backbones import build_backbone
    from trainer.backbones.vit import to_insightface
    from trainer.model_io.convert import ConvertError

    vit = build_backbone("vit_t", embedding_size=EMBEDDING, mask_ratio=0.0)
    vit.network, vit.network_kwargs = "vit_t", {"embedding_size": EMBEDDING, "mask_ratio": 0.0}
    assert "mask_token" not in vit.state_dict()
    n = export.export_backbone_pth(vit, tmp_path / "backbone.pth")
    state = torch.load(tmp_path / "backbone.pth", map_location="cpu", weights_only=True)
    want = to_insightface(vit.state_dict(), 256)
    assert n == len(state) and set(state) == set(want) and "mask_token" in state
    other = build_backbone("lightcnn9")
    other.network, other.network_kwargs = "lightcnn9", {}
    with pytest.raises(ConvertError, match="no arcface_torch counterpart"):
        export.export_backbone_pth(other, tmp_path / "other.pth")
    assert not (tmp_path / "other.pth").exists()
