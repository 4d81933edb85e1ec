"""Workers of the checkpoint re-sharding test: a Partial FC with an uneven class split saved through
trainer/checkpoint.py on one world size and loaded on others (spawned ranks import this small module)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tests._pfc_helpers import TRAIN, _init, build_trainable, train_steps
from tests._trainer_helpers import FakeLoader
from trainer import checkpoint as ckpt

KINDS = ("adamw", "sgd")


def _parts(kind: str) -> dict:
    torch.manual_seed(0)
    pfc, opt_fc = build_trainable(kind)
    backbone = torch.nn.Linear(TRAIN["d"], TRAIN["d"])
    return dict(backbone=backbone, partial_fc=pfc, opt_fc=opt_fc,
                opt_backbone=torch.optim.SGD(backbone.parameters(), lr=0.1), scaler=None,
                loader=FakeLoader(num_classes=TRAIN["c"]))


def save_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """3 steps, then a checkpoint per optimizer kind in OUT/<kind>/."""
    _init(rank, world_size, port)
    try:
        for kind in KINDS:
            parts = _parts(kind)
            train_steps(parts["partial_fc"], parts["opt_fc"], range(3), rank, world_size)
            ckpt.save_checkpoint(os.path.join(out_dir, kind), ckpt.TrainState(step=3),
                                 cfg={"network": "tiny"}, network_kwargs={}, **parts)
    finally:
        dist.destroy_process_group()


def load_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Loads each checkpoint on this world size; saves this rank's rows as loaded."""
    _init(rank, world_size, port)
    try:
        for kind in KINDS:
            parts = _parts(kind)
            ckpt.load_checkpoint(ckpt.find_checkpoint(os.path.join(out_dir, kind)),
                                 device=torch.device("cpu"), **parts)
            torch.save(parts["partial_fc"].local_state(parts["opt_fc"]),
                       os.path.join(out_dir, f"loaded_{kind}_w{world_size}_r{rank}.pt"))
    finally:
        dist.destroy_process_group()
