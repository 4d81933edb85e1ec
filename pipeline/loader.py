"""`TrainLoader`, what the trainer asks of a reader, and `build_train_loader`: DALI by default, nvJPEG or the
PyTorch path on request. SST's `trainer.modes.sst.IdentityPairLoader` is a TrainLoader too."""
from __future__ import annotations

import os
from typing import Iterator, Optional, Protocol, runtime_checkable

import torch

from .augment import AugmentConfig
from .dali_reader import DaliTrainLoader
from .dataset import TorchTrainLoader
from .nvjpeg_reader import NvjpegTrainLoader


@runtime_checkable
class TrainLoader(Protocol):
    """Every member here is used by trainer/main.py, trainer/checkpoint.py or a mode's `bind_data`.

    Iterating runs what is left of the current epoch, then advances `epoch` (the trainer watches it for
    epoch ends); a batch is a tuple of tensors on the loader's device whose layout the mode reads:
    `(images, identities)`, `(images, identities, label_vectors)` (AAFace), `(images1, images2,
    identities)` (SST)."""

    batch_size: int  # per rank
    rank: int
    world_size: int
    num_classes: int
    steps_per_epoch: Optional[int]  # batches per epoch, equal on every rank; None only without drop_last
    epoch: int
    # records skipped so far (this rank): failed pipeline.record_check or did not decode; never trained on
    skipped_records: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...

    def __len__(self) -> int:
        """Batches per epoch on this rank (of an epoch resumed under another partition: what is left)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


BACKENDS = ("dali", "nvjpeg", "torch")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_train_loader(data_dir: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, device: str | torch.device = "cpu", backend: str = "dali",
                       num_threads: int = 2, augment: Optional[AugmentConfig | dict] = None,
                       drop_last: bool = True, return_label_vectors: bool = False,
                       dali_threads: int = 0, dali_hw_decoder_load: float = 0.65,
                       dali_dont_use_mmap: bool = False, dali_decode_check: bool = False) -> TrainLoader:
    """One reader per rank: `shard_id` = rank, `num_shards` = world size; `device='cuda'` decodes on the GPU
    (DALI `mixed`, or nvJPEG through torchvision), `cpu` on the CPU. Every rank yields `steps_per_epoch`
    batches per epoch. `num_threads`: torch reader workers, nvjpeg host threads, and DALI's threads unless
    `dali_threads` > 0; `dali_hw_decoder_load`: DALI's share of images for the hardware JPEG decoder (A100,
    H100); `dali_dont_use_mmap`: DALI reads the shards instead of mapping them (network file systems);
    `dali_decode_check`: DALI's record check decodes every image once (cached), so that DALI skips exactly
    the records the other readers skip, corrupt pixel data included (the default checks headers only)."""
    if backend == "dali":
        if not dali_available():
            raise RuntimeError("backend 'dali' needs nvidia-dali (nvidia-dali-cuda120 or -cuda130, for "
                               "torch's CUDA major: scripts/setup.sh); or set backend='nvjpeg' or 'torch'")
        threads = dali_threads or num_threads
        return DaliTrainLoader(data_dir, batch_size, rank, world_size, seed, device, threads, augment, drop_last,
                               hw_decoder_load=dali_hw_decoder_load, return_label_vectors=return_label_vectors,
                               dont_use_mmap=dali_dont_use_mmap, decode_check=dali_decode_check)
    if backend == "nvjpeg":
        return NvjpegTrainLoader(data_dir, batch_size, rank, world_size, seed, device, num_threads, augment,
                                 drop_last, return_label_vectors=return_label_vectors)
    if backend == "torch":
        return TorchTrainLoader(data_dir, batch_size, rank, world_size, seed, device, num_threads, augment,
                                drop_last, return_label_vectors=return_label_vectors)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
