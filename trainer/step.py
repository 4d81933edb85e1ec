"""One optimizer step of the trainer: micro batches, gradient accumulation, AMP, clipping, and the
all-rank skip of a non-finite step (trainer/main.py's loop and bench/train.py run it)."""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from trainer.distributed import all_reduce_

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def partial_fc_loss(model: torch.nn.Module, partial_fc: torch.nn.Module, batch: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, dict]:
    """The plain step's loss: Partial FC's margin softmax of the batch's embeddings."""
    images, labels = batch[0], batch[1]
    return partial_fc(model(images), labels), {}


def back_off(scaler: torch.amp.GradScaler) -> None:
    """Ends a skipped fp16 step: the scale times the backoff factor and the growth tracker back to 0, as
    GradScaler.update does when it found an inf itself. Here the decision is all ranks' (train_step), and
    `update(new_scale)` would keep the tracker: the scale could grow again before growth_interval clean
    steps. Reads the scale back (host syncs), on skipped steps only."""
    state = scaler.state_dict()
    state["scale"] *= scaler.get_backoff_factor()
    state["_growth_tracker"] = 0
    scaler.update(state["scale"])  # ends the iteration: forgets this step's unscale_ records
    scaler.load_state_dict(state)


# The copies of the buffers a skipped step puts back, kept between steps: one foreach copy per step instead
# of a fresh clone of every BatchNorm statistic (hundreds of small allocations and kernels in an r100).
_snapshots: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _buffer_snapshot(owner: torch.nn.Module, buffers: list) -> list:
    """`buffers`' values now, in tensors reused from the last step while the buffers are the same ones."""
    key = [(id(b), b.shape, b.dtype, b.device) for b in buffers]
    cached = _snapshots.get(owner)
    if cached is None or cached[0] != key:
        cached = (key, [b.detach().clone() for b in buffers])
        _snapshots[owner] = cached
    elif buffers:
        with torch.no_grad():
            torch._foreach_copy_(cached[1], buffers)
    return cached[1]


def micro_batches(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches across epoch boundaries (a gradient-accumulation step may straddle one)."""
    while True:
        yield from loader


@dataclass
class StepResult:
    loss: float  # mean loss over the micro steps (NaN/inf when non-finite)
    skipped: bool  # the optimizer did not step (non-finite loss or gradient on some rank)
    loss_finite: bool
    grad_norm: float  # L2 norm of the backbone's gradient before clipping
    parts: dict = field(default_factory=dict)  # the objective's logged parts, mean over the micro steps


def train_step(
    backbone: torch.nn.Module,
    partial_fc: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizers: Sequence[torch.optim.Optimizer],
    scaler: Optional[torch.amp.GradScaler],
    amp_dtype: Optional[torch.dtype],
    clip_grad_norm: float,
    objective: Callable = partial_fc_loss,
) -> StepResult:
    """One optimizer step over `len(batches)` micro batches, their gradients averaged.

    `objective(backbone, partial_fc, batch) -> (loss, parts)` is a training mode's loss of one micro
    batch (trainer.modes); `partial_fc` is the mode's head (a Partial FC, or the mode's own module).

    Inner micro steps run under DDP's no_sync, so the backbone's gradients are all-reduced once. The step
    is skipped on every rank when any rank saw a non-finite loss or gradient (a flag is all-reduced), so
    the ranks never diverge.
    """
    device = batches[0][0].device
    n = len(batches)
    # A skipped step must leave no trace, but the forward pass already fed its (maybe NaN) batch into
    # BatchNorm's running statistics and any head statistics: keep a copy to put back.
    buffers = [b for m in (backbone, partial_fc) for b in m.buffers()]
    saved_buffers = _buffer_snapshot(backbone, buffers)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    parts_sum: dict = {}
    for i, batch in enumerate(batches):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not isinstance(backbone, DistributedDataParallel) \
            else backbone.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, parts = objective(backbone, partial_fc, batch)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value / n
            # Dividing by n makes the accumulated gradient the mean over the n micro batches.
            scaled = loss / n
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
    loss_mean = loss_sum / n

    # An optimizer whose parameters got no gradient this step (AAFace's soft-biometric stage never calls
    # the Partial FC) is left out: GradScaler.step would raise "No inf checks were recorded" for it.
    stepping = [opt for opt in optimizers if any(p.grad is not None for g in opt.param_groups
                                                  for p in g["params"])]
    if scaler is not None:
        for opt in stepping:
            scaler.unscale_(opt)
    backbone_params = [p for p in backbone.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(
        backbone_params, clip_grad_norm if clip_grad_norm > 0 else float("inf"), foreach=True)
    # With sample_rate < 1 the classifier's gradient is sparse (the sampled rows only). Its values
    # uncoalesced: finite iff the coalesced ones are (short of an fp32 overflow in the sum), and
    # coalesce() would cost a host sync.
    fc_grads = [p.grad._values() if p.grad.is_sparse else p.grad
                for p in partial_fc.parameters() if p.grad is not None]
    fc_finite = torch.stack([torch.isfinite(g).all() for g in fc_grads]).all() if fc_grads \
        else torch.ones((), dtype=torch.bool, device=device)
    flags = torch.stack([
        (~torch.isfinite(loss_mean)).to(torch.float32),
        (~(torch.isfinite(grad_norm).to(device) & fc_finite)).to(torch.float32),
    ])
    all_reduce_(flags, "max")
    # The one host sync of the step: everything the host needs, read at once.
    bad_loss, bad_grad, loss_value, norm_value = torch.stack(
        [flags[0], flags[1], loss_mean, grad_norm.to(device).float()]).tolist()
    loss_finite = bad_loss == 0
    skipped = bad_loss > 0 or bad_grad > 0

    if skipped:
        with torch.no_grad():
            if buffers:
                torch._foreach_copy_(buffers, saved_buffers)
        if scaler is not None and stepping:
            back_off(scaler)
    else:
        # Every rank's gradients are known finite (the flags above): step directly. GradScaler.step would
        # read each optimizer's own inf flag back to the host (a sync per optimizer) to decide the same.
        for opt in stepping:
            opt.step()
        if scaler is not None and stepping:
            scaler.update()  # no inf recorded on any rank: every rank grows its scale alike
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return StepResult(loss_value, skipped, loss_finite, norm_value, parts_sum)
