"""Early stopping on the validation accuracy (`early_stop_patience`, the CrossScan hybrid's protocol).

The run stops when `patience` evaluations in a row (every `verbose` optimizer steps, on `val_targets`) have
not raised the mean accuracy over the targets above its best so far. The report stops after 20 epochs
without a better validation accuracy: with `verbose` set to one epoch's steps and a validation split as the
target (`pipeline pack --holdout K` holds K images of every identity out and writes their pairs to
`holdout_pairs.bin`), `early_stop_patience=20` is that rule. Rank 0 evaluates and decides; every rank learns
the decision through one all-reduce. The count starts afresh in a resumed run. The run then ends as any
run does (last checkpoint, model.pt: the weights at the stop, not the best ones).
"""
from __future__ import annotations

from typing import Optional

import torch

from trainer.config import ConfigError
from trainer.distributed import all_reduce_


class EarlyStopping:
    """`update(results)` after each evaluation: True when `patience` of them in a row did not improve."""

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.best: Optional[float] = None
        self.bad = 0

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

    def should_stop(self, results: Optional[dict], device: torch.device) -> bool:
        """Collective: rank 0's decision on every rank."""
        flag = torch.tensor(float(self.update(results)), device=device)
        return all_reduce_(flag, "max").item() > 0


def build_early_stopping(cfg) -> Optional[EarlyStopping]:
    """The config's stopper, or None (`early_stop_patience` 0); refuses a patience nothing would count."""
    if cfg.early_stop_patience <= 0:
        return None
    if not cfg.val_targets or cfg.verbose <= 0:
        raise ConfigError("early_stop_patience counts evaluations: it needs val_targets and verbose > 0 "
                          "(evaluate every `verbose` steps)")
    return EarlyStopping(cfg.early_stop_patience)
