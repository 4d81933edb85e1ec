"""Multi-process (gloo, CPU) harness and reference computations for the Partial FC tests.

Workers live here, not in the test module, so that `torch.multiprocessing` spawn children import a
small module. Every worker writes its results with torch.save into a folder the test reads back.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.distributed import shard_range
from trainer.losses import ArcFace, CombinedMarginLoss, CosFace
from trainer.optim import RowSparseSGD
from trainer.partial_fc import PartialFC


class NormHead(torch.nn.Module):
    """A head that uses the embedding norms and returns an extra loss term (the contract that
    AdaFace / MagFace style heads rely on)."""

    needs_norms = True

    def __init__(self):
        super().__init__()
        self.arc = ArcFace(32.0, 0.3)

    def forward(self, cos, labels, norms):
        logits = self.arc(cos, labels) * (1.0 + 0.05 * norms)[:, None]
        return logits, 0.02 * ((norms - 3.0) ** 2).mean()


LOSSES: Dict[str, Callable[[], Any]] = {
    "arcface": lambda: ArcFace(64.0, 0.5),
    "cosface": lambda: CosFace(64.0, 0.4),
    "combined_filter": lambda: CombinedMarginLoss(64.0, 1.0, 0.3, 0.2, interclass_filtering_threshold=0.1),
    "sphere": lambda: CombinedMarginLoss(32.0, 1.35, 0.2, 0.1),
    "norm_head": NormHead,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, worker: Callable, *args) -> None:
    """Runs `worker(rank, world_size, port, *args)` in `world_size` fresh processes.

    A fork server that has imported torch once forks the ranks: importing torch in every spawned
    child costs seconds each on the 2-core CI machine, and forking this (threaded) pytest process
    itself would not be safe.
    """
    # torch._dynamo: the first optimizer built in a process imports it (seconds).
    mp.set_forkserver_preload(["torch", "torch._dynamo", "tests._pfc_helpers"])
    port = free_port()
    mp.start_processes(worker, args=(world_size, port) + args, nprocs=world_size, join=True,
                       start_method="forkserver")


def _init(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)  # the CI machine has 2 cores for up to 3 ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)


def problem(seed: int, n: int, c: int, d: int, dtype=torch.float64):
    """Embeddings [n, d] (norms around 3), labels [n] and a full classifier [c, d]."""
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(n, d, generator=g, dtype=torch.float64) * 0.8 + 0.3).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    weight = (torch.randn(c, d, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    return emb, labels, weight


def reference(case: Dict[str, Any], columns: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Single-process softmax cross-entropy of the margin logits over all classes (or `columns`)."""
    emb, labels, weight = problem(case["seed"], case["n"], case["c"], case["d"], case["dtype"])
    emb.requires_grad_(True)
    weight.requires_grad_(True)
    cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1))
    targets = labels
    if columns is not None:
        cos = cos[:, columns]
        targets = torch.searchsorted(columns, labels)
        assert torch.equal(columns[targets], labels), "a positive class was not sampled"
    head = LOSSES[case["loss"]]()
    if getattr(head, "needs_norms", False):
        logits, extra = head(cos, targets, norms=emb.norm(dim=1))
        loss = F.cross_entropy(logits, targets) + extra
    else:
        loss = F.cross_entropy(head(cos, targets), targets)
    loss.backward()
    return {"loss": loss.detach(), "emb_grad": emb.grad, "weight_grad": weight.grad}


def pfc_step(case: Dict[str, Any], rank: int, world_size: int) -> Dict[str, Any]:
    """This rank's share of one Partial FC forward/backward on `case`."""
    emb, labels, weight = problem(case["seed"], case["n"], case["c"], case["d"], case["dtype"])
    start, count = shard_range(case["n"], rank, world_size)  # uneven batches per rank too
    pfc = PartialFC(LOSSES[case["loss"]](), case["d"], case["c"], sample_rate=case.get("rate", 1.0),
                    embedding_grad_scale=case.get("grad_scale", 1.0), seed=case.get("pfc_seed", 0),
                    equal_batches=case.get("equal_batches", False))
    init_weight = pfc.weight.detach().clone()
    pfc.to(case["dtype"])
    pfc.load_full_weight(weight)
    mine = emb[start:start + count].clone().requires_grad_(True)
    loss = pfc(mine, labels[start:start + count])
    loss.backward()
    grad = pfc.weight.grad
    out = {
        "loss": loss.detach(),
        "emb_grad": mine.grad,
        "weight_grad": grad.to_dense() if grad.is_sparse else grad,
        "weight_grad_sparse": grad.is_sparse,
        "class_start": pfc.class_start,
        "num_local": pfc.num_local,
        "batch_start": start,
        "batch_count": count,
        "init_weight": init_weight,
    }
    if pfc.sampled_index is not None:
        out["sampled"] = pfc.sampled_index + pfc.class_start
        out["grad_rows"] = grad.coalesce().indices()[0] + pfc.class_start
    return out


def equality_worker(rank: int, world_size: int, port: int, out_dir: str, cases: Dict[str, Dict],
                    then: Optional[Callable] = None) -> None:
    """Runs every case and saves this rank's results; then (optionally) `then(rank, world, out_dir)`
    in the same process group (process start-up dominates these tests on a 2-core machine)."""
    _init(rank, world_size, port)
    try:
        results = {name: pfc_step(case, rank, world_size) for name, case in cases.items()}
        torch.save(results, os.path.join(out_dir, f"equality_w{world_size}_rank{rank}.pt"))
        if then is not None:
            then(rank, world_size, out_dir)
    finally:
        dist.destroy_process_group()


def load_rank_results(out_dir: str, world_size: int) -> List[Dict[str, Any]]:
    return [torch.load(Path(out_dir) / f"equality_w{world_size}_rank{r}.pt") for r in range(world_size)]


# ---- checkpoint / re-sharding ----------------------------------------------------------------

TRAIN = dict(c=11, d=8, n=7, seed=100)


def train_batch(step: int):
    emb, labels, _ = problem(TRAIN["seed"] + step, TRAIN["n"], TRAIN["c"], TRAIN["d"])
    return emb, labels


def build_trainable(kind: str) -> tuple[PartialFC, torch.optim.Optimizer]:
    """A float64 Partial FC and its optimizer; `kind` picks torch's AdamW or our row-sparse SGD."""
    pfc = PartialFC(ArcFace(16.0, 0.3), TRAIN["d"], TRAIN["c"], seed=5, equal_batches=False).double()
    if kind == "adamw":
        opt = torch.optim.AdamW(pfc.parameters(), lr=0.05, weight_decay=0.1)
    else:
        opt = RowSparseSGD(pfc.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    return pfc, opt


def train_steps(pfc: PartialFC, opt: torch.optim.Optimizer, steps: range, rank: int, world_size: int) -> None:
    for step in steps:
        emb, labels = train_batch(step)
        start, count = shard_range(TRAIN["n"], rank, world_size)
        loss = pfc(emb[start:start + count], labels[start:start + count])
        loss.backward()
        opt.step()
        opt.zero_grad()


def train_and_save(rank: int, world_size: int, out_dir: str) -> None:
    """3 steps on `world_size` ranks, then the full state (rank 0) and every rank's shard."""
    # equal_batches=True (the default) refuses uneven batches with a clear error on every rank at once
    pfc = PartialFC(ArcFace(16.0, 0.3), TRAIN["d"], TRAIN["c"])
    try:
        pfc(torch.randn(3 + rank, TRAIN["d"]), torch.zeros(3 + rank, dtype=torch.long))
        refused = ""
    except ValueError as e:
        refused = str(e)
    Path(out_dir, f"uneven_refused_{rank}.txt").write_text(refused)
    for kind in ("adamw", "sgd"):
        pfc, opt = build_trainable(kind)
        train_steps(pfc, opt, range(3), rank, world_size)
        full = pfc.full_weight_state(opt)
        if rank == 0:
            torch.save(full, os.path.join(out_dir, f"full_{kind}.pt"))
        else:
            assert full is None
        torch.save(pfc.local_state(opt), os.path.join(out_dir, f"shard_{kind}_{rank}.pt"))


def resume_one_step(rank: int, world_size: int, out_dir: str) -> None:
    """Loads the full state saved by another world size, runs step 4, saves its shard."""
    for kind in ("adamw", "sgd"):
        pfc, opt = build_trainable(kind)
        pfc.load_full_state(torch.load(os.path.join(out_dir, f"full_{kind}.pt")), opt)
        train_steps(pfc, opt, range(3, 4), rank, world_size)
        torch.save(pfc.local_state(opt), os.path.join(out_dir, f"resumed_{kind}_{rank}.pt"))


def sampled_pfc(num_classes: int = 1000, rate: float = 0.1, dim: int = 8, seed: int = 0) -> PartialFC:
    return PartialFC(CosFace(), dim, num_classes, sample_rate=rate, seed=seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom
