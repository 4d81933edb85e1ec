"""Fault handling of a whole run (in this process, one rank, the real reader and a real backbone):
non-finite steps are skipped, counted, and stop the run after `max_nan_steps` in a row; corrupt records
are skipped by the reader and counted in metrics.jsonl; a bad config is a one-line error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.manifest import load_manifest, shard_entry, write_manifest
from pipeline.recordio import IndexedRecordIO, IRHeader, pack_record
from tests._trainer_helpers import pack_glint24, run_trainer, train_records
from trainer import main as trainer_main
from trainer.checkpoint import find_checkpoint

pytestmark = pytest.mark.slow

ARGS = ["--config", "cpu_demo", "batch_size=4", "embedding_size=32", "frequent=1", "progress_bar=false",
        "tensorboard=false", "val_targets=[]", "num_threads=0", "warmup_epoch=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """glint24 plus a shard of 300 records whose JPEG does not decode (a quarter of all records)."""
    data = pack_glint24(tmp_path_factory.mktemp("faults") / "glint24", holdout=0)
    m = load_manifest(data)
    with IndexedRecordIO(data / "bad-00000.idx", data / "bad-00000.rec", "w") as w:
        for i in range(300):
            key = 10**6 + i
            header = IRHeader(0, float(i % m["num_classes"]), key, 0)
            w.write_idx(key, pack_record(header, b"\xff\xd8\xff broken"))
    m["shards"].append(shard_entry(data, "bad-00000.rec", "bad-00000.idx", 300))
    m["num_images"] += 300
    write_manifest(data, m)
    return data


class PoisonedLoader:
    """The real loader, with NaN written into the images of the given (1-based) batches."""

    def __init__(self, loader, poisoned: set[int]) -> None:
        self._loader, self._poisoned, self._count = loader, poisoned, 0

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        for images, labels in self._loader:
            self._count += 1
            if self._count in self._poisoned:
                images = images.clone()
                images[0, :, :4, :4] = float("nan")
            yield images, labels


def _poison(monkeypatch, batches: set[int]) -> None:
    real = trainer_main.build_loader
    monkeypatch.setattr(trainer_main, "build_loader", lambda *a, **k: PoisonedLoader(real(*a, **k), batches))


def test_nan_steps_skipped_and_counted_corrupt_records_counted(data, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, {2, 3})
    out = tmp_path / "run"
    assert trainer_main.main([*ARGS, "--data", str(data), "--output", str(out), "max_steps=5",
                              "max_nan_steps=3"]) == 0
    records = train_records(out)
    assert [r["nan_steps"] for r in records] == [0, 1, 2, 2, 2]
    assert records[1]["loss"] is None and records[2]["loss"] is None  # NaN is logged as null
    assert all(r["loss"] is not None for r in (records[0], *records[3:]))
    assert records[-1]["skipped_records"] > 0  # the broken JPEGs were met, replaced and counted
    model = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    log = (out / "training.log").read_text()
    assert "non-finite loss, step skipped (2 in a row, 2 in all)" in log
    assert "corrupt records skipped" in log


def test_too_many_nan_steps_in_a_row_stop_the_run(data, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, {2, 3, 4, 5, 6})
    out = tmp_path / "run"
    code = trainer_main.main([*ARGS, "--data", str(data), "--output", str(out), "max_steps=8",
                              "max_nan_steps=3",
                              "save_every=1"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 3 optimizer steps in a row had a non-finite loss") and "step 4" in err
    # the run stopped where it said, and its last checkpoint is the last good step
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    assert find_checkpoint(out).name == "step_00000003"


def test_bad_config_is_a_one_line_error(tmp_path, capsys):
    assert trainer_main.main(["--config", "cpu_demo", "--output", str(tmp_path), "optimizer=lamb",
                              "--data", str(tmp_path)]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    assert trainer_main.main(["--config", "cpu_demo", "--output", str(tmp_path), "lr=abc"]) == 2
    assert "expected a number" in capsys.readouterr().err


def test_corrupt_records_are_summed_over_ranks_in_the_final_line(data, tmp_path):
    """Both ranks meet broken JPEGs; the last line counts them all, as metrics.jsonl does."""
    out = tmp_path / "run2"
    run_trainer(2, [*ARGS, "--data", str(data), "--output", str(out), "max_steps=4", "num_threads=1"])
    records = train_records(out)
    total = records[-1]["skipped_records"]
    assert total > 0
    log = (out / "training.log").read_text()
    assert f"{total} corrupt records skipped" in log, log[-500:]
