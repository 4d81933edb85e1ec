"""Whole runs with the weights' moving average: a stopped and resumed run equals one that never
stopped (losses and the exported averaged weights), and model.pt holds the average, not the last weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._trainer_helpers import pack_glint24, run_trainer, train_records
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow

ARGS = ["--config", "trainer/configs/cpu_demo.py", "batch_size=16", "frequent=1", "progress_bar=false",
        "warmup_epoch=0", "num_threads=1", "val_targets=[]", "ema_decay=0.9"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_glint24(tmp_path_factory.mktemp("ema_data") / "glint24", holdout=0)


def _model(out: Path) -> dict:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=False)["state_dict"]


def test_stopped_and_resumed_run_equals_the_whole_run(data, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_trainer(2, [*ARGS, "--data", str(data), "--output", str(whole), "max_steps=6"])
    run_trainer(2, [*ARGS, "--data", str(data), "--output", str(part), "max_steps=3"])
    run_trainer(2, [*ARGS, "--data", str(data), "--output", str(part), "max_steps=6"])  # auto-resume
    a, b = train_records(whole), train_records(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), ra["step"]
    ma, mb = _model(whole), _model(part)
    for k in ma:
        assert torch.allclose(ma[k].float(), mb[k].float(), rtol=1e-4, atol=1e-6), k

    # model.pt is the average: it differs from the trained weights in the last checkpoint.
    last = sorted((whole / "checkpoints").glob("step_*"))[-1]
    trained = torch.load(last / ckpt.TRAIN_STATE, map_location="cpu", weights_only=False)["backbone"]
    key = next(k for k in ma if k.endswith("weight") and ma[k].dim() == 4)
    assert not torch.allclose(ma[key], trained[key])
