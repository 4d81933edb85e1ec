"""Masking spread over worker processes, `MASK_BATCH` images per task (`maskgen build`, `maskgen folder`)."""
from __future__ import annotations

import contextlib
from collections import deque
from itertools import islice
from multiprocessing.pool import Pool
from typing import Any, Callable, Iterable, Iterator, Optional

from .masker import MASK_BATCH


def _batches(items: Iterable, issued: deque) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, MASK_BATCH)):
        issued.append(batch)
        yield batch


@contextlib.contextmanager
def batched_map(work: Callable[[list], list], items: Iterable,
                pool: Optional[Pool]) -> Iterator[Iterator[tuple[Any, Any]]]:
    """(item, result) in the order of `items`; `work` maps a batch of items to their results, in `pool`'s
    workers (None: in this process).

    `items` is read as the work goes (issue N): only the batches handed out and not yet answered are held,
    at most what the pool's task pipe takes, not one object per image of the whole run (a list built before
    the fork would also be copied into every worker, page by page, as its garbage collector touches it)."""
    issued: deque = deque()
    batches = _batches(items, issued)
    results = map(work, batches) if pool is None else pool.imap(work, batches)
    yield ((item, res) for done in results for item, res in zip(issued.popleft(), done))
