"""Per-class state split over ranks and joined again (trainer/shard_state.py)."""
from __future__ import annotations

import pytest
import torch

from trainer.shard_state import assemble_full_state, slice_rows


def test_optimizer_state_resharding_helpers():
    full = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    parts = [slice_rows(full, 10, r, 3) for r in range(3)]
    assert [p.shape[0] for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError):
        slice_rows(full, 11, 0, 2)
    shard = {"num_classes": 10, "embedding_size": 3, "class_start": 0, "num_local": 4, "weight": parts[0]}
    gap = dict(shard, class_start=5, num_local=5, weight=full[5:])
    with pytest.raises(ValueError, match="tile"):
        assemble_full_state([shard, gap])
