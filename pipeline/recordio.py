"""MXNet RecordIO and IndexedRecordIO, read and written without mxnet, byte-compatible both ways.

Framing (dmlc-core `recordio.h`): every part is `magic (uint32 0xced7230a) | lrec (uint32) | data | pad`,
where lrec's top 3 bits are the continuation flag and its low 29 bits the part's length. A payload that
holds the magic word at a 4-byte-aligned position is split there by MXNet's writer: the magic itself is
dropped and the pieces are written as parts flagged 1 (first), 2 (middle), 3 (last); the reader puts the
magic back between them. Only the last part is padded, to the 4-byte boundary of the whole payload.

The payload of an image record is the `IRHeader` (flag uint32, label float32, id uint64, id2 uint64),
then `flag` float32 label values when flag > 0, then the encoded image.
The `.idx` file is `key<TAB>byte offset` lines.

This is the one module that knows the framing and maps record files: everything else reads through
`RecordIO`/`IndexedRecordIO`, `read_frame`/`peek_header` over a `map_file` buffer, and writes through
`frame_record` (whole shards: `pipeline.shards.ShardWriter`).
"""
from __future__ import annotations

import mmap
import numbers
import os
import struct
from contextlib import contextmanager
from typing import BinaryIO, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_RECORD = 1 << 29  # lengths live in 29 bits
_LEN_MASK = MAX_RECORD - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)

Label = Union[float, np.ndarray]
Buffer = Union[bytes, memoryview, mmap.mmap]


class RecordIOError(ValueError):
    """A RecordIO file, index or record payload is malformed."""


class IRHeader(NamedTuple):
    flag: int
    label: Label
    id: int
    id2: int


def pack_record(header: IRHeader, payload: bytes) -> bytes:
    """Serialise an image record as mxnet.recordio.pack does: a vector label sets flag = its length."""
    if isinstance(header.label, numbers.Number):
        head = struct.pack(IR_FORMAT, 0, float(header.label), header.id, header.id2)
        return head + payload
    label = np.ascontiguousarray(header.label, dtype="<f4").ravel()
    head = struct.pack(IR_FORMAT, label.size, 0.0, header.id, header.id2)
    return head + label.tobytes() + payload


def unpack_record(buf: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Inverse of pack_record; raises RecordIOError on a payload too short for its header."""
    if len(buf) < IR_SIZE:
        raise RecordIOError(f"record of {len(buf)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, rid, rid2 = struct.unpack_from(IR_FORMAT, buf, 0)
    body = IR_SIZE
    if flag > 0:
        end = body + 4 * flag
        if end > len(buf):
            raise RecordIOError(f"IRHeader declares {flag} label values but the record has {len(buf)} bytes")
        label = np.frombuffer(bytes(buf[body:end]), dtype="<f4").astype(np.float32)
        body = end
    return IRHeader(flag, label, rid, rid2), bytes(buf[body:])


def first_label(header: IRHeader) -> float:
    """The identity: the scalar label, or the first value of a label vector."""
    if isinstance(header.label, np.ndarray):
        if header.label.size == 0:
            raise RecordIOError("record has an empty label vector")
        return float(header.label[0])
    return float(header.label)


def frame_record(data: bytes | memoryview) -> bytes:
    """Frame one payload exactly as dmlc's RecordIOWriter::WriteRecord does."""
    n = len(data)
    if n >= MAX_RECORD:
        raise RecordIOError(f"record of {n} bytes exceeds the RecordIO limit of 2^29 bytes")
    view = memoryview(data)
    out = []
    start = 0
    # Only aligned occurrences of the magic are split on; the reader would misread exactly those.
    for pos in _aligned_magic_positions(view, n & ~3):
        cflag = 1 if start == 0 else 2
        out.append(struct.pack("<II", MAGIC, (cflag << 29) | (pos - start)))
        out.append(view[start:pos])
        start = pos + 4
    cflag = 3 if start else 0
    out.append(struct.pack("<II", MAGIC, (cflag << 29) | (n - start)))
    out.append(view[start:n])
    pad = (-n) & 3
    if pad:
        out.append(b"\0" * pad)
    return b"".join(out)


def _aligned_magic_positions(view: memoryview, limit: int) -> list[int]:
    if limit <= 0:
        return []
    words = np.frombuffer(view[:limit], dtype="<u4")
    return (np.flatnonzero(words == MAGIC) * 4).tolist()


def frame_header(buf: Buffer, offset: int) -> tuple[int, int]:
    """(continuation flag, part length) of the frame header at `offset`; RecordIOError on a bad magic word."""
    magic, lrec = struct.unpack_from("<II", buf, offset)
    if magic != MAGIC:
        raise RecordIOError(f"bad magic 0x{magic:08x} at byte {offset}")
    return lrec >> 29, lrec & _LEN_MASK


def read_frame(buf: Buffer, offset: int) -> tuple[bytes, int]:
    """Read the (possibly multi-part) record starting at `offset`; return (payload, offset after it)."""
    total = len(buf)
    parts = []
    pos = offset
    expect_continuation = False
    while True:
        if pos + 8 > total:
            raise RecordIOError(f"truncated record header at byte {pos} (file has {total} bytes)")
        cflag, length = frame_header(buf, pos)
        if cflag > 3:
            raise RecordIOError(f"bad continuation flag {cflag} at byte {pos}")
        if expect_continuation and cflag not in (2, 3):
            raise RecordIOError(f"record part at byte {pos} has flag {cflag}; a continuation (2 or 3) was due")
        if not expect_continuation and cflag not in (0, 1):
            raise RecordIOError(f"record at byte {pos} starts with continuation flag {cflag}")
        start = pos + 8
        end = start + length
        padded = start + ((length + 3) & ~3)
        if end > total:
            raise RecordIOError(f"record part at byte {pos} runs past the end of the file ({length} bytes)")
        parts.append(buf[start:end])
        pos = padded
        if cflag in (0, 3):
            break
        if length & 3:
            raise RecordIOError(f"record part at byte {pos} is not 4-byte aligned but is followed by more parts")
        parts.append(MAGIC_BYTES)
        expect_continuation = True
    if pos > total:
        # A final part may lack its padding only at the very end of a file written by a foreign tool.
        pos = total
    payload = parts[0] if len(parts) == 1 else b"".join(bytes(p) for p in parts)
    return bytes(payload), pos


def open_map(path: str | os.PathLike) -> Buffer:
    """The whole file mapped read-only; `b""` for an empty file (mmap refuses those: an empty RecordIO file
    is just no records). The map outlives the file handle; release it with `close_map`."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""


def close_map(buf: Buffer) -> None:
    if isinstance(buf, mmap.mmap):
        buf.close()


@contextmanager
def map_file(path: str | os.PathLike) -> Iterator[Buffer]:
    """`open_map` for the length of a `with` block."""
    buf = open_map(path)
    try:
        yield buf
    finally:
        close_map(buf)


# Pages of a mapped file that a process has read count in its RSS until it unmaps them, though they are
# clean page cache, and a read maps more than it reads: the page cache's whole folio around it (up to
# 2 MB where the file system caches large folios; 64 KB around a small page). A scan of a 1 GB shard, or
# random reads over 40 of them, would count them whole (issue N). The readers drop them as they go.
RELEASE_BYTES = 64 << 20  # a sequential scan drops what it read every RELEASE_BYTES
RELEASE_READS = 8  # a random reader drops all of its maps every RELEASE_READS records (<= 16 MB)


def release_behind(buf: Buffer, released: int, pos: int) -> int:
    """In a scan of `buf` that has read up to `pos`: drop the pages before `pos` from this process once
    RELEASE_BYTES were read since the mark `released` (they stay in the page cache); the new mark."""
    if not isinstance(buf, mmap.mmap) or pos - released < RELEASE_BYTES:
        return released
    start = released - released % mmap.PAGESIZE
    buf.madvise(mmap.MADV_DONTNEED, start, (pos - start) - (pos - start) % mmap.PAGESIZE)
    return pos


def release_map(buf: Buffer) -> None:
    """Drop every page of a map from this process (the next read maps it again, from the page cache)."""
    if isinstance(buf, mmap.mmap) and len(buf):
        buf.madvise(mmap.MADV_DONTNEED)


def peek_header(buf: Buffer, offset: int) -> Optional[IRHeader]:
    """The IRHeader of the record at `offset` from its first bytes alone (a scan of ids and labels reads a
    few bytes per record, not every image). None when the first part cannot tell: the record is split
    before its label ends, or malformed (then `read_frame` of the whole record says what is wrong)."""
    if offset < 0 or offset + 8 + IR_SIZE > len(buf):
        return None
    magic, lrec = struct.unpack_from("<II", buf, offset)
    if magic != MAGIC or lrec >> 29 not in (0, 1):
        return None
    flag, label, rid, rid2 = struct.unpack_from(IR_FORMAT, buf, offset + 8)
    if (lrec & _LEN_MASK) < IR_SIZE + 4 * flag:
        return None
    if flag > 0:
        label = np.array(struct.unpack_from(f"<{flag}f", buf, offset + 8 + IR_SIZE), dtype=np.float32)
    return IRHeader(flag, label, rid, rid2)


class RecordIO:
    """Sequential RecordIO file: mode 'r' (scan) or 'w' (append records)."""

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', not {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self._file: BinaryIO | None = None
        self._map: Optional[Buffer] = None
        self._pos = 0
        self.open()

    def open(self) -> None:
        if self.mode == "w":
            self._file = open(self.path, "wb")
            self._pos = 0
            return
        self._map = open_map(self.path)
        self._pos = 0

    def close(self) -> None:
        if self._map is not None:
            close_map(self._map)
        self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        # Reopened in worker processes (DataLoader workers) instead of pickling file handles.
        state = dict(self.__dict__)
        state["_file"] = state["_map"] = None
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        if self.mode == "r":
            self.open()

    def tell(self) -> int:
        return self._pos

    @property
    def buffer(self) -> Buffer:
        """The mapped file (mode 'r'), for checks that read a few bytes of a record in place."""
        return self._map

    @property
    def size(self) -> int:
        return len(self._map) if self.mode == "r" else self._pos

    def write(self, payload: bytes) -> int:
        """Append one record; return its byte offset."""
        if self.mode != "w":
            raise RecordIOError(f"{self.path} is open for reading")
        framed = frame_record(payload)
        offset = self._pos
        self._file.write(framed)
        self._pos += len(framed)
        return offset

    def read(self) -> bytes | None:
        """The next record, or None at the end of the file."""
        if self._pos >= len(self._map):
            return None
        payload, self._pos = self._frame(self._pos)
        return payload

    def read_at(self, offset: int) -> bytes:
        if offset < 0 or offset >= len(self._map):
            raise RecordIOError(f"offset {offset} is outside {self.path} ({len(self._map)} bytes)")
        return self._frame(offset)[0]

    def _frame(self, offset: int) -> tuple[bytes, int]:
        try:
            return read_frame(self._map, offset)
        except RecordIOError as e:  # the framing error alone does not say which file
            raise RecordIOError(f"{self.path}: {e}") from None

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """(offset, payload) of every record from the start, without an index."""
        pos = 0
        while pos < len(self._map):
            payload, nxt = self._frame(pos)
            yield pos, payload
            pos = nxt

    def flush(self, fsync: bool = False) -> None:
        if self._file is not None and self.mode == "w":
            self._file.flush()
            if fsync:
                os.fsync(self._file.fileno())


MAX_OFFSET = (1 << 63) - 1  # offsets and keys are int64 everywhere downstream (numpy, DALI)


_INDEX_BYTES = np.zeros(256, dtype=bool)
_INDEX_BYTES[[*range(48, 58), 9, 10, 13, 32]] = True  # digits, tab, newline, CR, space
_MAX_DIGITS = 18  # below 2^63 for sure: longer numbers take the exact (slow) path


def read_index_arrays(idx_path: str | os.PathLike, block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Parse `key<TAB>offset` lines (MXNet's .idx) into int64 arrays (keys, offsets), in file order.

    Arrays, not lists: a reader over 42M images keeps 16 bytes per record, not a Python int pair, and the
    parse itself holds one block of text at a time (numpy, no Python object per line). Every line that is
    not two integers in [0, 2^63) is a RecordIOError naming the file and line (found line by line)."""
    keys: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    with open(idx_path, "rb") as f:
        rest = b""
        while True:
            data = f.read(block)
            text = rest + data
            cut = len(text) if not data else text.rfind(b"\n") + 1
            rest, text = text[cut:], text[:cut]
            if text:
                parsed = _parse_index_fast(text)
                if parsed is None:
                    f.seek(0)
                    return _parse_index_lines(idx_path, f.read())
                keys.append(parsed[0])
                offsets.append(parsed[1])
            if not data:
                break
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(offsets)


def _parse_index_fast(data: bytes) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """None unless `data` is only lines of two unsigned decimal numbers of at most 18 digits."""
    a = np.frombuffer(data, dtype=np.uint8)
    if not len(a):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not _INDEX_BYTES[a].all():
        return None
    digit = (a >= 48) & (a <= 57)
    starts = np.flatnonzero(digit[1:] & ~digit[:-1]) + 1
    ends = np.flatnonzero(digit[:-1] & ~digit[1:]) + 1
    if digit[0]:
        starts = np.concatenate(([0], starts))
    if digit[-1]:
        ends = np.append(ends, len(a))
    if len(starts) % 2 or (len(starts) and (ends - starts).max() > _MAX_DIGITS):
        return None
    line = np.searchsorted(np.flatnonzero(a == 10), starts)  # line number of each number
    if len(line) and not ((line[0::2] == line[1::2]).all() and (np.diff(line[0::2]) > 0).all()):
        return None  # a line with one number or three
    del digit
    values = np.fromstring(data, dtype=np.int64, sep=" ")
    if len(values) != len(starts):
        return None
    return values[0::2].copy(), values[1::2].copy()


def _parse_index_lines(idx_path: str | os.PathLike, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    keys: list[int] = []
    offsets: list[int] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {raw[:60]!r}")
        try:
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(f"{idx_path}:{lineno}: non-integer key or offset {raw[:60]!r}") from None
        if not (0 <= key <= MAX_OFFSET and 0 <= offset <= MAX_OFFSET):
            raise RecordIOError(f"{idx_path}:{lineno}: key or offset outside [0, 2^63) {raw[:60]!r}")
        keys.append(key)
        offsets.append(offset)
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


def read_index(idx_path: str | os.PathLike) -> tuple[list[int], list[int]]:
    """`read_index_arrays` as lists (for small files and callers that want Python ints)."""
    keys, offsets = read_index_arrays(idx_path)
    return keys.tolist(), offsets.tolist()


def format_index(keys: Sequence[int], offsets: Sequence[int]) -> bytes:
    return "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets)).encode()


class IndexedRecordIO(RecordIO):
    """RecordIO with a `.idx` side file, as mxnet.recordio.MXIndexedRecordIO: random access by key."""

    def __init__(self, idx_path: str | os.PathLike, rec_path: str | os.PathLike, mode: str = "r") -> None:
        self.idx_path = os.fspath(idx_path)
        self.keys: list[int] = []
        self.idx: dict[int, int] = {}
        super().__init__(rec_path, mode)

    def open(self) -> None:
        super().open()
        if self.mode == "r":
            keys, offsets = read_index(self.idx_path)
            self.keys = keys
            self.idx = dict(zip(keys, offsets))
            if len(self.idx) != len(keys):
                raise RecordIOError(f"{self.idx_path}: duplicate keys")
        else:
            self.keys, self.idx = [], {}

    def close(self) -> None:
        if self.mode == "w" and self._file is not None:
            with open(self.idx_path, "wb") as f:
                f.write(format_index(self.keys, [self.idx[k] for k in self.keys]))
        super().close()

    def write_idx(self, key: int, payload: bytes) -> int:
        if key in self.idx:
            raise RecordIOError(f"key {key} written twice to {self.path}")
        offset = self.write(payload)
        self.idx[key] = offset
        self.keys.append(key)
        return offset

    def read_idx(self, key: int) -> bytes:
        try:
            offset = self.idx[key]
        except KeyError:
            raise KeyError(f"key {key} is not in {self.idx_path}") from None
        return self.read_at(offset)

    def __len__(self) -> int:
        return len(self.keys)
