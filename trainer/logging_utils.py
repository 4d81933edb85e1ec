"""What a run reports: `metrics.jsonl` (docs/design.md section 3), TensorBoard scalars, Weights & Biases
(optional), a text log, tqdm on rank 0.

Only rank 0 writes files. Every logged loss is already the global mean (Partial FC all-reduces it), so
nothing is reduced here. Every `frequent` steps training.log gets a line with step, epoch, loss, lr,
samples/s and ETA (as arcface_torch prints); so does stderr when it is not a terminal or there is no
progress bar (on a terminal the bar shows the same). Evaluation and other pauses (`paused`) are not
counted in samples/s nor in the ETA.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from tqdm import tqdm

from pipeline.atomic import atomic_write_bytes, json_safe

METRICS = "metrics.jsonl"
LOG = "training.log"
# Eval summary fields that stay the same at every evaluation: in metrics.jsonl, not as flat curves
CONSTANT_EVAL_KEYS = frozenset({"pairs", "genuine", "impostor", "align_failures"})


class _NotOnConsole(logging.Filter):
    """Drops records logged with extra={"console": False} (the periodic step line, when a bar shows it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


def config_text(cfg: Mapping[str, Any]) -> str:
    """The config, a `key = value` line per key, sorted (the log's and TensorBoard's config dump)."""
    return "\n".join(f"  {k} = {cfg[k]!r}" for k in sorted(cfg))


def setup_logging(output: str | os.PathLike | None, rank: int) -> logging.Logger:
    """The `trainer` logger: rank 0 logs INFO to stderr and OUTPUT/training.log, other ranks warnings only."""
    logger = logging.getLogger("trainer")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    stream.addFilter(_NotOnConsole())
    logger.addHandler(stream)
    if rank == 0 and output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(output) / LOG)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def read_metrics(output: str | os.PathLike) -> list[dict]:
    """Every record of OUTPUT/metrics.jsonl (a torn last line from a killed run is ignored)."""
    path = Path(output) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(output: str | os.PathLike, step: int) -> int:
    """Drop records after `step` (work a resumed run redoes); returns how many were dropped."""
    path = Path(output) / METRICS
    if not path.is_file():
        return 0
    records = read_metrics(output)
    kept = [r for r in records if r.get("step", 0) <= step]
    dropped = len(records) - len(kept)
    if dropped or len(path.read_text().splitlines()) != len(records):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return dropped


class MetricsLogger:
    """Per-interval averages of the loss and throughput; eval results; the progress bar.

    `samples_per_step` is the global batch of one optimizer step (all ranks, all micro steps).
    """

    def __init__(
        self,
        output: str | os.PathLike,
        rank: int,
        total_steps: int,
        start_step: int,
        samples_per_step: int,
        tensorboard: bool = True,
        progress_bar: bool = True,
        config: Optional[Mapping[str, Any]] = None,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        self.rank = rank
        self.samples_per_step = samples_per_step
        self.total_steps = total_steps
        self.logger = logger
        self.writer = None
        self.bar = None
        self.file = None
        self.wandb = None
        self._reset(time.perf_counter())
        if rank != 0:
            return
        Path(output).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(output) / METRICS, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output) / "tensorboard"), purge_step=start_step + 1)
            if config is not None:
                # markdown: four leading spaces keep the dump preformatted
                self.writer.add_text("config", config_text(config).replace("\n  ", "\n    "), start_step)
        if config is not None and config.get("wandb"):
            self.wandb = start_wandb(config, Path(output))
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        # the step line goes to stderr too where no live bar shows the same
        self.step_line_on_console = self.bar is None or not sys.stderr.isatty()

    def _reset(self, now: float) -> None:
        self.t0 = now
        self.steps = 0
        self.loss_sum = 0.0
        self.loss_count = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation) is left out of samples/s and the ETA."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start

    def step(self, step: int, loss: float) -> None:
        """Record one optimizer step (its loss may be non-finite when the step was skipped)."""
        self.steps += 1
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, epoch: int, lr: float, extra: Mapping[str, Any] | None = None) -> dict | None:
        """Write one metrics record for the steps since the last flush."""
        now = time.perf_counter()
        if self.steps == 0:
            return None
        elapsed = max(now - self.t0, 1e-9)
        record = {
            "step": step,
            "epoch": epoch,
            "time": time.time(),
            "loss": self.loss_sum / self.loss_count if self.loss_count else float("nan"),
            "lr": lr,
            "samples_per_sec": self.steps * self.samples_per_step / elapsed,
        }
        eta = max(0, self.total_steps - step) * elapsed / self.steps
        record.update(extra or {})
        self._reset(now)
        if self.rank != 0:
            return record
        self.file.write(json.dumps(json_safe(record)) + "\n")
        if self.logger is not None:
            self.logger.info("step %d/%d  epoch %d  loss %.4f  lr %.6f  %.1f samples/s  ETA %s", step,
                             self.total_steps, epoch, record["loss"], lr, record["samples_per_sec"],
                             datetime.timedelta(seconds=round(eta)),
                             extra={"console": self.step_line_on_console})
        scalars = {f"train/{key}": value for key, value in record.items()
                   if key not in ("step", "epoch", "time") and isinstance(value, (int, float))
                   and math.isfinite(value)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({**scalars, "train/epoch": epoch}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                 sps=f"{record['samples_per_sec']:.0f}", refresh=False)
        return record

    def eval(self, step: int, epoch: float, results: Mapping[str, Mapping[str, Any]]) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, "epoch": epoch, "time": time.time(),
                                    "eval": json_safe(results)}) + "\n")
        scalars = eval_scalars(results)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def eval_scalars(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The curves of an evaluation: `eval/<target>/acc`, ..., `eval/<target>/tar@far=1e-04` for each FAR;
    counts that never change (pairs) are left out."""
    scalars = {}
    for name, res in results.items():
        for key, value in res.items():
            if key in CONSTANT_EVAL_KEYS:
                continue
            if isinstance(value, Mapping):  # tar_at_far: {far: tar}
                for far, tar in value.items():
                    if isinstance(tar, (int, float)) and math.isfinite(tar):
                        scalars[f"eval/{name}/tar@far={far}"] = tar
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                scalars[f"eval/{name}/{key}"] = value
    return scalars


def require_wandb():
    """The `wandb` module, or a ConfigError saying to install it (wandb=true without the package)."""
    try:
        import wandb
    except ImportError:
        from trainer.config import ConfigError

        raise ConfigError("wandb=true but the wandb package is not installed: `pip install wandb`, or set "
                          "wandb=false") from None
    return wandb


def start_wandb(config: Mapping[str, Any], output: Path):
    """A Weights & Biases run for this training run (config keys wandb_project, wandb_entity,
    wandb_run_name)."""
    return require_wandb().init(project=config.get("wandb_project") or None,
                                entity=config.get("wandb_entity") or None,
                                name=config.get("wandb_run_name") or output.name, dir=str(output),
                                config=json_safe(dict(config)))
