"""Masking spread over worker processes, `MASK_BATCH` images per task (`maskgen build`, `maskgen folder`)."""
from __future__ import annotations

import contextlib
from collections import deque
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from pipeline.landmarks import worker_context

from .masker import MASK_BATCH


def _batches(items: Iterable, issued: deque) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, MASK_BATCH)):
        issued.append(batch)
        yield batch


@contextlib.contextmanager
def batched_map(work: Callable[[list], list], items: Iterable, workers: int,
                initializer: Callable[..., None], initargs: tuple) -> Iterator[Iterator[tuple[Any, Any]]]:
    """(item, result) in the order of `items`; `work` maps a batch of items to their results.

    `items` is read as the work goes (issue N): only the batches handed out and not yet answered are held,
    at most what the pool's task pipe takes, not one object per image of the whole run (a list built before
    the fork would also be copied into every worker, page by page, as its garbage collector touches it).
    One worker: in this process, after `initializer(*initargs)`. More: a pool, ended on leaving."""
    issued: deque = deque()
    batches = _batches(items, issued)
    pool = None
    try:
        if workers <= 1:
            initializer(*initargs)
            results = map(work, batches)
        else:
            # fork unless this process holds MediaPipe (its graphs do not survive a fork): pipeline.landmarks
            pool = worker_context().Pool(workers, initializer=initializer, initargs=initargs)
            results = pool.imap(work, batches)
        yield ((item, res) for done in results for item, res in zip(issued.popleft(), done))
    finally:
        if pool is not None:  # every result is in, or the run failed: nothing left to wait for
            pool.terminate()
            pool.join()
