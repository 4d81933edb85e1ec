"""Flip-test embeddings, as insightface computes them: pixels (x - 127.5) / 127.5 in RGB, and with the
flip test the embedding of an image plus that of its mirror image (L2-normalised before scoring).

`embed_images` embeds an in-memory array of crops (verification sets); `embed_dataset` embeds a
Dataset of crops with per-image columns (a packed set's records, a folder's files), decoded in
DataLoader workers.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.augment import MEAN, STD
from trainer.eval.common import l2_normalize, narrow_ints
from trainer.eval.images import VerificationError
from trainer.eval.rowfile import release, row_file


@dataclass
class Embeddings:
    embeddings: np.ndarray  # float32 [N, D]: with the flip test, the sum of both views (not normalised)
    xnorm: float  # mean L2 norm of the single-view embeddings (insightface's XNorm)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's forward broadcasts buffers to the other ranks, which are not evaluating.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB -> float32 [B, 3, H, W] in [-1, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    return x.permute(0, 3, 1, 2).float().sub_(MEAN).div_(STD)


def embed_batches(model: nn.Module, batches: Iterable[np.ndarray], device: str | torch.device,
                  flip: bool = True, amp_dtype: Optional[torch.dtype] = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each uint8 [B, 112, 112, 3] batch: (embeddings [B, D], single-view norms [B] or [2B]).

    The model runs in eval mode and is put back in the mode it was in."""
    model = _unwrap(model)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            # Entered per batch: grad mode is thread state, and must not leak to the caller between yields.
            amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                x = to_input(batch, device)
                views = [x, torch.flip(x, dims=[3])] if flip else [x]
                out = [model(v).float() for v in views]
                norms = torch.cat([o.norm(dim=1) for o in out]).cpu().numpy()
                emb = (out[0] + out[1] if flip else out[0]).cpu().numpy()
            if not np.isfinite(emb).all():
                raise FloatingPointError("the model produced NaN or inf embeddings")
            yield emb, norms
    finally:
        model.train(was_training)


def embed_images(model: nn.Module, images: np.ndarray | Sequence[np.ndarray], device: str | torch.device,
                 batch_size: int = 64, flip: bool = True, amp_dtype: Optional[torch.dtype] = None,
                 progress: bool = False, desc: str = "embed") -> Embeddings:
    """Embeddings of uint8 [N, 112, 112, 3] RGB images, batch by batch."""
    n = len(images)
    batches = (np.asarray(images[i:i + batch_size]) for i in range(0, n, batch_size))
    embs, norms = [], []
    for emb, norm in tqdm(embed_batches(model, batches, device, flip, amp_dtype), total=-(-n // batch_size),
                          desc=desc, disable=not progress, leave=False, unit="batch"):
        embs.append(emb)
        norms.append(norm)
    if not embs:
        raise VerificationError("no images to embed")
    return Embeddings(np.concatenate(embs), float(np.mean(np.concatenate(norms))))



def _collate(items: Sequence[tuple]) -> tuple:
    cols = list(zip(*items))
    return (np.stack(cols[0]),) + tuple(np.asarray(c) for c in cols[1:])


def _store(columns: list[np.ndarray], batch: Sequence[np.ndarray], at: int, n: int) -> list[np.ndarray]:
    """Copy one batch's columns into the preallocated per-item columns (made on the first batch; a text
    column is widened when a batch brings a longer string, an integer column is int32 until a batch
    brings a value that does not fit)."""
    if not columns:
        columns = [np.empty(n, np.int32 if c.dtype.kind == "i" else c.dtype) for c in batch]
    for i, c in enumerate(batch):
        if c.dtype.kind == "U" and c.dtype.itemsize > columns[i].dtype.itemsize:
            columns[i] = columns[i].astype(c.dtype)
        if columns[i].dtype == np.int32 and c.dtype.itemsize > 4 and narrow_ints(c).dtype == np.int64:
            columns[i] = columns[i].astype(np.int64)
        columns[i][at:at + len(c)] = c
    return columns


def embed_dataset(model: nn.Module, dataset: Dataset, device: str | torch.device, batch_size: int = 64,
                  flip: bool = True, normalize: bool = True, workers: int = 2, progress: bool = True,
                  desc: str = "embed", keep: Optional[Callable[[Sequence[np.ndarray]], np.ndarray]] = None,
                  folder: Optional[str | os.PathLike] = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Embeddings of the items of `dataset`, which gives (uint8 crop [112, 112, 3], *columns) per index,
    and the columns, each an array of one value per item in the same order. Rows are float32,
    L2-normalised unless `normalize` is False. `keep(columns of a batch)` says which items' rows to keep
    (images that decoded): the array holds those rows only, in order; the columns hold every item.

    The rows go straight into a file-backed array (trainer/eval/rowfile.py, in `folder` or the temp
    folder; its file is gone once the array is dropped): per image, RAM holds only the columns."""
    n = len(dataset)
    if n == 0:
        raise VerificationError(f"{desc}: no images to embed")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    columns: list[np.ndarray] = []
    kept: list[np.ndarray] = []  # the current batch's keep mask, set before its embeddings come back
    seen = 0

    def batches():
        nonlocal columns, seen
        for crops, *cols in loader:
            columns = _store(columns, cols, seen, n)
            seen += len(crops)
            kept[:] = [np.ones(len(crops), bool) if keep is None else np.asarray(keep(cols), bool)]
            yield crops

    rows: Optional[np.ndarray] = None
    written = 0
    for emb, _ in tqdm(embed_batches(model, batches(), device, flip), total=len(loader), desc=desc,
                       unit="batch", disable=not progress):
        if rows is None:
            rows = row_file(n, emb.shape[1], folder)
        emb = emb[kept[0]]
        if normalize:
            emb = l2_normalize(emb)
        rows[written:written + len(emb)] = emb
        release(rows)
        written += len(emb)
    return rows[:written], columns
