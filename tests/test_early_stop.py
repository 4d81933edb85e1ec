"""trainer/early_stop.py: the run stops after `early_stop_patience` evaluations without a better accuracy."""
from __future__ import annotations

import json

import pytest
import torch

from tests._eval_helpers import face_folder, run_module
from tests._trainer_helpers import train_records
from trainer import checkpoint as ckpt
from trainer import main as trainer_main
from trainer.config import ConfigError, load_config
from trainer.early_stop import EarlyStopping, build_early_stopping
from trainer.eval import __main__ as eval_cli


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


def test_closed_set_metric_needs_a_validation_split(glint24, tmp_path):
    faces = face_folder(glint24, tmp_path / "faces", identities=3, per_identity=4)
    data = tmp_path / "data"
    run_module("pipeline", "pack", str(faces), "--out", str(data), "--workers", "1", "--no-progress")
    cfg = load_config("cpu_demo", ["early_stop_patience=2", "early_stop_metric=closed_set", "verbose=1",
                                   f"data={data}"])
    with pytest.raises(ConfigError, match="--val-split"):
        build_early_stopping(cfg)
    with pytest.raises(ConfigError, match="early_stop_metric must be"):
        build_early_stopping(load_config("cpu_demo", ["early_stop_metric=pairs"]))


def _closed_set_run(glint24, tmp_path, *overrides):
    faces = face_folder(glint24, tmp_path / "faces", identities=3, per_identity=6)
    data = tmp_path / "data"
    run_module("pipeline", "pack", str(faces), "--out", str(data), "--val-split", "0.34", "--workers", "1",
               "--no-progress")
    out = tmp_path / "run"
    code = trainer_main.main(["--config", "cpu_demo", "--data", str(data), "--output", str(out),
                              "batch_size=4", "frequent=1", "verbose=1", "loss=linear",
                              "early_stop_metric=closed_set", "val_targets=[]", "progress_bar=false",
                              "tensorboard=false", "num_threads=0", "val_batch_size=8", *overrides])
    return code, out


def test_closed_set_stopping_evaluates_the_val_shards(glint24, tmp_path, capsys):
    code, out = _closed_set_run(glint24, tmp_path, "max_steps=3", "early_stop_patience=5")
    assert code == 0
    log = (out / "training.log").read_text()
    # steps 1 and 2 are evaluated (the last step is not: the run ends there); 2 val images per identity
    assert log.count("validation split: closed-set acc=") == 2 and "6 images)" in log
    assert "early stop" not in log
    # the same split from the command line, with the run's linear classifier (its bias included)
    assert eval_cli.main(["--checkpoint", str(out / ckpt.MODEL_FILE), "--data", str(tmp_path / "data"), "--val",
                          "--closed-set", "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (res["val"], res["n"], res["classes"]) == (True, 6, 3) and 0.0 <= res["acc"] <= 1.0


def test_closed_set_stopping_keeps_the_best_weights(glint24, tmp_path, monkeypatch):
    import trainer.eval.closed_set as closed_set

    scores = iter([0.3, 0.7, 0.5, 0.6, 0.9])
    seen = []

    def fake(model, weight, bias, *a, **k):
        seen.append({k_: v.detach().clone() for k_, v in model.state_dict().items()})
        assert bias is not None and weight.shape[0] == len(bias) == 3  # the linear head's classifier
        return {"acc": next(scores), "balanced_acc": 0.0, "n": 6, "classes": 3}

    monkeypatch.setattr(closed_set, "embedded_closed_set_accuracy", fake)
    code, out = _closed_set_run(glint24, tmp_path, "max_steps=10", "early_stop_patience=2")
    assert code == 0 and "step 4: early stop" in (out / "training.log").read_text()
    saved = torch.load(out / ckpt.MODEL_FILE, map_location="cpu", weights_only=False)["state_dict"]
    best, last = seen[1], seen[3]  # step 2 (0.7) is the best; the run stopped at step 4
    assert all(torch.equal(saved[k], best[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)
