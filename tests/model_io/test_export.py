"""trainer.model_io.export and .load: ONNX (dynamic batch) and TorchScript of a real backbone agree with
PyTorch within 1e-4; a file that would not is never written; bad checkpoints fail in one line."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests._eval_helpers import EMBEDDING, last_json, run_module, save_model
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
        got = session.run(["embedding"], {"input": x.numpy()})[0]
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
