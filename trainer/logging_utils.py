"""What a run reports: `metrics.jsonl` (DESIGN.md section 3), TensorBoard scalars, a text log, tqdm on rank 0.

Only rank 0 writes files. Every logged loss is already the global mean (Partial FC all-reduces it), so
nothing is reduced here.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

from pipeline.atomic import atomic_write_bytes, json_safe

METRICS = "metrics.jsonl"
LOG = "training.log"


def setup_logging(output: str | os.PathLike | None, rank: int) -> logging.Logger:
    """The `trainer` logger: rank 0 logs INFO to stderr and OUTPUT/training.log, other ranks warnings only."""
    logger = logging.getLogger("trainer")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
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
    ) -> None:
        self.rank = rank
        self.samples_per_step = samples_per_step
        self.writer = None
        self.bar = None
        self.file = None
        self._reset(time.perf_counter())
        if rank != 0:
            return
        Path(output).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(output) / METRICS, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output) / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def _reset(self, now: float) -> None:
        self.t0 = now
        self.steps = 0
        self.loss_sum = 0.0
        self.loss_count = 0

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
            "loss": self.loss_sum / self.loss_count if self.loss_count else float("nan"),
            "lr": lr,
            "samples_per_sec": self.steps * self.samples_per_step / elapsed,
        }
        record.update(extra or {})
        self._reset(now)
        if self.rank != 0:
            return record
        self.file.write(json.dumps(json_safe(record)) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                 sps=f"{record['samples_per_sec']:.0f}", refresh=False)
        return record

    def eval(self, step: int, results: Mapping[str, Mapping[str, Any]]) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, "eval": json_safe(results)}) + "\n")
        if self.writer is not None:
            for name, res in results.items():
                for key, value in res.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.writer.add_scalar(f"eval/{name}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
