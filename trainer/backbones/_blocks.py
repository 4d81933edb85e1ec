"""Running a backbone's residual or transformer blocks in turn, with optional activation recomputation."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """`x` through `blocks` one after another. With `recompute` (and autograd on), each block's
    activations are recomputed in the backward pass instead of stored: the memory of one block for about
    a third more compute, which is what lets a 100-200 layer network take a large batch per GPU."""
    recompute = recompute and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return x
