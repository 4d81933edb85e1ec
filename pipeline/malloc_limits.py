"""glibc's mmap threshold held fixed, so that large freed blocks go back to the system at once.

By default glibc raises the threshold to the size of each large block freed (up to 32 MB): after the
first 128-image float batch (19 MB) is freed, every later one comes from the heap, and the torch reader's
heap grew to 0.6-2 GB over one epoch (issue N; bench/log/pack.md). A fixed threshold also turns that
raising off. No effect where the C library is not glibc."""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 1 << 20  # blocks of a MiB and more are mapped, and unmapped when freed

_done = False


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold for this process (once); False where that is not possible."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    return _done
