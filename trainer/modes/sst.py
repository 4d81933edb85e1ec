"""Semi-Siamese Training (Du et al., ECCV 2020) for shallow data: a few images (often two) per identity.

With two images per class a classifier's weight for the class is poorly learned. SST drops the classifier:
a probe network (trained) and a gallery network (its moving average, `alpha` = 0.999) embed the two images
of each identity; the probe feature of image 1 is classified against a queue of gallery prototypes in
which the gallery feature of image 2 is the positive, and symmetrically (image 2 against image 1's
gallery feature). The queue (`queue_size` prototypes) holds the gallery features of recent batches as
negatives; after each step one of the two gallery features of the batch (at random) enters the queue.
The logits take an optional margin ("softmax", "am_softmax" or "arc_softmax") from trainer.losses.

Differences from FaceX-Zoo's code, and why:
- Same-identity prototypes already in the queue are masked out of a sample's softmax (FaceX-Zoo instead
  drops the queued identities from the next epoch's data): no false negatives, and no identity skipped.
- Both images go through the probe in one forward pass (and both through the gallery in one), so a
  DDP-wrapped probe sees one forward per backward.
- Several ranks: the gallery features and identities of the whole global batch are all-gathered (every
  rank holds the same queue), and the gallery's batch is shuffled across ranks (MoCo's ShuffleBN) so that
  its BatchNorm statistics never come from the same images as the probe's on one rank.

`IdentityPairLoader` reads a packed dataset as pairs: each epoch every identity once, two different
images of it (the same one twice when it has a single image).
"""
from __future__ import annotations

import copy
import os
from typing import Iterator, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.losses import CombinedMarginLoss
from trainer.modes.standard import StandardMode

LOSS_TYPES = ("softmax", "am_softmax", "arc_softmax")

# The mode's config keys and defaults (no classifier: the margin head's keys are not SST's).
CONFIG = {
    "sst_queue_size": 16384,  # prototypes; a multiple of the global batch
    "sst_scale": 30.0,
    "sst_loss_type": "softmax",  # "softmax", "am_softmax" or "arc_softmax" (with sst_margin)
    "sst_margin": 0.0,
    "sst_alpha": 0.999,  # momentum of the gallery network's moving average of the probe
}


class PrototypeQueue(nn.Module):
    """The prototype queue and SST's symmetric loss (FaceX-Zoo's SST_Prototype)."""

    def __init__(self, feat_dim: int = 512, queue_size: int = 16384, scale: float = 30.0,
                 loss_type: str = "softmax", margin: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
        self.queue_size, self.loss_type = int(queue_size), loss_type
        m2 = margin if loss_type == "arc_softmax" else 0.0
        m3 = margin if loss_type == "am_softmax" else 0.0
        self.margin = CombinedMarginLoss(scale, 1.0, m2, m3)
        gen = torch.Generator().manual_seed(seed)
        # Random unit vectors stand in for prototypes until real gallery features replace them.
        queue = F.normalize(torch.rand(queue_size, feat_dim, generator=gen) * 2 - 1, dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.seed = int(seed)

    def forward(self, p1: torch.Tensor, g2: torch.Tensor, p2: torch.Tensor, g1: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
        """This rank's probe features `p1, p2` [b, D] (with gradient), gallery features `g1, g2` [b, D]
        and identities [b] -> the mean loss over this rank's samples (then updates the queue)."""
        b = p1.shape[0]
        sizes = [b] * distributed.get_world_size()
        if distributed.is_distributed():
            sizes = distributed.all_gather_no_grad(torch.tensor([b], device=ids.device)).tolist()
        g1_all = distributed.all_gather_no_grad(F.normalize(g1.detach().float(), dim=1), sizes)
        g2_all = distributed.all_gather_no_grad(F.normalize(g2.detach().float(), dim=1), sizes)
        ids_all = distributed.all_gather_no_grad(ids.long(), sizes)
        total = g1_all.shape[0]
        if self.queue_size % total:
            raise ValueError(f"SST queue_size {self.queue_size} must be a multiple of the global batch "
                             f"{total}")
        start = int(self.pointer)
        offset = sum(sizes[: distributed.get_rank()])
        labels = torch.arange(start + offset, start + offset + b, device=ids.device)

        queue_ids = self.queue_ids.clone()
        queue_ids[start: start + total] = ids_all
        # A prototype of the sample's own identity other than its positive would be a false negative.
        same_id = (queue_ids[None, :] == ids.long()[:, None])
        same_id[torch.arange(b, device=ids.device), labels] = False

        loss = (self._loss(p1, g2_all, start, labels, same_id)
                + self._loss(p2, g1_all, start, labels, same_id)) / 2
        self._enqueue(g1_all, g2_all, ids_all, start)
        return loss

    def _loss(self, probe: torch.Tensor, gallery_all: torch.Tensor, start: int, labels: torch.Tensor,
              exclude: torch.Tensor) -> torch.Tensor:
        prototypes = self.queue.clone()
        prototypes[start: start + gallery_all.shape[0]] = gallery_all
        cosine = F.normalize(probe.float(), dim=1) @ prototypes.t()
        logits = self.margin(cosine, labels).masked_fill(exclude, float("-inf"))
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def _enqueue(self, g1_all: torch.Tensor, g2_all: torch.Tensor, ids_all: torch.Tensor, start: int) -> None:
        # The same coin on every rank: seeded by the step count, which every rank advances together.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        coin = torch.rand((), generator=gen)
        chosen = g1_all if float(coin) > 0.5 else g2_all
        self.queue[start: start + chosen.shape[0]] = chosen
        self.queue_ids[start: start + chosen.shape[0]] = ids_all
        self.pointer.fill_((start + chosen.shape[0]) % self.queue_size)
        self.steps += 1


def _train_batchnorm_only(module: nn.Module) -> None:
    # FaceX-Zoo's gallery: eval mode (no dropout) except BatchNorm, which uses the batch statistics.
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


class SemiSiameseTraining(nn.Module):
    """The gallery network (a moving average of the probe) and the prototype queue.

    The trainer keeps the probe (its backbone, DDP-wrapped on several ranks) and calls, per step,
    `loss = sst(probe_model, images1, images2, ids)`, `loss.backward()`, the optimizer step, then
    `sst.momentum_update(probe)` with the unwrapped probe.
    """

    def __init__(self, probe: nn.Module, feat_dim: int = 512, queue_size: int = 16384, scale: float = 30.0,
                 loss_type: str = "softmax", margin: float = 0.0, alpha: float = 0.999,
                 seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"moving-average alpha must be in [0, 1), got {alpha}")
        self.gallery = copy.deepcopy(probe)
        self.gallery.requires_grad_(False)
        self.prototypes = PrototypeQueue(feat_dim, queue_size, scale, loss_type, margin, seed)
        self.alpha, self.seed = float(alpha), int(seed)

    def train(self, mode: bool = True) -> "SemiSiameseTraining":
        super().train(mode)
        if mode:
            _train_batchnorm_only(self.gallery)
        return self

    @torch.no_grad()
    def momentum_update(self, probe: nn.Module) -> None:
        """gallery <- alpha * gallery + (1 - alpha) * probe, parameters only: the gallery's BatchNorm
        statistics are its own, from the batches it normalises."""
        for g, p in zip(self.gallery.parameters(), probe.parameters()):
            g.mul_(self.alpha).add_(p.detach(), alpha=1.0 - self.alpha)

    @torch.no_grad()
    def gallery_features(self, images: torch.Tensor) -> torch.Tensor:
        """Gallery embeddings of this rank's `images`, through a batch shuffled across all ranks."""
        if not distributed.is_distributed():
            return self.gallery(images)
        world, rank = distributed.get_world_size(), distributed.get_rank()
        all_images = distributed.all_gather_no_grad(images)
        n = all_images.shape[0]
        if n % world:
            raise ValueError(f"SST's shuffled gallery batch needs equal batches on every rank (global {n})")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.prototypes.steps))
        order = torch.randperm(n, generator=gen).to(images.device)
        per = n // world
        mine = self.gallery(all_images[order[rank * per: (rank + 1) * per]])
        features = torch.empty((n, mine.shape[1]), dtype=mine.dtype, device=mine.device)
        features[order] = distributed.all_gather_no_grad(mine)
        return features[rank * per: (rank + 1) * per]

    def forward(self, probe_model: nn.Module, images1: torch.Tensor, images2: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
        b = images1.shape[0]
        both = torch.cat([images1, images2])
        probe = probe_model(both)
        gallery = self.gallery_features(both)
        return self.prototypes(probe[:b], gallery[b:], probe[b:], gallery[:b], ids)


# ------------------------------------------------------------------------------------------ pair loader

def identity_index(dataset, progress: bool = True) -> tuple[list[list[int]], int]:
    """Record indices of each identity of a `pipeline.dataset.PackedDataset` (reads headers only), and the
    count of records left out because they fail the readers' check (framing, image headers, label range)."""
    from pipeline.record_check import check_label
    from pipeline.recordio import RecordIOError

    by_identity: list[list[int]] = [[] for _ in range(dataset.num_classes)]
    bad = 0
    for index in tqdm(range(len(dataset)), desc="indexing identities", disable=not progress, leave=False):
        try:
            header, _ = dataset.read_record(index)
            identity = check_label(header.flag, header.label, dataset.rules)
        except RecordIOError:
            bad += 1
            continue
        by_identity[identity].append(index)
    return by_identity, bad


class _PairView(Dataset):
    def __init__(self, dataset, by_identity: list[list[int]], seed: int, epoch: int) -> None:
        self.dataset, self.by_identity, self.seed, self.epoch = dataset, by_identity, seed, epoch

    def __len__(self) -> int:
        return len(self.by_identity)

    def __getitem__(self, identity: int):
        from pipeline.imageio import ImageRejected
        from pipeline.recordio import RecordIOError

        rng = np.random.default_rng([self.seed, self.epoch, identity])
        images, skipped = [], 0
        for index in rng.permutation(self.by_identity[identity]).tolist():
            try:
                images.append(self.dataset[index][0])
            except (ImageRejected, RecordIOError):
                skipped += 1  # a corrupt record: another image of the same identity replaces it
                continue
            if len(images) == 2:
                break
        if not images:
            raise RuntimeError(f"no image of identity {identity} decodes")
        if len(images) == 1:
            images.append(images[0])
        if rng.random() > 0.5:
            images.reverse()
        return images[0], images[1], identity, skipped


class IdentityPairLoader:
    """Batches `(images1, images2, identities)` of a packed dataset for SST, the identities of each epoch
    dealt out over the ranks (rank r takes positions r, r+W, ... of a seeded permutation).
    A `pipeline.loader.TrainLoader`."""

    def __init__(self, data_dir: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device = "cpu", num_workers: int = 2, augment=None,
                 progress: bool = True) -> None:
        from pipeline.augment import AugmentConfig
        from pipeline.dataset import PackedDataset

        self.dataset = PackedDataset(data_dir, augment=AugmentConfig.from_dict(augment), seed=seed)
        self.num_classes = self.dataset.num_classes
        self.by_identity, excluded = identity_index(self.dataset, progress and rank == 0)
        self.identities = [i for i, idx in enumerate(self.by_identity) if idx]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.num_workers = torch.device(device), num_workers
        per_rank = len(self.identities) // world_size
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.identities)} identities over {world_size} ranks leave fewer than "
                             f"one batch of {batch_size} per rank")
        # every rank indexes the whole set; rank 0 alone counts what was left out (the trainer sums ranks)
        self.epoch, self.step, self.skipped_records = 0, 0, excluded if rank == 0 else 0

    def _rank_identities(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = [self.identities[i] for i in torch.randperm(len(self.identities), generator=g).tolist()]
        per_rank = len(order) // self.world_size
        return order[self.rank::self.world_size][:per_rank]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        mine = self._rank_identities()[self.step * self.batch_size: self.steps_per_epoch * self.batch_size]
        self.dataset.epoch = self.epoch
        loader = DataLoader(_PairView(self.dataset, self.by_identity, self.seed, self.epoch),
                            batch_size=self.batch_size, sampler=mine, num_workers=self.num_workers,
                            drop_last=True, pin_memory=self.device.type == "cuda")
        for images1, images2, ids, skipped in loader:
            self.skipped_records += int(skipped.sum())
            self.step += 1
            yield (images1.to(self.device, non_blocking=True), images2.to(self.device, non_blocking=True),
                   ids.to(self.device))
        self.epoch += 1
        self.step = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed, "skipped_records": self.skipped_records}

    def load_state_dict(self, state: dict) -> None:
        """Exact mid-epoch resume on the same world size and batch; otherwise the saved epoch restarts."""
        self.epoch, self.skipped_records = state["epoch"], state.get("skipped_records", 0)
        same = (state["world_size"], state["batch_size"], state["seed"]) == \
            (self.world_size, self.batch_size, self.seed)
        self.step = state["step"] if same else 0


class SSTMode(StandardMode):
    """The trainer's SST mode: no classifier; `IdentityPairLoader` batches (trainer.main.build_loader), the
    probe is the backbone, the head a `SemiSiameseTraining` (gallery + queue: `sst_queue_size`,
    `sst_scale`, `sst_loss_type`, `sst_margin`, gallery momentum `sst_alpha`)."""

    name = "sst"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg  # not StandardMode's checks: SST has no margin head
        if cfg.sst_loss_type not in LOSS_TYPES:
            raise ConfigError(f"sst_loss_type must be one of {', '.join(LOSS_TYPES)}, "
                              f"got {cfg.sst_loss_type!r}")
        if not 0.0 <= cfg.sst_alpha < 1.0:
            raise ConfigError(f"sst_alpha (the gallery's moving-average momentum) must be in [0, 1), "
                              f"got {cfg.sst_alpha}")

    def bind_data(self, loader) -> None:
        global_batch = loader.batch_size * loader.world_size
        if self.cfg.sst_queue_size < global_batch or self.cfg.sst_queue_size % global_batch:
            raise ConfigError(f"sst_queue_size {self.cfg.sst_queue_size} must be a multiple of the global "
                              f"batch {global_batch} (batch_size x ranks)")

    def build_head(self, backbone: nn.Module, num_classes: int, world_size: int) -> SemiSiameseTraining:
        cfg = self.cfg
        sst = SemiSiameseTraining(backbone, feat_dim=cfg.embedding_size, queue_size=cfg.sst_queue_size,
                                  scale=cfg.sst_scale, loss_type=cfg.sst_loss_type, margin=cfg.sst_margin,
                                  alpha=cfg.sst_alpha, seed=cfg.seed)
        if distributed.is_distributed():
            # Each rank initialised its own probe; DDP will give every probe rank 0's weights, so the
            # galleries start from rank 0's too.
            for tensor in sst.gallery.state_dict().values():
                torch.distributed.broadcast(tensor, 0)
        return sst

    def loss(self, model: nn.Module, head: SemiSiameseTraining, batch) -> Tuple[torch.Tensor, dict]:
        images1, images2, ids = batch
        return head(model, images1, images2, ids), {}

    def end_step(self, backbone: nn.Module, head: SemiSiameseTraining) -> None:
        head.momentum_update(backbone)

    def log_fields(self, head: SemiSiameseTraining) -> dict:
        queue = head.prototypes
        return {"queue_filled": int((queue.queue_ids >= 0).sum())}


__all__ = ["CONFIG", "PrototypeQueue", "SemiSiameseTraining", "IdentityPairLoader", "SSTMode", "identity_index",
           "LOSS_TYPES"]
