"""A second GPU reader: the packed shards decoded by nvJPEG, `torchvision.io.decode_jpeg(device='cuda')`.

For CUDA setups without a DALI wheel (DALI's ~400 MB wheels exist for some CUDA majors only). The contract
is the DALI reader's (pipeline/dali_reader.py, pipeline/loader.py): batches `(images [B,3,H,W] float32 in
[-1, 1], identities int64 [B])` on `device`, every rank `steps_per_epoch` full batches per epoch
(`drop_last=True`), exact mid-epoch resume through `state_dict`/`load_state_dict`. Which records a rank
reads is the torch reader's rule (`pipeline.dataset.PermutationShards`), and so are the augmentation draws
(`pipeline.augment.record_draws`, hashed from record and epoch); the augmentations run as batched tensor ops
on the device (`augment_torch`), and the normalisation is the torch reader's.

The host reads the JPEG bytes and draws the augmentations of the next batches in a background thread while
the GPU decodes the current one. The decode function is a constructor argument: on the CPU the tests give
it a CPU JPEG decoder producing the same uint8 CHW tensors (torchvision's C++ image ops need a torchvision
built for the installed torch).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .augment import AugmentConfig, AugmentDraw, augment_torch, normalise, record_draws
from .dataset import PackedDataset, PermutationShards
from .imageio import ImageRejected, decode_jpeg_rgb
from .record_check import check_label
from .recordio import RecordIOError

# list of 1-D uint8 CPU tensors (encoded images), device -> list of uint8 [3, H, W] tensors on the device
DecodeFn = Callable[[Sequence[torch.Tensor], torch.device], Sequence[torch.Tensor]]
JPEG_MAGIC = b"\xff\xd8\xff"


class DecoderUnavailable(ImportError):
    """The decoder cannot run at all (not an image that fails to decode)."""


def decode_jpeg_nvjpeg(data: Sequence[torch.Tensor], device: torch.device) -> Sequence[torch.Tensor]:
    """torchvision's batched nvJPEG decode (one call for the whole batch), RGB."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:  # noqa: BLE001 - torchvision's C++ ops fail to load beside another torch build
        raise DecoderUnavailable(f"backend 'nvjpeg' needs torchvision built for torch {torch.__version__} "
                                 f"(torchvision.io.decode_jpeg): {e}") from e
    return decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)


def decode_jpeg_cpu(data: Sequence[torch.Tensor], device: torch.device) -> Sequence[torch.Tensor]:
    """A CPU stand-in with the nvJPEG decoder's signature (the torch reader's libjpeg-turbo decode), for
    machines without CUDA: the reader's other code runs unchanged (bench/gpu_check.py's CPU path)."""
    return [torch.from_numpy(np.ascontiguousarray(decode_jpeg_rgb(d.numpy().tobytes()).transpose(2, 0, 1)))
            .to(device) for d in data]


@dataclass
class _HostBatch:
    """What the host prepares for one batch: encoded images, their labels and augmentation draws."""

    indices: list[int]
    data: list[bytes]
    identities: list[int]
    vectors: list[np.ndarray]
    draws: list[AugmentDraw]


class NvjpegTrainLoader(PermutationShards):
    """Batches decoded by nvJPEG on `device` (see the module docstring); `decode` replaces the decoder."""

    backend = "nvjpeg"

    def __init__(self, data_dir: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device = "cuda", num_threads: int = 2,
                 augment: Optional[AugmentConfig | dict] = None, drop_last: bool = True, shuffle: bool = True,
                 return_label_vectors: bool = False, decode: Optional[DecodeFn] = None) -> None:
        self.dataset = PackedDataset(data_dir)  # record access and label vectors; decoding happens here
        self.label_fields = self.dataset.label_fields
        self.num_classes = self.dataset.num_classes
        self.num_samples = len(self.dataset)
        self.width, self.height = self.dataset.manifest["image_size"]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.device = torch.device(device)
        self.augment = AugmentConfig.from_dict(augment)
        self.num_threads = max(1, num_threads)  # host threads, and batches prepared ahead
        self.return_label_vectors = return_label_vectors
        self.decode = decode or decode_jpeg_nvjpeg
        self._start_shards()

    # ------------------------------------------------------------------------------------------ host side
    def _read(self, index: int) -> tuple[bytes, int, np.ndarray]:
        """A record's image bytes, identity and label vector; BadRecord when the record or its label does
        not pass the readers' check (pipeline/record_check.py), as in the torch reader."""
        header, data = self.dataset.read_record(index)
        identity = check_label(header.flag, header.label, self.dataset.rules)
        return data, identity, self.dataset.label_vector(header)

    def _host_batch(self, indices: list[int], epoch: int) -> _HostBatch:
        data, identities, vectors = [], [], []
        for index in indices:
            try:
                image, identity, vector = self._read(index)
            except RecordIOError:  # no image bytes: _decode replaces it with the next usable record, counted
                image, identity, vector = b"", 0, np.zeros(len(self.label_fields), np.float32)
            data.append(image)
            identities.append(identity)
            vectors.append(vector)
        draws = record_draws(self.height, self.width, self.augment, self.seed, epoch, indices)
        return _HostBatch(list(indices), data, identities, vectors, draws)

    # ------------------------------------------------------------------------------------------ device side
    def _decode_one(self, data: bytes) -> torch.Tensor:
        """One image: nvJPEG for JPEG, the CPU for anything else a pack may hold (PNG)."""
        if not data:  # a record that failed the check (_host_batch)
            raise ImageRejected("unusable record", "the record failed the readers' check")
        if data[:3] == JPEG_MAGIC:
            (image,) = self.decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], self.device)
        else:
            image = torch.from_numpy(np.ascontiguousarray(decode_jpeg_rgb(data).transpose(2, 0, 1)))
        if tuple(image.shape) != (3, self.height, self.width):
            raise ImageRejected("wrong size", f"decoded {tuple(image.shape)}, the manifest says "
                                              f"3x{self.height}x{self.width}")
        return image.to(self.device)

    def _decode(self, batch: _HostBatch, epoch: int) -> torch.Tensor:
        """uint8 [B,3,H,W] on the device. The batch is one decode call; when it fails, the images are
        decoded one by one and each that does not decode is replaced by the next record that does, as
        the torch reader does (counted in `skipped_records`)."""
        if all(d[:3] == JPEG_MAGIC for d in batch.data):
            try:
                images = self.decode([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in batch.data],
                                     self.device)
                if all(tuple(im.shape) == (3, self.height, self.width) for im in images):
                    return torch.stack(list(images)).to(self.device)
            except (DecoderUnavailable, torch.cuda.OutOfMemoryError):
                raise
            except Exception:  # noqa: BLE001 - a bad image in the batch: find it below
                pass
        out = []
        for k, index in enumerate(batch.indices):
            for attempt in range(self.num_samples):
                try:
                    if attempt:
                        replacement = (index + attempt) % self.num_samples
                        data, identity, vector = self._read(replacement)
                        image = self._decode_one(data)
                        batch.identities[k], batch.vectors[k] = identity, vector
                        (batch.draws[k],) = record_draws(self.height, self.width, self.augment, self.seed,
                                                         epoch, [replacement])
                        self.skipped_records += 1
                    else:
                        image = self._decode_one(batch.data[k])
                    break
                except torch.cuda.OutOfMemoryError:
                    raise
                except (ImageRejected, RecordIOError, RuntimeError, ValueError, OSError):  # a bad image
                    continue
            else:
                raise RuntimeError("no record of the dataset decodes")
            out.append(image)
        return torch.stack(out)

    def _device_batch(self, batch: _HostBatch, epoch: int) -> tuple[torch.Tensor, ...]:
        images = normalise(augment_torch(self._decode(batch, epoch), batch.draws))
        identities = torch.tensor(batch.identities, dtype=torch.int64).to(self.device, non_blocking=True)
        if self.return_label_vectors:
            vectors = torch.from_numpy(np.stack(batch.vectors)).to(self.device, non_blocking=True)
            return images, identities, vectors
        return images, identities

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        indices = self._rank_indices()
        total, b, epoch = self._num_batches(len(indices)), self.batch_size, self.epoch
        first = self.step

        def chunk(k: int) -> list[int]:  # batch k of what is left, made when it is submitted
            return indices[(first + k) * b:(first + k + 1) * b].tolist()

        left = total - self.step
        with ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="nvjpeg-host") as pool:
            ahead = [pool.submit(self._host_batch, chunk(k), epoch) for k in range(min(self.num_threads, left))]
            for k in range(left):
                host = ahead.pop(0).result()
                if k + self.num_threads < left:
                    ahead.append(pool.submit(self._host_batch, chunk(k + self.num_threads), epoch))
                self.step += 1
                yield self._device_batch(host, epoch)
        self._end_epoch()
