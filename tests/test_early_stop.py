"""trainer/early_stop.py: the run stops after `early_stop_patience` evaluations without a better accuracy."""
from __future__ import annotations

import pytest

from tests._eval_helpers import face_folder, run_module
from tests._trainer_helpers import train_records
from trainer import checkpoint as ckpt
from trainer import main as trainer_main
from trainer.config import ConfigError, load_config
from trainer.early_stop import EarlyStopping, build_early_stopping


def test_patience_counts_evaluations_without_a_better_mean_accuracy():
    stopper = EarlyStopping(patience=2)
    accs = [(0.5, 0.7), (0.6, 0.7), (0.7, 0.6), (0.8, 0.6), (0.6, 0.6), (0.65, 0.65)]
    stops = [stopper.update({"a": {"acc": a}, "b": {"acc": b}}) for a, b in accs]
    # means 0.6, 0.65 (best), 0.65 (no), 0.7 (best), 0.6 (no), 0.65 (no: stop)
    assert stops == [False, False, False, False, False, True] and stopper.best == pytest.approx(0.7)
    assert not EarlyStopping(1).update(None)  # a rank that did not evaluate
    with pytest.raises(ConfigError, match="needs val_targets"):
        build_early_stopping(load_config("cpu_demo", ["early_stop_patience=20", "val_targets=[]"]))
    assert build_early_stopping(load_config("cpu_demo")) is None


def test_training_stops_early(glint24, tmp_path, monkeypatch):
    faces = face_folder(glint24, tmp_path / "faces", identities=4, per_identity=6)
    data = tmp_path / "data"
    run_module("pipeline", "pack", str(faces), "--out", str(data), "--holdout", "1", "--workers", "1",
               "--no-progress")
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.9, 0.9])
    monkeypatch.setattr(trainer_main, "evaluate", lambda *a: {"holdout_pairs": {"acc": next(scores)}})
    out = tmp_path / "run"
    assert trainer_main.main(["--config", "cpu_demo", "--data", str(data), "--output", str(out),
                              "batch_size=4", "max_steps=10", "frequent=1", "verbose=1",
                              "early_stop_patience=2", 'val_targets=["holdout_pairs"]', "progress_bar=false",
                              "tensorboard=false", "num_threads=0"]) == 0
    # best 0.6 at step 2; steps 3 and 4 do not beat it: the run ends at step 4 (model.pt written).
    assert [r["step"] for r in train_records(out)][-1] == 4
    assert "step 4: early stop" in (out / "training.log").read_text()
    assert (out / ckpt.MODEL_FILE).is_file()
