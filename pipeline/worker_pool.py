"""Worker processes started before a run builds its large state (`pipeline pack`, `maskgen build`).

Forked after the state exists, each worker would inherit it, and the heap that building it freed, and
copy them page by page as it allocates (issue N: ~40 bytes an image a worker, measured for pack)."""
from __future__ import annotations

from contextlib import contextmanager
from multiprocessing.context import BaseContext
from multiprocessing.pool import Pool
from typing import Callable, Iterator, Optional


@contextmanager
def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple,
                context: BaseContext) -> Iterator[Optional[Pool]]:
    """`workers` processes of `context`, each after `initializer(*initargs)`, ended on leaving; None for one
    worker, after `initializer(*initargs)` in this process (the work then runs here)."""
    if workers <= 1:
        initializer(*initargs)
        yield None
        return
    pool = context.Pool(workers, initializer=initializer, initargs=initargs)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()
