"""Runs a function on N CPU ranks (gloo, torch.multiprocessing spawn) for the heads' and modes' tests."""
from __future__ import annotations

import os
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, rendezvous: str, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    # A short timeout: a rank that fails must not leave the others waiting in a collective for 30 min.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn: Callable[..., Any], world: int, tmp_path: Path, *args) -> List[Any]:
    """`fn(rank, world, *args)` on `world` gloo processes; returns each rank's (picklable) result.

    `fn` must be a module-level function (spawned processes import it by name).
    """
    out_dir = tmp_path / f"ranks{world}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rendezvous = str(out_dir / "rendezvous")
    mp.start_processes(_entry, args=(world, rendezvous, str(out_dir), fn, args), nprocs=world,
                       join=True, start_method="spawn")
    results = []
    for rank in range(world):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results
