"""trainer/logging_utils.py in this process: the step line (file always, console only without a live bar),
evaluation left out of samples/s, TensorBoard's eval curves and config text, Weights & Biases through a
fake `wandb` module."""
from __future__ import annotations

import logging
import sys
import time
import types

import pytest

from tests._trainer_helpers import read_jsonl
from trainer import logging_utils
from trainer.config import ConfigError, load_config
from trainer.logging_utils import MetricsLogger, eval_scalars, setup_logging

RESULTS = {"lfw": {"pairs": 6000, "acc": 0.99, "std": 0.01, "threshold": 1.2, "xnorm": 20.0, "genuine": 3000,
                   "impostor": 3000, "tar_at_far": {"1e-4": 0.9, "1e-6": None}, "align_failures": 0}}


@pytest.fixture
def no_root_handlers():
    yield
    logging.getLogger("trainer").handlers.clear()


def test_eval_scalars_are_tar_at_far_and_no_constant_counts():
    assert eval_scalars(RESULTS) == {"eval/lfw/acc": 0.99, "eval/lfw/std": 0.01, "eval/lfw/threshold": 1.2,
                                     "eval/lfw/xnorm": 20.0, "eval/lfw/tar@far=1e-4": 0.9}


def test_step_line_goes_to_the_file_and_to_the_console_only_without_a_live_bar(tmp_path, capsys, monkeypatch,
                                                                                no_root_handlers):
    logger = setup_logging(tmp_path, 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar shows loss, lr, speed
    metrics = MetricsLogger(tmp_path, 0, 10, 0, 8, tensorboard=False, progress_bar=True, logger=logger)
    metrics.step(1, 2.5)
    metrics.flush(1, 0, 0.1)
    metrics.close()
    assert "step 1/10" not in capsys.readouterr().err
    assert "step 1/10  epoch 0  loss 2.5000  lr 0.100000" in (tmp_path / "training.log").read_text()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a log file or a pipe: no live bar there
    metrics = MetricsLogger(tmp_path, 0, 10, 1, 8, tensorboard=False, progress_bar=True, logger=logger)
    metrics.step(2, 2.0)
    metrics.flush(2, 0, 0.1)
    metrics.close()
    assert "step 2/10" in capsys.readouterr().err


def test_paused_time_is_not_throughput_nor_eta(tmp_path, no_root_handlers):
    metrics = MetricsLogger(tmp_path, 0, 100, 0, 1000, tensorboard=False, progress_bar=False)
    metrics.step(1, 1.0)
    with metrics.paused():
        time.sleep(0.5)  # an evaluation
    record = metrics.flush(1, 0, 0.1)
    metrics.close()
    assert record["samples_per_sec"] > 1000 / 0.25
    metrics = MetricsLogger(tmp_path, 0, 100, 0, 1000, tensorboard=False, progress_bar=False)
    metrics.step(1, 1.0)
    time.sleep(0.5)
    assert metrics.flush(1, 0, 0.1)["samples_per_sec"] < 1000 / 0.5


def test_tensorboard_gets_tar_at_far_and_the_config_and_no_pair_counts(tmp_path, no_root_handlers):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("cpu_demo")
    metrics = MetricsLogger(tmp_path, 0, 10, 0, 8, tensorboard=True, progress_bar=False, config=cfg)
    metrics.step(1, 2.0)
    metrics.flush(1, 0, 0.1)
    metrics.eval(1, 0.25, RESULTS)
    metrics.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    tags = events.Tags()
    assert "eval/lfw/tar@far=1e-4" in tags["scalars"] and "eval/lfw/acc" in tags["scalars"]
    assert not [t for t in tags["scalars"] if t.endswith(("/pairs", "/genuine", "/impostor"))]
    assert "train/loss" in tags["scalars"] and "train/time" not in tags["scalars"]
    assert any(t.startswith("config") for t in tags["tensors"])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[-1]["epoch"] == 0.25 and records[-1]["time"] > 1e9


class FakeWandb(types.ModuleType):
    """Records what the trainer hands to wandb."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step=None):
        self.logs.append((step, dict(data)))

    def finish(self):
        self.finished += 1


def test_wandb_gets_the_config_losses_and_evals(tmp_path, monkeypatch, no_root_handlers):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config("cpu_demo", ["wandb=true", "wandb_project=faces"])
    metrics = MetricsLogger(tmp_path / "myrun", 0, 10, 0, 8, tensorboard=False, progress_bar=False,
                            config=cfg)
    metrics.step(1, 2.0)
    metrics.flush(1, 0, 0.1)
    metrics.eval(1, 0.1, RESULTS)
    metrics.close()
    assert len(fake.inits) == 1 and fake.inits[0]["project"] == "faces" and fake.inits[0]["name"] == "myrun"
    assert fake.inits[0]["config"]["lr"] == 0.1
    assert fake.logs[0][0] == 1 and fake.logs[0][1]["train/loss"] == 2.0
    assert fake.logs[1] == (1, eval_scalars(RESULTS))
    assert fake.finished == 1


def test_wandb_off_by_default_and_a_clear_error_when_missing(tmp_path, monkeypatch, no_root_handlers):
    from trainer.main import check_config

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config("cpu_demo")
    assert cfg.wandb is False
    MetricsLogger(tmp_path, 0, 10, 0, 8, tensorboard=False, progress_bar=False, config=cfg).close()
    assert fake.inits == []
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: `import wandb` raises ImportError
    with pytest.raises(ConfigError, match="wandb package is not installed: `pip install wandb`"):
        check_config(load_config("cpu_demo", ["wandb=true"]))
    with pytest.raises(ConfigError, match="not installed"):
        logging_utils.require_wandb()
