"""trainer/eval/closed_set.py: closed-set classification accuracy with a run's classifier rows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests._eval_helpers import face_folder, run_module, save_model
from trainer.eval import __main__ as eval_cli
from trainer.eval.closed_set import closed_set_accuracy
from trainer.eval.common import EvalError


def test_nearest_row_accuracy_by_hand():
    weight = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # row norms do not matter: cosines
    emb = np.array([[5.0, 1.0], [0.1, 1.0], [-1.0, 0.2], [1.0, 0.9], [0.2, -1.0]])
    identity = np.array([0, 1, 2, 1, 1])  # right, right, right, wrong (class 0), wrong (class 0)
    res = closed_set_accuracy(emb, identity, weight)
    assert res == {"acc": 0.6, "balanced_acc": pytest.approx((1 + 1 / 3 + 1) / 3), "n": 5, "classes": 3}
    with pytest.raises(EvalError, match="not all among the classifier's 3 classes"):
        closed_set_accuracy(emb, np.array([0, 1, 2, 3, 1]), weight)


def test_closed_set_cli_on_held_out_records(glint24, tmp_path, capsys):
    from trainer.eval.packed import embed_packed
    from trainer.model_io.load import load_backbone

    faces = face_folder(glint24, tmp_path / "faces", identities=5, per_identity=4)
    data = tmp_path / "data"
    run_module("pipeline", "pack", str(faces), "--out", str(data), "--holdout", "1", "--workers", "1",
               "--no-progress")
    (tmp_path / "run").mkdir()
    model_pt = save_model(tmp_path / "run" / "model.pt")
    # Classifier rows = the embeddings of the one held-out image of each class: every record is its own
    # nearest row, so all are right; with the rows rotated by one class, none is.
    emb, info = embed_packed(load_backbone(model_pt), str(data), torch.device("cpu"), 8, True, holdout=True,
                             workers=0, progress=False)
    weight = np.zeros((5, emb.shape[1]), np.float32)
    weight[info.identity] = emb
    args = ["--checkpoint", str(model_pt), "--data", str(data), "--holdout", "--closed-set", "--device", "cpu",
            "--workers", "0", "--no-progress", "--classifier", str(tmp_path / "fc_full.pt")]
    for rows, acc in ((weight, 1.0), (np.roll(weight, 1, axis=0), 0.0)):
        torch.save({"fc": {"weight": torch.from_numpy(rows)}}, tmp_path / "fc_full.pt")
        assert eval_cli.main(args) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (res["acc"], res["balanced_acc"], res["n"], res["classes"]) == (acc, acc, 5, 5)
    # Without --classifier the run folder's last checkpoint is looked for: there is none here.
    assert eval_cli.main(args[:-2]) == 2
    assert "no checkpoint with a classifier" in capsys.readouterr().err


def test_crossscan_recipe_config():
    from trainer.config import load_config
    from trainer.main import check_config

    cfg = load_config("crossscan_r50", ["data=DATA"])
    check_config(cfg)
    assert (cfg.network, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_schedule, cfg.min_lr, cfg.num_epoch,
            cfg.batch_size) == ("crossscan_r50", "adamw", 2e-4, 1e-4, "cosine", 1e-6, 60, 32)
    # a linear classifier W x + b, cross-entropy with every class weighted 1
    assert (cfg.loss, cfg.class_weighted_ce, cfg.sample_rate) == ("linear", False, 1.0)
    assert (cfg.early_stop_patience, cfg.early_stop_metric) == (20, "closed_set")
    from pipeline.augment import AugmentConfig

    assert AugmentConfig.from_dict(cfg.augment).crop_area == 0.8


def test_classifies_a_block_at_a_time_from_a_file(monkeypatch):
    import tracemalloc

    import trainer.eval.closed_set as closed_set
    from trainer.eval.rowfile import row_file

    rng = np.random.default_rng(0)
    n, c, d = 6000, 2000, 32
    weight = rng.standard_normal((c, d)).astype(np.float32)
    identity = rng.integers(0, c, n)
    x = weight[identity] + 2.0 * rng.standard_normal((n, d)).astype(np.float32)
    emb = row_file(n, d)
    emb[:] = x
    bias = rng.standard_normal(c).astype(np.float32)
    keep = np.flatnonzero(np.arange(n) % 5 != 0)
    tracemalloc.start()
    try:
        res = closed_set_accuracy(emb, identity[keep], weight, bias, rows=keep, scale=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Before: the N x C scores (48 MB here) and whole copies of the rows; now a block of scores (16 MB).
    assert peak < 24 << 20, peak
    predicted = np.argmax((x[keep] / 2) @ weight.T + bias, axis=1)
    assert res["acc"] == float(np.mean(predicted == identity[keep])) and res["n"] == len(keep)
    # Classes a chunk at a time (here 7 rows' worth) give what all classes at once give, ties included.
    monkeypatch.setattr(closed_set, "_BLOCK_SCORES", 7 * closed_set._BLOCK_ROWS)
    tied = np.repeat(weight[:3], 2, axis=0)  # each class twice: the first of equal scores wins
    assert closed_set_accuracy(x[:50], np.zeros(50, int), tied)["acc"] == \
        float(np.mean(np.argmax(x[:50] @ (tied / np.linalg.norm(tied, axis=1, keepdims=True)).T, axis=1) == 0))
    assert closed_set_accuracy(emb, identity, weight)["acc"] == closed_set_accuracy(x, identity, weight)["acc"]
