"""The plain PyTorch path over the same shards: a random-access `Dataset` (mmap) and a train loader.

For users without DALI, and for tests. Same samples, labels and normalisation as the DALI reader; a record
that fails `pipeline.record_check.check_record` (the DALI reader's rules) or does not decode is replaced by
another (so batches keep their size) and counted, never a crash. An index that disagrees with its shard or
the manifest stops the reader at its start (RecordIOError naming the file).
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import AugmentConfig, apply_numpy, normalise, record_draws
from .imageio import ImageRejected, decode_jpeg_rgb
from .malloc_limits import fix_mmap_threshold
from .manifest import load_manifest
from .record_check import BadRecord, RecordRules, check_label, check_record, load_shard_index
from .recordio import RELEASE_READS, RecordIO, RecordIOError, release_map, unpack_record


class PackedDataset(Dataset):
    """Records of a packed dataset by global index (manifest shard order, then index order).

    `kinds` picks the shards ("train", "masked", ...); `holdout=True` reads the held-out images instead,
    `val=True` the validation split's (`pack --val-split`).
    Items are `(image, identity)`; with `return_label_vector`, `(image, identity, label_vector)`.
    `image` is float32 CHW normalised to [-1, 1]; with `raw=True` uint8 HWC RGB without augmentation;
    with `uint8_chw=True` augmented uint8 CHW (the train loader normalises whole batches).
    """

    def __init__(self, data_dir: str | os.PathLike, augment: Optional[AugmentConfig | dict] = None,
                 kinds: tuple[str, ...] = ("train", "masked"), holdout: bool = False, raw: bool = False,
                 return_label_vector: bool = False, seed: int = 0, uint8_chw: bool = False,
                 val: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        self.label_fields = list(self.manifest["label_fields"])
        self.num_classes = int(self.manifest["num_classes"])
        self.rules = RecordRules.from_manifest(self.manifest)
        if holdout and val:
            raise ValueError("PackedDataset reads the holdout or the val shards, not both")
        split = "holdout" if holdout else "val" if val else None
        shards = self.manifest.get(split, {}).get("shards", []) if split else [
            s for s in self.manifest["shards"] if s["kind"] in kinds]
        self.shards = shards
        self.augment = AugmentConfig.from_dict(augment) if augment is not None else AugmentConfig.none()
        self.raw, self.return_label_vector, self.seed = raw, return_label_vector, seed
        self.uint8_chw = uint8_chw
        # int64 offsets per shard, ascending: 8 bytes a record (docs/design.md section 1, readers' memory)
        self._offsets: list[np.ndarray] = [load_shard_index(self.data_dir, s)[1] for s in shards]
        self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()
        self._files: dict[int, RecordIO] = {}
        self._reads = 0
        self.epoch = 0  # varies the augmentation draw per epoch

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int, Optional[int]]:
        """(shard, offset, where the next record of the shard starts or None)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, index) - 1
        offsets, j = self._offsets[shard], index - self._starts[shard]
        return shard, int(offsets[j]), int(offsets[j + 1]) if j + 1 < len(offsets) else None

    def read_record(self, index: int):
        """(IRHeader, encoded image bytes) of record `index`; BadRecord (naming the shard) when the record
        fails `check_record`."""
        shard, offset, limit = self._locate(index)
        f = self._files.get(shard)
        if f is None:  # opened lazily: each DataLoader worker maps the files itself
            f = self._files[shard] = RecordIO(self.data_dir / self.shards[shard]["rec"], "r")
        try:
            check_record(f.buffer, offset, self.rules, limit)  # the DALI reader's check, record for record
        except BadRecord as e:
            raise BadRecord(f"{f.path} at byte {offset}: {e}") from None
        record = unpack_record(f.read_at(offset))
        self._reads += 1
        if self._reads % RELEASE_READS == 0:  # the shards' pages read would all stay in this process's RSS
            for g in self._files.values():
                release_map(g.buffer)
        return record

    def label_vector(self, header) -> np.ndarray:
        values = np.zeros(len(self.label_fields), dtype=np.float32)
        label = np.atleast_1d(np.asarray(header.label, dtype=np.float32))
        values[: min(len(label), len(values))] = label[: len(values)]
        return values

    def __getitem__(self, index: int):
        header, image = self.read_record(index)
        rgb = decode_jpeg_rgb(image)
        vector = self.label_vector(header)
        identity = check_label(header.flag, header.label, self.rules)
        if self.raw:
            tensor = torch.from_numpy(np.ascontiguousarray(rgb))
        else:
            (draw,) = record_draws(*rgb.shape[:2], self.augment, self.seed, self.epoch, [index])
            chw = torch.from_numpy(np.ascontiguousarray(apply_numpy(rgb, draw).transpose(2, 0, 1)))
            tensor = chw if self.uint8_chw else normalise(chw)
        if self.return_label_vector:
            return tensor, identity, torch.from_numpy(vector)
        return tensor, identity

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


class _SkippingView(Dataset):
    """Wraps a PackedDataset for the train loader: keys are (index, epoch), so persistent workers see the
    epoch (it seeds the augmentation); an undecodable record is replaced by the next good one, flagged."""

    def __init__(self, base: PackedDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        self.base.epoch = epoch
        for attempt in range(len(self.base)):
            try:
                return (*self.base[(index + attempt) % len(self.base)], attempt > 0)
            except (ImageRejected, RecordIOError):
                continue
        raise RecordIOError(f"{self.base.data_dir}: no record of the dataset is usable (none decodes)")


def _tagged(indices: np.ndarray, epoch: int) -> Iterator[tuple[int, int]]:
    for start in range(0, len(indices), 4096):
        for i in indices[start:start + 4096].tolist():
            yield i, epoch


class _EpochSampler(Sampler):
    """The indices the loader deals this rank for the current epoch, tagged with the epoch."""

    def __init__(self) -> None:
        self.indices: np.ndarray = np.zeros(0, np.int64)
        self.epoch = 0

    def __iter__(self):
        # This epoch's indices and number, bound now; pairs made as the loader asks (issue N: a list of them
        # was ~100 bytes an image for the whole epoch).
        return _tagged(self.indices, self.epoch)

    def __len__(self) -> int:
        return len(self.indices)


class PermutationShards:
    """Which records a rank reads, and the resume state, of the readers over PackedDataset (torch, nvjpeg).

    Each epoch draws one global permutation from (seed, epoch); rank r takes positions r, r+W, ... of
    it, cut to the same length on every rank. Resume with another world size is exact too: the consumed
    prefix of the global permutation is known from (step, batch size, old world size). A subclass sets
    `backend`, `num_samples`, `batch_size`, `rank`, `world_size`, `seed`, `drop_last`, `shuffle`, then
    calls `_start_shards()`.
    """

    backend = ""

    def _start_shards(self) -> None:
        per_rank = self.num_samples // self.world_size
        if self.drop_last and per_rank < self.batch_size:
            raise ValueError(f"{self.num_samples} samples over {self.world_size} ranks leave fewer than one "
                             f"batch of {self.batch_size} per rank")
        self.steps_per_epoch = per_rank // self.batch_size if self.drop_last else None
        self.epoch = 0
        self.step = 0
        self._consumed = 0  # samples of the global permutation consumed before this run's first step
        self.skipped_records = 0

    def _rank_indices(self) -> np.ndarray:
        """This rank's share of what is left of this epoch's global permutation, int64 (issue N: 8 bytes an
        image, not a Python int in a list)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).numpy()
        else:
            order = np.arange(self.num_samples, dtype=np.int64)
        rest = order[self._consumed:]
        mine = rest[self.rank::self.world_size]
        if self.drop_last:
            mine = mine[: len(rest) // self.world_size]
        return mine

    def _num_batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self._num_batches(len(self._rank_indices()))

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.step = 0
        self._consumed = 0

    def state_dict(self) -> dict:
        return {"backend": self.backend, "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch, "step": self.step,
                "consumed": self._consumed + self.step * self.batch_size * self.world_size,
                "skipped_records": self.skipped_records}

    def load_state_dict(self, state: dict) -> None:
        """Exact for any world size: the consumed prefix of the epoch's permutation is dealt out no more."""
        self.epoch, self.step, self._consumed = state["epoch"], 0, 0
        self.skipped_records = state.get("skipped_records", 0)
        if state.get("backend") != self.backend or state.get("seed") != self.seed:
            return  # another reader's order: the saved epoch starts again
        if state["world_size"] == self.world_size and state["batch_size"] == self.batch_size:
            self.step = state["step"]
        else:
            self._consumed = state["consumed"]


class TorchTrainLoader(PermutationShards):
    """A `pipeline.loader.TrainLoader`, as the DALI reader, over PackedDataset + DataLoader, the records
    dealt out by PermutationShards."""

    backend = "torch"

    def __init__(self, data_dir: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device = "cpu", num_workers: int = 2,
                 augment: Optional[AugmentConfig | dict] = None, drop_last: bool = True, shuffle: bool = True,
                 return_label_vectors: bool = False) -> None:
        fix_mmap_threshold()  # the batches normalised in this process are freed back at once (issue N)
        self.dataset = PackedDataset(data_dir, augment=AugmentConfig.from_dict(augment),
                                     return_label_vector=return_label_vectors, seed=seed, uint8_chw=True)
        self.label_fields = self.dataset.label_fields
        self.num_classes = self.dataset.num_classes
        self.num_samples = len(self.dataset)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._start_shards()
        self._sampler = _EpochSampler()
        # one DataLoader for the whole run: workers start once, not every epoch
        self._loader = DataLoader(_SkippingView(self.dataset), batch_size=batch_size, sampler=self._sampler,
                                  num_workers=num_workers, drop_last=drop_last, persistent_workers=num_workers > 0,
                                  pin_memory=self.device.type == "cuda")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        indices = self._rank_indices()
        total = self._num_batches(len(indices))
        self._sampler.indices = indices[self.step * self.batch_size:]
        self._sampler.epoch = self.epoch
        for batch in self._loader:
            if self.step >= total:
                break
            *data, replaced = batch
            self.skipped_records += int(replaced.sum())
            self.step += 1
            images, *rest = (t.to(self.device, non_blocking=True) for t in data)
            yield (normalise(images), *rest)
        self._end_epoch()
