"""A plain linear classifier, W x + b on the raw embedding (the CrossScan hybrid's classifier head).

Partial FC keeps its class rows W (sharded by rows over the ranks, sampled as ever); a head that declares
`needs_raw_logits = True` is given `x @ W.T` (neither x nor W normalised) instead of the cosines, and this
one adds its bias. The bias is one value per class, held as a per-class parameter of this rank's rows
(`per_class_state`: checkpoints gather and re-shard it like W). Only with `sample_rate == 1`: a sampled
step would give the bias a dense gradient with zeros for the unsampled rows, which the optimizer would
step (Partial FC's rule is that unsampled rows do not move), so Partial FC refuses it. No scale, no margin: the logits go straight into Partial FC's softmax cross-entropy,
which `class_weighted_ce` weights per class (trainer/class_weights.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from trainer.distributed import get_rank, get_world_size, shard_range
from trainer.heads.registry import Head, register_head
from trainer.losses import at_least_fp32


@register_head("linear")
class LinearHead(Head):
    needs_raw_logits = True
    per_class_state = ("bias",)

    def __init__(self, num_classes: Optional[int] = None) -> None:
        super().__init__()
        if num_classes is None or num_classes < 1:
            raise ValueError(f"the linear head needs num_classes >= 1, got {num_classes}")
        _, num_local = shard_range(int(num_classes), get_rank(), get_world_size())
        self.num_classes = int(num_classes)
        self.bias = nn.Parameter(torch.zeros(num_local))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, local_rows={self.bias.shape[0]}"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits` [B, C_local] = x @ W.T of this rank's rows; `labels` unused (no margin)."""
        return at_least_fp32(logits) + at_least_fp32(self.bias)
