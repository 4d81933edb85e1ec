"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The one implementation used by every stage: the manifest, the checkpoints, the exports, the logs and the
plots. A file is written to a temporary name in its own folder, flushed and fsynced, renamed over the
target, and the folder is fsynced so that the rename itself survives a power cut.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

_UMASK = os.umask(0)
os.umask(_UMASK)
# mkstemp creates 0600 files; shared datasets, checkpoints and exports must stay readable by the group.
FILE_MODE = 0o666 & ~_UMASK


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it is fsynced and renamed over `path`.

    For writers that want a file name rather than bytes (torch.save, ONNX export, TorchScript). On an
    exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call `write(binary_file)` on a temporary file, then put it in place atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_with(path, lambda f: f.write(data))


def json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null (a skipped step's loss, an undefined TAR)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=1, ensure_ascii=False) + "\n").encode())
