"""Embedding rows kept in a file rather than in RAM (issue N: 42M images x 512 float32 is 86 GB): a
float32 array backed by an unlinked temporary file, and reads of its rows that leave none of its pages
mapped in the process (a mapping's file pages count in its RSS and PSS until it lets them go)."""
from __future__ import annotations

import mmap
import os
import tempfile
from typing import Optional

import numpy as np
import torch

from pipeline.recordio import release_map


def row_file(n: int, dim: int, folder: Optional[str | os.PathLike] = None) -> np.memmap:
    """A zeroed float32 [n, dim] array backed by a new file in `folder` (default: the temp folder). The
    file is unlinked at once: its space comes back when the array is dropped, even after a crash."""
    fd, path = tempfile.mkstemp(prefix="embeddings.", suffix=".f32", dir=folder)
    try:
        with os.fdopen(fd, "w+b") as f:
            f.truncate(max(n * dim * 4, 1))  # mmap refuses an empty file
            rows = np.memmap(f, np.float32, "r+", shape=(max(n, 1), dim))
    finally:
        os.unlink(path)
    return rows[:n]


GATHER = 8  # scattered rows read between two releases of the map: each may map a 2 MB folio, <= 16 MB


def release(rows: np.ndarray) -> None:
    """Unmap the pages of a file-backed array from this process (they stay in the file and the page
    cache, dirty ones still written back); no-op for an array in RAM."""
    release_map(getattr(rows, "_mmap", None))


def take_rows(rows, index: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 rows[index] as a new tensor on `device`, from a numpy array (a memmap's pages released
    after the read), a tensor, or for a run of consecutive rows anything that slices into arrays."""
    if isinstance(rows, torch.Tensor):
        return rows[torch.as_tensor(index, device=rows.device)].to(device=device, dtype=torch.float32)
    index = np.asarray(index)
    if len(index) and index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
        out = np.array(rows[int(index[0]):int(index[-1]) + 1], dtype=np.float32)  # a copy, not a view
    elif _mapped(rows):
        # Rows scattered over the file: a read maps the page cache's folio around it (up to 2 MB where
        # the file system caches large folios), so a tile of 2048 rows gathered at once mapped most of a
        # 200 MB file (issue N); released every GATHER rows.
        out = np.empty((len(index), rows.shape[1]), np.float32)
        for s in range(0, len(index), GATHER):
            out[s:s + GATHER] = np.take(rows, index[s:s + GATHER], axis=0)
            release(rows)
    else:
        out = np.asarray(np.take(rows, index, axis=0), dtype=np.float32)
    release(rows)
    return torch.from_numpy(out).to(device)


def _mapped(rows) -> bool:
    return isinstance(getattr(rows, "_mmap", None), mmap.mmap)
