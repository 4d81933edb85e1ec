"""`build_train_loader`: the reader the trainer uses, DALI by default, the PyTorch path on request."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .augment import AugmentConfig
from .dali_reader import DaliTrainLoader
from .dataset import TorchTrainLoader

TrainLoader = Union[DaliTrainLoader, TorchTrainLoader]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_train_loader(data_dir: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, device: str | torch.device = "cpu", backend: str = "dali",
                       num_threads: int = 2, augment: Optional[AugmentConfig | dict] = None,
                       drop_last: bool = True, return_label_vectors: bool = False) -> TrainLoader:
    """One reader per rank: `shard_id` = rank, `num_shards` = world size; `device='cuda'` decodes on the GPU
    (DALI `mixed`), `cpu` on the CPU. Every rank yields `steps_per_epoch` batches per epoch."""
    if backend == "dali":
        if not dali_available():
            raise RuntimeError("backend 'dali' needs nvidia-dali (pip install nvidia-dali-cuda120); "
                               "or set backend='torch'")
        return DaliTrainLoader(data_dir, batch_size, rank, world_size, seed, device, num_threads, augment,
                               drop_last, return_label_vectors=return_label_vectors)
    if backend == "torch":
        return TorchTrainLoader(data_dir, batch_size, rank, world_size, seed, device, num_threads, augment,
                                drop_last, return_label_vectors=return_label_vectors)
    raise ValueError(f"backend must be 'dali' or 'torch', not {backend!r}")
