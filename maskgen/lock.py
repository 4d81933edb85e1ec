"""One `maskgen build` at a time per dataset: an flock on a lock file in the data folder.

The kernel drops an flock when its holder exits, however it exits, so a killed run leaves no lock behind
(at most the file, which the next run simply locks again). The holder removes the file when it is done;
a run that locked a file just removed by its holder sees that the path now names another file (or none)
and locks again, so two runs never both hold a lock.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "maskgen.lock"


class LockBusy(RuntimeError):
    """Another process holds the lock; the message names its pid."""


class DatasetLock:
    """`with DatasetLock(data): ...` holds the dataset's maskgen lock, or raises LockBusy at once."""

    def __init__(self, data: str | os.PathLike) -> None:
        self.path = Path(data) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise LockBusy(f"another maskgen build (pid {holder}) is running on {self.path.parent}; "
                               f"wait for it to finish") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed this file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a waiter that opened it re-checks the path and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "DatasetLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
