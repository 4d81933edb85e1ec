"""The training reader: one DALI pipeline per rank over every shard of a packed dataset.

DALI facts this relies on (measured with DALI 2.4; the reader tests in tests/test_verify_and_readers.py
hold it to them):
- `fn.readers.mxnet` takes ONE index for all `.rec` files, with offsets running on across the files in
  the order given; it sorts by offset and ignores the keys. We write that index from the per-shard ones.
- With `num_shards=W`, DALI shard s is records [N*s//W, N*(s+1)//W) of that order; without
  `stick_to_shard`, DALI epoch e of rank r reads shard (r + e) % W. `pad_last_batch=True` pads each
  shard-epoch to whole batches by repeating its last sample, and the padding always comes last.
- Labels come out as float32 vectors ([1] for flag-0 records, [flag] otherwise).
So every rank can compute exactly which of its batches are real, and all ranks yield the same number of
full batches per epoch (the drop-last rule), which DDP and Partial FC's all-gather need.

DALI crashes (SIGSEGV) on a record whose framing lies and trains on an image it cannot decode, and it has
no way to skip a sample. So DALI is only given records that passed `pipeline.record_check.check_shard`
(framing, header, label, image markers; cached per shard): the bad ones are left out of the combined index
and counted in `skipped_records` (each epoch, this rank's share of them), as the PyTorch reader counts the
records it replaces.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from .augment import ERASE_ASPECT, ERASE_FILL, ERASE_MIN_AREA, MEAN, STD, AugmentConfig
from .manifest import SPLIT_BITS, SPLIT_IDENTITY_FIELDS, load_manifest
from .record_check import RecordRules, ShardIndex, check_shard
from .recordio import RecordIOError, format_index


def check_shards(data_dir: Path, manifest: dict, rank: int = 0, world_size: int = 1, decode: bool = False,
                 progress: bool = False) -> list[ShardIndex]:
    """`check_shard` of every training shard, in manifest order. Rank r checks shards r, r+W, ... first:
    ranks sharing a cache folder (one node) then find most of the others' results cached when they get to
    them, so a first start costs about 1/W of the check per rank instead of all of it."""
    rules = RecordRules.from_manifest(manifest)
    shards = manifest["shards"]
    mine = range(rank % world_size, len(shards), world_size)
    order = [*mine, *(i for i in range(len(shards)) if i % world_size != rank % world_size)]
    checked: dict[int, ShardIndex] = {}
    for i in tqdm(order, desc="checking shards", unit="shard", disable=not progress, leave=False):
        checked[i] = check_shard(data_dir, shards[i], rules, decode)
    return [checked[i] for i in range(len(shards))]


def write_combined_index(data_dir: Path, manifest: dict, checked: list[ShardIndex], out_path: Path) -> list[str]:
    """The single index DALI needs for several `.rec` files, of the records that passed the check;
    returns the `.rec` paths in its order. Written shard by shard: memory is one shard's arrays."""
    recs: list[str] = []
    base = 0
    with open(out_path, "wb") as out:
        for shard, ok in zip(manifest["shards"], checked):
            out.write(format_index(ok.keys.tolist(), (ok.offsets + base).tolist()))
            base += shard["bytes"]
            recs.append(str(data_dir / shard["rec"]))
    return recs


def dali_shard_bounds(num_samples: int, shard: int, num_shards: int) -> tuple[int, int]:
    return num_samples * shard // num_shards, num_samples * (shard + 1) // num_shards


class DaliTrainLoader:
    """A `pipeline.loader.TrainLoader`: batches `(images [B,3,H,W] float32 in [-1,1], labels int64 [B])` on
    `device`, per rank.

    `drop_last=True` (training): every rank yields `steps_per_epoch` full batches per epoch.
    `drop_last=False` (evaluation, tests): every real sample of the rank's shard once per epoch.
    `decode_check=True`: the shard check decodes every image too (once, cached), so that DALI skips exactly
    the records the PyTorch reader skips.
    """

    backend = "dali"

    def __init__(self, data_dir: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device = "cpu", num_threads: int = 2,
                 augment: Optional[AugmentConfig | dict] = None, drop_last: bool = True, shuffle: bool = True,
                 initial_fill: int = 4096, prefetch: int = 2, hw_decoder_load: float = 0.65,
                 return_label_vectors: bool = False, dont_use_mmap: bool = False,
                 decode_check: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        self.label_fields = list(self.manifest["label_fields"])
        self.num_classes = int(self.manifest["num_classes"])
        checked = check_shards(self.data_dir, self.manifest, rank, world_size, decode_check, progress=rank == 0)
        self.excluded = sum(c.bad for c in checked)  # records DALI is not given (failed the check)
        self.num_samples = sum(len(c.offsets) for c in checked)
        if self.num_samples == 0:
            raise RecordIOError(f"{self.data_dir}: no record of the dataset is usable "
                                f"({next(c.first_bad for c in checked if c.bad)})")
        if self.excluded and rank == 0:
            first = next(c.first_bad for c in checked if c.bad)
            print(f"pipeline.dali_reader: left out {self.excluded} bad records (first: {first})", file=sys.stderr)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.device = torch.device(device)
        self.augment = AugmentConfig.from_dict(augment)
        self.num_threads, self.initial_fill, self.prefetch = num_threads, initial_fill, prefetch
        self.hw_decoder_load = hw_decoder_load
        # DALI advises plain reads over mmap on network file systems (NFS, Lustre, ...), where page faults
        # of a mapped file stall the reader threads
        self.dont_use_mmap = dont_use_mmap
        self.return_label_vectors = return_label_vectors
        # Records left out by the check, this rank's share each epoch. Images that pass the check and still do
        # not decode (corrupt scan data) are left out too only with `decode_check` (every image decoded once
        # on the CPU, cached); otherwise DALI decodes them to garbage. `pipeline verify --decode` finds them.
        self.skipped_records = 0
        sizes = [dali_shard_bounds(self.num_samples, s, world_size) for s in range(world_size)]
        self._shard_sizes = [b - a for a, b in sizes]
        if min(self._shard_sizes) < batch_size and drop_last:
            raise ValueError(f"{self.num_samples} samples over {world_size} ranks leave fewer than one batch "
                             f"of {batch_size} per rank")
        self.steps_per_epoch = min(self._shard_sizes) // batch_size if drop_last else None
        self._tmp = Path(tempfile.mkdtemp(prefix="dali-index-"))
        atexit.register(shutil.rmtree, self._tmp, True)
        self._recs = write_combined_index(self.data_dir, self.manifest, checked, self._tmp / "all.idx")
        self.epoch = 0
        self.step = 0  # batches yielded in this epoch
        self._dali_epoch = 0  # epochs this pipeline object has run (decides which shard it reads)
        self._dali_batches = 0  # DALI batches consumed in the current DALI epoch
        self._pipe = self._build(checkpoint=None, start_epoch=0)

    # ------------------------------------------------------------------------------------------ graph
    def _build(self, checkpoint: Optional[bytes], start_epoch: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        aug = self.augment
        height, width = self.manifest["image_size"][1], self.manifest["image_size"][0]
        nfields = len(self.label_fields)

        @pipeline_def(enable_checkpointing=True)
        def graph():
            jpegs, labels = fn.readers.mxnet(
                path=self._recs, index_path=[str(self._tmp / "all.idx")], shard_id=self.rank,
                num_shards=self.world_size, random_shuffle=self.shuffle, initial_fill=self.initial_fill,
                pad_last_batch=True, stick_to_shard=False, dont_use_mmap=self.dont_use_mmap, name="reader")
            if gpu:
                images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB,
                                           hw_decoder_load=self.hw_decoder_load)
            else:
                images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            if aug.crop_area < 1.0:
                images = fn.random_resized_crop(images, size=[height, width], random_area=[aug.crop_area, 1.0],
                                                random_aspect_ratio=[0.9, 1.1])
            if aug.brightness or aug.contrast or aug.saturation:
                images = fn.color_twist(
                    images,
                    brightness=fn.random.uniform(range=[1 - aug.brightness, 1 + aug.brightness]),
                    contrast=fn.random.uniform(range=[1 - aug.contrast, 1 + aug.contrast]),
                    saturation=fn.random.uniform(range=[1 - aug.saturation, 1 + aug.saturation]))
            if aug.grey_p > 0:
                # saturation 0 makes an RGB grey image, keeping 3 channels for the backbone
                grey = fn.cast(fn.random.coin_flip(probability=aug.grey_p), dtype=types.FLOAT)
                images = fn.hsv(images, saturation=1.0 - grey)
            if aug.erase_p > 0:
                images = _random_erase(images, aug.erase_p, aug.erase_area)
            mirror = fn.random.coin_flip(probability=0.5) if aug.flip else 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[MEAN] * 3, std=[STD] * 3, mirror=mirror)
            labels = fn.pad(labels, axes=[0], shape=[nfields], fill_value=0)
            if gpu:
                labels = labels.gpu()
            return images, labels

        seed = (self.seed * 1_000_003 + self.rank * 7919 + start_epoch * 104_729) % (2 ** 31)
        pipe = graph(batch_size=self.batch_size, num_threads=self.num_threads,
                     device_id=(self.device.index or 0) if gpu else None, seed=seed,
                     prefetch_queue_depth=self.prefetch, checkpoint=checkpoint)
        pipe.build()
        return pipe

    # ------------------------------------------------------------------------------------------ epochs
    def _dali_epoch_shard_size(self) -> int:
        return self._shard_sizes[(self.rank + self._dali_epoch) % self.world_size]

    def _batches_this_dali_epoch(self) -> int:
        return -(-self._dali_epoch_shard_size() // self.batch_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.steps_per_epoch
        return self._batches_this_dali_epoch()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        real = self._dali_epoch_shard_size()
        total = self._batches_this_dali_epoch()
        wanted = self.steps_per_epoch if self.drop_last else total
        if self.step == 0 and self._dali_batches == 0:
            lo, hi = dali_shard_bounds(self.excluded, (self.rank + self._dali_epoch) % self.world_size,
                                       self.world_size)
            self.skipped_records += hi - lo
        while self.step < wanted:
            images, labels = self._run()
            self._dali_batches += 1
            self.step += 1
            keep = self.batch_size
            if not self.drop_last and self._dali_batches == total:
                keep = real - (total - 1) * self.batch_size
            yield self._to_torch(images, labels, keep)
        while self._dali_batches < total:  # batches past the drop-last cut keep DALI's epochs aligned
            self._run()
            self._dali_batches += 1
        self.epoch += 1
        self._dali_epoch += 1
        self.step = 0
        self._dali_batches = 0

    def _stream(self) -> Optional["torch.cuda.Stream"]:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _run(self):
        """One DALI batch. On the GPU its outputs are ordered on torch's current stream instead of
        synchronised with the host (`run()` without a stream waits for the GPU work of the batch)."""
        stream = self._stream()
        return self._pipe.run(stream) if stream is not None else self._pipe.run()

    def _to_torch(self, images, labels, keep: int) -> tuple[torch.Tensor, ...]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        img_t = images.as_tensor()
        lab_t = labels.as_tensor()
        out_img = torch.empty(img_t.shape(), dtype=torch.float32, device=self.device)
        out_lab = torch.empty(lab_t.shape(), dtype=torch.float32, device=self.device)
        stream = self._stream()
        feed_ndarray(img_t, out_img, cuda_stream=stream)
        feed_ndarray(lab_t, out_lab, cuda_stream=stream)
        out_img, out_lab = out_img[:keep], out_lab[:keep]
        identity = identities_from_label_vectors(out_lab, self.label_fields)
        if self.return_label_vectors:
            return out_img, identity, out_lab
        return out_img, identity

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"backend": self.backend, "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch, "step": self.step,
                "dali_epoch": self._dali_epoch, "dali_batches": self._dali_batches,
                "skipped_records": self.skipped_records, "checkpoint": self._pipe.checkpoint()}

    def load_state_dict(self, state: dict) -> None:
        """Same backend, world size and batch size: exact mid-epoch resume. Otherwise the saved epoch
        starts again (a rank of another partition cannot take over another's DALI state)."""
        same = (state.get("backend") == self.backend and state["world_size"] == self.world_size
                and state["rank"] == self.rank and state["batch_size"] == self.batch_size)
        self.skipped_records = state.get("skipped_records", 0)
        if same:
            self._pipe = self._build(checkpoint=state["checkpoint"], start_epoch=0)
            self.epoch, self.step = state["epoch"], state["step"]
            self._dali_epoch, self._dali_batches = state["dali_epoch"], state["dali_batches"]
        else:
            self.epoch, self.step = state["epoch"], 0
            self._dali_epoch, self._dali_batches = 0, 0
            self._pipe = self._build(checkpoint=None, start_epoch=self.epoch)


def identities_from_label_vectors(labels: torch.Tensor, label_fields: list[str]) -> torch.Tensor:
    """Exact int64 identities from float32 label vectors `[B, len(label_fields)]`."""
    if SPLIT_IDENTITY_FIELDS[0] in label_fields:
        hi = labels[:, label_fields.index(SPLIT_IDENTITY_FIELDS[0])].long()
        lo = labels[:, label_fields.index(SPLIT_IDENTITY_FIELDS[1])].long()
        return (hi << SPLIT_BITS) + lo
    return labels[:, 0].long()


def _random_erase(images, p: float, max_area: float):
    """DALI's twin of `pipeline.augment.erase_box` (the same constants): with probability p, a rectangle
    of U(ERASE_MIN_AREA, max_area) of the image set to mid grey. A sample that is not erased gets a
    zero-sized region, so that every sample goes through the same operator."""
    import math

    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    area = fn.random.uniform(range=[ERASE_MIN_AREA, max(max_area, ERASE_MIN_AREA)])
    aspect = dmath.exp(fn.random.uniform(range=[math.log(a) for a in ERASE_ASPECT]))
    on = fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)
    width = dmath.min(dmath.sqrt(area * aspect), 1.0) * on
    height = dmath.min(dmath.sqrt(area / aspect), 1.0) * on
    x = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - width)
    y = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - height)
    return fn.erase(images, anchor=fn.stack(y, x), shape=fn.stack(height, width), axis_names="HW",
                    normalized_anchor=True, normalized_shape=True, fill_value=float(ERASE_FILL))
