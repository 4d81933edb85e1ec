"""Early stopping on the validation accuracy (`early_stop_patience`, the CrossScan hybrid's protocol).

The run stops when `patience` evaluations in a row (every `verbose` optimizer steps) have not raised the
validation accuracy above its best so far, and model.pt then holds the weights of the best evaluation (the
last checkpoint keeps the weights at the stop, to resume from). What is watched, `early_stop_metric`:

- "val_targets": the mean pair verification accuracy over `val_targets` (e.g. `holdout_pairs.bin`, written
  by `pipeline pack --holdout K`);
- "closed_set": the report's criterion, top-1 classification accuracy of the run's own classifier (Partial
  FC's rows; W x + b with the linear head) on the validation split, the "val" shards of
  `pipeline pack --val-split F` (trainer/eval/closed_set.py). The classifier is gathered to rank 0 (a
  collective: every rank takes part), which embeds the validation images.

The report stops after 20 epochs without a better validation accuracy: with `verbose` set to one epoch's
steps, `early_stop_patience=20` is that rule. Rank 0 evaluates and decides; every rank learns the decision
through one all-reduce. The count starts afresh in a resumed run.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from trainer.config import ConfigError
from trainer.distributed import all_reduce_, gather_to, get_rank

METRICS = ("val_targets", "closed_set")
logger = logging.getLogger("trainer")


class EarlyStopping:
    """`update(results)` after each evaluation: True when `patience` of them in a row did not improve."""

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.best: Optional[float] = None
        self.bad = 0
        self.stopped = False
        self.best_state: Optional[dict] = None  # rank 0: the model's weights at the best evaluation

    def update(self, results: Optional[dict]) -> bool:
        """`results`: {target: {"acc": ...}} of this evaluation (None on the ranks that did not evaluate)."""
        if not results:
            return False
        score = sum(float(r["acc"]) for r in results.values()) / len(results)
        if self.best is None or score > self.best:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def score(self, results: Optional[dict], model: torch.nn.Module, head: torch.nn.Module) -> Optional[dict]:
        """What this evaluation is judged on: the val targets' results (rank 0's, None elsewhere)."""
        return results

    def should_stop(self, results: Optional[dict], device: torch.device, model: Optional[torch.nn.Module] = None,
                    head: Optional[torch.nn.Module] = None) -> bool:
        """Collective: rank 0's decision on every rank. With `model` (what model.pt is written from), rank 0
        keeps a CPU copy of its weights whenever the score is a new best."""
        results = self.score(results, model, head)
        stop = self.update(results)
        if results and self.bad == 0 and model is not None:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        flag = torch.tensor(float(stop), device=device)
        self.stopped = all_reduce_(flag, "max").item() > 0
        return self.stopped

    def restore_best(self, model: torch.nn.Module) -> None:
        """After a stop: the best evaluation's weights back into `model` (where they were kept: rank 0)."""
        if self.stopped and self.best_state is not None:
            model.load_state_dict(self.best_state)
            logger.info("model.pt: the weights of the best evaluation (accuracy %.4f)", self.best)


class ClosedSetStopping(EarlyStopping):
    """Judges each evaluation on the closed-set accuracy of the run's classifier on the "val" shards."""

    def __init__(self, patience: int, data_dir: str, batch_size: int):
        super().__init__(patience)
        self.data_dir, self.batch_size = data_dir, batch_size

    def score(self, results: Optional[dict], model: torch.nn.Module, head: torch.nn.Module) -> Optional[dict]:
        from trainer.eval.closed_set import embedded_closed_set_accuracy

        weight = gather_to(head.weight.detach().float(), 0)  # collective: every rank sends its rows
        bias_param = getattr(getattr(head, "margin_loss", None), "bias", None)
        bias = gather_to(bias_param.detach().float(), 0) if isinstance(bias_param, torch.Tensor) else None
        if get_rank() != 0:
            return None
        device = next(model.parameters()).device
        res = embedded_closed_set_accuracy(model, weight.cpu().numpy(), None if bias is None else bias.cpu().numpy(),
                                           self.data_dir, device, self.batch_size, val=True, workers=0)
        logger.info("validation split: closed-set acc=%.4f (balanced %.4f, %d images)", res["acc"],
                    res["balanced_acc"], res["n"])
        return {"val_closed_set": res}


def build_early_stopping(cfg) -> Optional[EarlyStopping]:
    """The config's stopper, or None (`early_stop_patience` 0); refuses a patience nothing would count."""
    if cfg.early_stop_metric not in METRICS:
        raise ConfigError(f"early_stop_metric must be one of {', '.join(METRICS)}, got {cfg.early_stop_metric!r}")
    if cfg.early_stop_patience <= 0:
        return None
    if cfg.verbose <= 0:
        raise ConfigError("early_stop_patience counts evaluations: it needs verbose > 0 (evaluate every "
                          "`verbose` steps)")
    if cfg.early_stop_metric == "closed_set":
        from pipeline.manifest import load_manifest

        if cfg.mode == "sst":
            raise ConfigError("early_stop_metric 'closed_set' scores the run's classifier: mode 'sst' has none")

        if not load_manifest(cfg.data).get("val", {}).get("shards"):
            raise ConfigError(f"early_stop_metric 'closed_set' evaluates the validation split: {cfg.data} has "
                              f"none; pack it with `python -m pipeline pack ... --val-split 0.1`")
        return ClosedSetStopping(cfg.early_stop_patience, cfg.data, cfg.val_batch_size)
    if not cfg.val_targets:
        raise ConfigError("early_stop_patience counts evaluations: it needs val_targets and verbose > 0 "
                          "(evaluate every `verbose` steps)")
    return EarlyStopping(cfg.early_stop_patience)
