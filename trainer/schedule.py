"""Learning-rate schedule: linear warmup, then polynomial or cosine decay to `min_lr`.

The rate is a pure function of the optimizer step, so a resumed run needs nothing but its step count
to continue the schedule exactly (no scheduler state in the checkpoint to get out of sync).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("poly", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "poly"
    power: float = 2.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lr_schedule must be one of {KINDS}, got {self.kind!r}")
        if self.total_steps < 1:
            raise ValueError(f"the schedule needs at least one step, got total_steps={self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in "
                             f"[0, total_steps={self.total_steps}]")

    def lr(self, step: int) -> float:
        """The rate for optimizer step `step` (0-based: the first update uses lr(0))."""
        if step < self.warmup_steps:
            # (step + 1): the first update already moves; insightface's warmup starts at exactly 0.
            return self.base_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.base_lr
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "poly":
            shape = (1.0 - t) ** self.power
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr + (self.base_lr - self.min_lr) * shape

    def apply(self, optimizers: list[torch.optim.Optimizer], step: int) -> float:
        """Set every param group's rate for `step`; a group's `lr_scale` (default 1) multiplies it."""
        lr = self.lr(step)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
