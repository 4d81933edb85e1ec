"""The papers' backbones in the whole system: trained by trainer/main.py through Partial FC under torchrun
(2 gloo ranks), and exported (trainer.model_io.export: ONNX and TorchScript checked against PyTorch)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests._trainer_helpers import pack_glint24, run_trainer, train_records
from trainer.backbones import build_backbone
from trainer.model_io import export
from trainer.model_io.load import load_backbone

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, kwargs, atol", [
    ("ressanet50", {}, 1e-4),
    ("vit_t", {"depth": 2}, 1e-4),
    ("crossscan_r50", {}, 1e-4),
    ("lightcnn9", {}, 1e-4),
    # 56 residual attention units in fp32: onnxruntime's kernels sum in another order (4.5e-4 seen)
    ("attention56", {}, 2e-3),
    ("efficientnet_b0", {}, 1e-4),  # through the timm adapter
])
def test_papers_backbones_export_to_onnx_and_torchscript(name, kwargs, atol, tmp_path):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=64, **kwargs).eval()
    export.export_onnx(model, tmp_path / f"{name}.onnx", atol=atol)  # raises ExportError past atol
    export.export_torchscript(model, tmp_path / f"{name}.ts.pt", atol=atol)
    assert (tmp_path / f"{name}.onnx").stat().st_size > 0 and (tmp_path / f"{name}.ts.pt").stat().st_size > 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pack_glint24(tmp_path_factory.mktemp("papers_train") / "glint24", holdout=2, holdout_pairs=20)


@pytest.mark.parametrize("name, kwargs", [("ressanet50_ibsa", {}), ("vit_t", {"depth": 2})])
def test_papers_backbone_trains_through_partial_fc_under_torchrun(name, kwargs, data, tmp_path):
    out = tmp_path / "run"
    run_trainer(2, ["--config", "trainer/configs/cpu_demo.py", "--data", str(data), "--output", str(out),
                    f"network={name}", f"network_kwargs={json.dumps(kwargs)}", "channels_last=False",
                    "batch_size=4", "max_steps=3", "frequent=1", "progress_bar=false", "num_threads=1",
                    "sample_rate=0.5", "val_targets=[]"], timeout=600)
    losses = [r["loss"] for r in train_records(out)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    model = load_backbone(out / "model.pt").eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 128)
