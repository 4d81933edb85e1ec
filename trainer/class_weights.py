"""Per-class weights of the cross-entropy (`class_weighted_ce`): inverse class frequencies of the images
the readers train on (the manifest's "train" and "masked" shards, docs/design.md section 1).

    w_c = N / (C * n_c)      (N images, n_c of class c, C classes with images; 0 for a class without)

so that a class's total weight over an epoch is N / C whatever its size, and the mean weight of an image
is 1 (the loss keeps its scale). The manifest counts images per shard, not per class: the counts come from
the records' headers, one read per record (no image is decoded), with a tqdm bar.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from pipeline.dataset import PackedDataset
from pipeline.record_check import BadRecord, check_label


def class_counts(data_dir: str | os.PathLike) -> np.ndarray:
    """Images per class [num_classes] (int64) in the training shards of the packed set `data_dir`; records
    that fail the readers' check are not counted (the readers skip them)."""
    ds = PackedDataset(data_dir)
    counts = np.zeros(ds.num_classes, dtype=np.int64)
    for i in tqdm(range(len(ds)), desc="class counts", unit="rec", mininterval=5, disable=len(ds) < 100_000):
        try:
            header, _ = ds.read_record(i)
        except BadRecord:
            continue
        identity = check_label(header.flag, header.label, ds.rules)
        if 0 <= identity < ds.num_classes:  # the readers skip out-of-range labels too
            counts[identity] += 1
    return counts


def inverse_frequency_weights(counts: np.ndarray) -> torch.Tensor:
    """w_c = N / (C * n_c) as float32 (C: the classes with images), 0 where n_c is 0 (never a target)."""
    counts = np.asarray(counts, dtype=np.float64)
    total, num_classes = counts.sum(), int((counts > 0).sum())
    if total <= 0:
        raise ValueError("no images to weight the classes by")
    weights = np.divide(total, num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.from_numpy(weights.astype(np.float32))
