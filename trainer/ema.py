"""An exponential moving average of the backbone's weights, evaluated and exported in its place.

On small or noisy data the weights of the last steps wander around a flat region; their running mean
verifies better than any single point of the walk (Polyak averaging; timm's ModelEma, YOLO's EMA).
Every rank holds the same copy (DDP keeps the backbones equal), so it is checkpointed like SST's
replicated modules and follows a resume on any world size.
"""
from __future__ import annotations

import copy

import torch


class ModelEMA(torch.nn.Module):
    """`module` is the average; `update(model)` after each optimizer step that was not skipped.

    The decay ramps up as (1 + n) / (10 + n) over the first updates, so that the average does not
    remember the random initialisation (the same ramp as timm's and YOLO's EMA).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        ema_float, new_float = [], []
        for ema_t, new_t in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_t.dtype.is_floating_point:
                ema_float.append(ema_t)
                new_float.append(new_t.detach())
            else:  # BatchNorm's num_batches_tracked: a count, not a weight
                ema_t.copy_(new_t)
        # Parameters and BatchNorm's running statistics alike: the statistics must belong to the
        # averaged weights, not to the last ones.
        torch._foreach_lerp_(ema_float, new_float, 1.0 - d)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
