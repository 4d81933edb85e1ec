"""Learning-rate schedule: linear warmup, then polynomial or cosine decay to `min_lr`, or step decay.

"step" is the recipe of FaceX-Zoo and of most face papers (torch's MultiStepLR per epoch): the rate is
multiplied by `gamma` at each milestone. Milestones are optimizer steps here; `build_schedule` turns a
config's `lr_steps` (epochs, counted from the start of training, warmup included) into steps.

The rate is a pure function of the schedule's position, so a resumed run needs nothing but its count of
samples seen to continue the schedule exactly (no scheduler state in the checkpoint to get out of sync).

`LRSchedule` is written in optimizer steps of the run that builds it. A run measures its progress in
samples (`SampleClock`): a resume on another world size or batch takes more or fewer samples per step, and
the step count it inherits would land at another point of the curve (a 2-rank run killed at step 15
resumed on 1 rank restarted its warmup). The position `samples_seen / samples_per_step` in this run's
steps is the same fraction of the schedule whatever world size saw those samples.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Tuple

import torch

KINDS = ("poly", "cosine", "step")


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "poly"
    power: float = 2.0
    min_lr: float = 0.0
    milestones: Tuple[int, ...] = ()  # "step": optimizer steps at which the rate is multiplied by gamma
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lr_schedule must be one of {KINDS}, got {self.kind!r}")
        if self.total_steps < 1:
            raise ValueError(f"the schedule needs at least one step, got total_steps={self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in "
                             f"[0, total_steps={self.total_steps}]")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.kind == "step":
            if not self.milestones:
                raise ValueError("lr_schedule 'step' needs lr_steps (the epochs at which the rate drops)")
            if list(self.milestones) != sorted(set(self.milestones)) or self.milestones[0] < 1:
                raise ValueError(f"lr_steps must be increasing and positive, got milestones {self.milestones}")
            if not 0.0 < self.gamma < 1.0:
                raise ValueError(f"lr_gamma must lie in (0, 1), got {self.gamma}")

    def lr(self, step: float) -> float:
        """The rate for optimizer step `step` (0-based: the first update uses lr(0)); a fractional step
        is a position between two steps (a resume on another global batch)."""
        if step < self.warmup_steps:
            # (step + 1): the first update already moves; insightface's warmup starts at exactly 0.
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            # MultiStepLR: from milestone m on (step >= m) the rate has been multiplied by gamma once more.
            return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, step)
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.base_lr
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "poly":
            shape = (1.0 - t) ** self.power
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr + (self.base_lr - self.min_lr) * shape

    def apply(self, optimizers: list[torch.optim.Optimizer], step: float) -> float:
        """Set every param group's rate for `step`; a group's `lr_scale` (default 1) multiplies it."""
        lr = self.lr(step)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def epochs_to_steps(epochs: Sequence[float], steps_per_epoch: float) -> Tuple[int, ...]:
    """Milestones in epochs -> optimizer steps: the first step of epoch e is round(e * steps_per_epoch)."""
    return tuple(round(e * steps_per_epoch) for e in epochs)


def build_schedule(cfg: Mapping[str, Any], steps_per_epoch: float) -> LRSchedule:
    """The schedule of a training config (`lr`, `num_epoch`, `warmup_epoch`, `lr_schedule`, `lr_power`,
    `min_lr`, `lr_steps`, `lr_gamma`), with `steps_per_epoch` optimizer steps per epoch.

    The schedule spans num_epoch; max_steps only stops the run (so a run stopped early and resumed with
    a larger max_steps follows the same schedule as one that never stopped).
    """
    total = max(1, math.ceil(cfg["num_epoch"] * steps_per_epoch))
    warmup = min(total, round(cfg["warmup_epoch"] * steps_per_epoch))
    bad = [e for e in cfg.get("lr_steps", ()) if not 0 < e < cfg["num_epoch"]]
    if cfg["lr_schedule"] == "step" and bad:
        raise ValueError(f"lr_steps {tuple(cfg['lr_steps'])}: {bad} not inside (0, num_epoch={cfg['num_epoch']})")
    milestones = epochs_to_steps(cfg.get("lr_steps", ()), steps_per_epoch) if cfg["lr_schedule"] == "step" else ()
    return LRSchedule(cfg["lr"], total, warmup, cfg["lr_schedule"], cfg["lr_power"], cfg["min_lr"],
                      milestones, cfg.get("lr_gamma", 0.1))


@dataclass(frozen=True)
class SampleClock:
    """A run's progress in samples, and where that puts it in this run's optimizer steps and epochs.

    `samples_per_step`: the global batch of one optimizer step (batch_size x gradient_acc x world size).
    `samples_per_epoch`: what the reader yields per epoch on all ranks together (steps_per_epoch x
    batch_size x world size; it differs between world sizes by less than one global batch, drop_last)."""

    samples_per_step: int
    samples_per_epoch: int

    def __post_init__(self) -> None:
        if self.samples_per_step < 1 or self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_step={self.samples_per_step} and samples_per_epoch="
                             f"{self.samples_per_epoch} must be >= 1")

    @property
    def steps_per_epoch(self) -> float:
        return self.samples_per_epoch / self.samples_per_step

    def position(self, samples_seen: int) -> float:
        """The schedule's position (in this run's optimizer steps) after `samples_seen` samples."""
        return samples_seen / self.samples_per_step

    def epoch(self, samples_seen: int) -> float:
        return samples_seen / self.samples_per_epoch

    def schedule(self, cfg: Mapping[str, Any]) -> LRSchedule:
        """The config's schedule over `num_epoch` epochs, in this run's optimizer steps."""
        return build_schedule(cfg, self.steps_per_epoch)

    def steps_left(self, samples_seen: int, num_epoch: float) -> int:
        """Optimizer steps until `num_epoch` epochs of samples are seen (0 when they are)."""
        return max(0, math.ceil((num_epoch * self.samples_per_epoch - samples_seen) / self.samples_per_step))
