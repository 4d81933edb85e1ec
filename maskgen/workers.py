"""Masking spread over worker processes, `MASK_BATCH` images per task (`maskgen build`, `maskgen folder`)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from pipeline.landmarks import worker_context

from .masker import MASK_BATCH


@contextlib.contextmanager
def batched_map(work: Callable[[list], list], items: Sequence, workers: int,
                initializer: Callable[..., None], initargs: tuple) -> Iterator[Iterator[tuple[Any, Any]]]:
    """(item, result) in the order of `items`; `work` maps a batch of items to their results.

    One worker: in this process, after `initializer(*initargs)`. More: a pool, ended on leaving."""
    batches = [list(items[i:i + MASK_BATCH]) for i in range(0, len(items), MASK_BATCH)]
    pool = None
    try:
        if workers <= 1:
            initializer(*initargs)
            results = map(work, batches)
        else:
            # fork unless this process holds MediaPipe (its graphs do not survive a fork): pipeline.landmarks
            pool = worker_context().Pool(workers, initializer=initializer, initargs=initargs)
            results = pool.imap(work, batches)
        yield ((item, res) for batch, done in zip(batches, results) for item, res in zip(batch, done))
    finally:
        if pool is not None:  # every result is in, or the run failed: nothing left to wait for
            pool.terminate()
            pool.join()
