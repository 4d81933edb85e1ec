"""The trainer's optimizers: SGD or AdamW for the backbone, and their row-sparse versions for Partial FC's
classifier (trainer/partial_fc.py's docstring says what a correct step of a sampled row is).

`RowSparseSGD` and `RowSparseAdamW` step only the rows that received a gradient: an unsampled row's weight,
momentum / Adam moments and step count are untouched (torch's SGD would keep applying a decaying momentum
to rows that were not sampled, and AdamW refuses sparse gradients). With a dense gradient they step every
row and equal torch's SGD / AdamW.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch

from trainer.config import Config, ConfigError


def build_optimizer(cfg: Config, params: Iterable[torch.nn.Parameter], row_sparse: bool = False
                    ) -> torch.optim.Optimizer:
    """SGD or AdamW. `row_sparse` (the classifier): rows Partial FC did not sample are left untouched,
    their momentum / Adam moments included (the module docstring says why torch's own would not do)."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        cls = RowSparseSGD if row_sparse else torch.optim.SGD
        return cls(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        cls = RowSparseAdamW if row_sparse else torch.optim.AdamW
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


# ---- optimizers that step only the rows that received a gradient ---------------------------------

def _rows_and_grad(p: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(row indices, their gradient rows); indices None means every row (dense gradient)."""
    grad = p.grad
    if not grad.is_sparse:
        return None, grad
    if grad.sparse_dim() != 1:
        raise ValueError("row-sparse optimizers need gradients sparse in the first dimension only")
    if not grad.is_coalesced():
        # Partial FC marks one backward's gradient coalesced (its rows are sorted and unique); accumulated
        # micro-batches repeat rows, which coalesce() sums (a sort, a [k, D] copy and a host sync for k).
        grad = grad.coalesce()
    return grad.indices()[0], grad.values()


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Base: per-row state tensors shaped like the parameter plus a per-row step count.

    A sparse gradient's rows are gathered (weight and state), updated in place, and written back; a
    dense gradient updates every row in place, as torch's optimizers do.
    """

    def state_names(self, group: dict) -> tuple:
        """Names of the [rows, D] state tensors this optimizer keeps for a parameter of `group`."""
        raise NotImplementedError

    def _row_state(self, p: torch.Tensor, names: tuple) -> Dict[str, torch.Tensor]:
        state = self.state[p]
        if "row_step" not in state:
            # The step count is per row: a row's bias correction / momentum start depends on how often
            # *it* was updated. Stored in the parameter's dtype so that load_state_dict moves it along.
            # A state taken over from torch's optimizer has one scalar `step` for all rows.
            prior = state.pop("step", None)
            start = float(prior) if prior is not None else 0.0
            state["row_step"] = torch.full((p.shape[0],), start, dtype=p.dtype, device=p.device)
        for name in names:
            if name not in state:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = _rows_and_grad(p)
                if rows is not None and rows.numel() == 0:
                    continue
                names = self.state_names(group)
                state = self._row_state(p, names)
                grad = grad.to(p.dtype)
                if rows is None:
                    steps = state["row_step"].add_(1)
                    self._update(group, p, grad, steps, {n: state[n] for n in names})
                    continue
                weight = p.index_select(0, rows)
                steps = state["row_step"].index_select(0, rows).add_(1)
                tensors = {n: state[n].index_select(0, rows) for n in names}
                self._update(group, weight, grad, steps, tensors)
                p.index_copy_(0, rows, weight)
                state["row_step"].index_copy_(0, rows, steps)
                for name in names:
                    state[name].index_copy_(0, rows, tensors[name])
        return loss

    def _update(self, group: dict, weight: torch.Tensor, grad: torch.Tensor, steps: torch.Tensor,
                tensors: Dict[str, torch.Tensor]) -> None:
        """Updates `weight` and `tensors` (rows of the state) in place; `steps` counts this step."""
        raise NotImplementedError


class RowSparseSGD(_RowSparseOptimizer):
    """SGD (torch.optim.SGD's update: coupled weight decay, optional Nesterov) applied per row.

    Rows absent from a sparse gradient are not touched at all; a row's momentum buffer starts as its
    first gradient, as in torch.
    """

    def __init__(self, params: Iterable, lr: float = 0.1, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr} momentum={momentum} weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def state_names(self, group: dict) -> tuple:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, group, weight, grad, steps, tensors):
        wd, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
        if momentum == 0:
            weight.add_(grad if wd == 0 else grad.add(weight, alpha=wd), alpha=-group["lr"])
            return
        buf = tensors["momentum_buffer"]
        # torch: d_p = grad + wd * w; buf = momentum * buf + (1 - dampening) * d_p, fused here so that
        # d_p is never materialised. A row's buffer is zero until its first step, so with no dampening
        # this gives buf = d_p on that step, torch's start; with dampening those rows are set below.
        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        if wd != 0:
            buf.add_(weight, alpha=wd * (1 - dampening))
        if dampening != 0 or group["nesterov"]:
            d_p = grad if wd == 0 else grad.add(weight, alpha=wd)
            if dampening != 0:
                buf.copy_(torch.where((steps == 1)[:, None], d_p, buf))  # a mask: no host sync
            if group["nesterov"]:
                weight.add_(d_p.add(buf, alpha=momentum), alpha=-group["lr"])
                return
        weight.add_(buf, alpha=-group["lr"])


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW (decoupled weight decay, torch.optim.AdamW's update) with a bias correction per row."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def state_names(self, group: dict) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, group, weight, grad, steps, tensors):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        exp_avg, exp_avg_sq = tensors["exp_avg"], tensors["exp_avg_sq"]
        weight.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps64 = steps.double()
        bias1 = (1 - beta1 ** steps64).to(weight.dtype)
        bias2_sqrt = (1 - beta2 ** steps64).sqrt().to(weight.dtype)
        # torch: w -= lr / bias1 * exp_avg / (sqrt(v) / sqrt(bias2) + eps), with per-row biases here.
        denom = exp_avg_sq.sqrt().div_(bias2_sqrt[:, None]).add_(group["eps"])
        weight.sub_(exp_avg.div(denom).mul_((lr / bias1)[:, None]))
