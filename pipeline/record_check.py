"""What a reader may train on: an index checked against its shard and the manifest, and each record checked
from its framing, header, label and image markers without decoding the image (docs/design.md section 1,
"What the readers accept").

One set of rules for every reader and for `verify`, so that the DALI reader, the PyTorch reader and
`verify` agree on which records are bad: the DALI reader runs `check_shard` over every record before DALI
sees the index (DALI crashes on a bad frame and trains on an image it cannot decode), the PyTorch reader
runs `check_record` on each record it reads, `verify` runs `check_payload` on each record it scans.
A record that fails is skipped and counted by the readers, never trained on; an index that disagrees with
its shard or the manifest (a deleted, repeated or out-of-range line) stops the reader at its start.

`check_shard` reads 8 + 24 bytes and the image's first and last bytes per record, not the image, and its
result is cached per shard against the files' sizes and mtimes, so that a restart does not read the
shards again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .atomic import atomic_write_with
from .manifest import MANIFEST, SPLIT_BITS, SPLIT_IDENTITY_FIELDS
from .recordio import (
    IR_SIZE,
    Buffer,
    RecordIOError,
    close_map,
    frame_header,
    open_map,
    read_frame,
    read_index_arrays,
    release_behind,
)

_JPEG_SOI = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xae\x42\x60\x82"
_EOI_WINDOW = 16  # a JPEG's EOI may be followed by a few bytes of padding from foreign writers
# JPEG markers without a length: TEM and RST0-7 (SOI/EOI are handled apart).
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_SOF = frozenset([*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)])
CHECK_VERSION = 1  # bump when the rules change: cached results of older rules are ignored


class BadRecord(RecordIOError):
    """A record no reader trains on: malformed framing, header, label or image; the message says why."""


class RecordRules(NamedTuple):
    """What a record must hold: from the manifest's `label_fields`, `num_classes` and `image_size`."""

    num_fields: int
    num_classes: int
    split: tuple[int, int] | None  # positions of identity_hi/identity_lo in the label vector, if any
    image_size: tuple[int, int]  # width, height

    @classmethod
    def from_manifest(cls, manifest: dict) -> "RecordRules":
        fields = list(manifest["label_fields"])
        split = None
        if SPLIT_IDENTITY_FIELDS[0] in fields:
            split = (fields.index(SPLIT_IDENTITY_FIELDS[0]), fields.index(SPLIT_IDENTITY_FIELDS[1]))
        width, height = manifest["image_size"]
        return cls(len(fields), int(manifest["num_classes"]), split, (int(width), int(height)))


def _whole(v: float, what: str) -> int:
    if not math.isfinite(v) or v != int(v):
        raise BadRecord(f"{what} {v!r} is not a whole number")
    return int(v)


def check_label(flag: int, values, rules: RecordRules) -> int:
    """The identity of a record with IRHeader `flag` and label `values` (the scalar, or the vector);
    BadRecord when the label does not fit the manifest."""
    if flag > rules.num_fields:
        raise BadRecord(f"label vector of {flag} values; the manifest names {rules.num_fields} label fields")
    if rules.split is not None:
        if flag <= max(rules.split):
            raise BadRecord(f"label vector of {flag} values lacks the identity_hi/identity_lo fields")
        hi = _whole(float(values[rules.split[0]]), "identity_hi")
        lo = _whole(float(values[rules.split[1]]), "identity_lo")
        if hi < 0 or not 0 <= lo < (1 << SPLIT_BITS):
            raise BadRecord(f"identity_hi {hi} / identity_lo {lo} out of range")
        identity = (hi << SPLIT_BITS) + lo
    else:
        identity = _whole(float(values if flag == 0 else values[0]), "identity")
    if not 0 <= identity < rules.num_classes:
        raise BadRecord(f"identity {identity} outside [0, {rules.num_classes})")
    return identity


def _check_size(width: int, height: int, size: tuple[int, int]) -> None:
    if (width, height) != size:
        raise BadRecord(f"image is {width}x{height}; the manifest's image_size is {size[0]}x{size[1]}")


def check_image(buf: Buffer, start: int, end: int, size: tuple[int, int]) -> None:
    """The image `buf[start:end]` is a JPEG whose header segments are whole, up to its scan, and which
    ends with EOI; or a PNG that ends with IEND; of `size` (width, height). Reads the markers, not the
    image data."""
    n = end - start
    if n <= 0:
        raise BadRecord("record has no image")
    if buf[start:start + 8] == _PNG_SIGNATURE:
        if n < 8 + 25 + 12 or buf[end - 12:end] != _PNG_IEND or buf[start + 12:start + 16] != b"IHDR":
            raise BadRecord("PNG image is truncated (no IHDR chunk at its start or IEND chunk at its end)")
        _check_size(*struct.unpack_from(">II", buf, start + 16), size)
        return
    if buf[start:start + 3] != _JPEG_SOI:
        raise BadRecord(f"image is neither JPEG nor PNG (starts {bytes(buf[start:start + 4]).hex()})")
    if bytes(buf[max(start, end - _EOI_WINDOW):end]).rfind(b"\xff\xd9") < 0:
        raise BadRecord("JPEG image is truncated (no EOI marker at its end)")
    pos, seen_frame = start + 2, False
    while True:
        if pos + 4 > end:
            raise BadRecord("JPEG header runs past the end of the image")
        if buf[pos] != 0xFF:
            raise BadRecord(f"JPEG marker expected at image byte {pos - start}")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            if not seen_frame:
                raise BadRecord("JPEG scan before any frame header (SOF)")
            return
        if marker in (0x00, 0xD8, 0xD9):
            raise BadRecord(f"JPEG marker 0xff{marker:02x} inside the header")
        if marker in _STANDALONE:
            pos += 2
            continue
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if length < 2:
            raise BadRecord(f"JPEG segment 0xff{marker:02x} of length {length}")
        if marker in _SOF:
            if length < 8 or pos + 9 > end:
                raise BadRecord("JPEG frame header (SOF) is cut short")
            height, width = struct.unpack_from(">HH", buf, pos + 5)
            _check_size(width, height, size)
            seen_frame = True
        pos += 2 + length


def check_payload(payload: bytes | memoryview, rules: RecordRules) -> int:
    """A whole record payload (IRHeader, label values, image); returns its identity."""
    n = len(payload)
    if n < IR_SIZE:
        raise BadRecord(f"record of {n} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label = struct.unpack_from("<If", payload, 0)
    body = IR_SIZE + 4 * flag
    if body > n:
        raise BadRecord(f"IRHeader declares {flag} label values but the record has {n} bytes")
    values = label if flag == 0 else np.frombuffer(payload, "<f4", count=flag, offset=IR_SIZE)
    identity = check_label(flag, values, rules)
    check_image(payload, body, n, rules.image_size)
    return identity


def check_record(buf: Buffer, offset: int, rules: RecordRules, limit: int | None = None) -> int:
    """The record at `offset` of a mapped shard, as DALI would read it, from its headers alone; returns the
    byte after it. `limit`: where the next record starts (a frame must not run into it)."""
    size = len(buf)
    limit = size if limit is None else limit
    if offset & 3 or not 0 <= offset <= size - 8 - IR_SIZE:
        raise BadRecord(f"offset {offset} is not a 4-byte aligned record position inside the file ({size} bytes)")
    try:
        cflag, length = frame_header(buf, offset)
    except RecordIOError as e:
        raise BadRecord(str(e)) from None
    if cflag == 0:
        end = offset + 8 + length
        if end > limit:
            raise BadRecord(f"record at byte {offset} of {length} bytes runs past byte {limit}")
        if length < IR_SIZE:
            raise BadRecord(f"record at byte {offset} of {length} bytes is shorter than the IRHeader")
        flag, label = struct.unpack_from("<If", buf, offset + 8)
        body = offset + 8 + IR_SIZE + 4 * flag
        if body > end:
            raise BadRecord(f"record at byte {offset}: IRHeader declares {flag} label values in {length} bytes")
        values = label if flag == 0 else np.frombuffer(buf, "<f4", count=flag, offset=offset + 8 + IR_SIZE)
        check_label(flag, values, rules)
        check_image(buf, body, end, rules.image_size)
        return offset + 8 + ((length + 3) & ~3)
    # A payload split at aligned magic words (rare): read it whole.
    try:
        payload, nxt = read_frame(buf, offset)
    except RecordIOError as e:
        raise BadRecord(str(e)) from None
    if nxt > limit:
        raise BadRecord(f"record at byte {offset} runs past byte {limit}")
    check_payload(payload, rules)
    return nxt


class ShardIndex(NamedTuple):
    """A shard's usable records: keys and byte offsets (int64, ascending offsets), and the bad ones."""

    keys: np.ndarray
    offsets: np.ndarray
    bad: int  # index entries whose record fails `check_record`
    first_bad: str  # why the first of them failed ("" when none)


def load_shard_index(data_dir: Path, shard: dict) -> tuple[np.ndarray, np.ndarray]:
    """A shard's index (keys, offsets sorted by offset) checked against the manifest entry and the shard:
    the shard's size, as many entries as `count`, no offset or key twice. RecordIOError naming the file."""
    rec_path, idx_path = data_dir / shard["rec"], data_dir / shard["idx"]
    try:
        size = rec_path.stat().st_size
    except OSError as e:
        raise RecordIOError(f"{rec_path} (listed in {MANIFEST}): {e.strerror or e}") from None
    if size != shard["bytes"]:
        raise RecordIOError(f"{rec_path}: {size} bytes, the manifest says {shard['bytes']} (truncated or "
                            f"appended to); run `python -m pipeline verify`")
    try:
        keys, offsets = read_index_arrays(idx_path)
    except OSError as e:
        raise RecordIOError(f"{idx_path} (listed in {MANIFEST}): {e.strerror or e}") from None
    if len(offsets) != shard["count"]:
        raise RecordIOError(f"{idx_path}: {len(offsets)} entries, the manifest says {shard['count']} "
                            f"(a line deleted or repeated)")
    order = np.argsort(offsets, kind="stable")
    keys, offsets = keys[order], offsets[order]
    if len(offsets) > 1 and not (np.diff(offsets) > 0).all():
        raise RecordIOError(f"{idx_path}: an offset appears twice (a record would be read twice)")
    if len(np.unique(keys)) != len(keys):
        raise RecordIOError(f"{idx_path}: a key appears twice")
    if len(offsets) and offsets[-1] >= size:
        raise RecordIOError(f"{idx_path}: offset {int(offsets[-1])} is past the end of {rec_path.name} ({size} bytes)")
    return keys, offsets


def decode_record(buf: Buffer, offset: int) -> None:
    """Decode the image of a record that passed `check_record`, as the PyTorch reader does; BadRecord if it
    does not decode (the scan data is corrupt: only a decoder finds that)."""
    from .imageio import ImageRejected, decode_jpeg_rgb

    payload, _ = read_frame(buf, offset)
    flag = struct.unpack_from("<I", payload, 0)[0]
    try:
        decode_jpeg_rgb(payload[IR_SIZE + 4 * flag:])
    except ImageRejected as e:
        raise BadRecord(f"image does not decode ({e})") from None


def _scan_shard(rec_path: Path, keys: np.ndarray, offsets: np.ndarray, rules: RecordRules,
                decode: bool = False) -> ShardIndex:
    good = np.ones(len(offsets), dtype=bool)
    first_bad = ""
    buf = open_map(rec_path)
    try:
        limits = np.append(offsets[1:], len(buf)).tolist()
        released = 0
        for i, (off, limit) in enumerate(zip(offsets.tolist(), limits)):
            released = release_behind(buf, released, off)
            try:
                check_record(buf, off, rules, limit)
                if decode:
                    decode_record(buf, off)
            except BadRecord as e:
                good[i] = False
                first_bad = first_bad or f"{rec_path.name} at byte {off}: {e}"
    finally:
        close_map(buf)
    return ShardIndex(keys[good], offsets[good], int((~good).sum()), first_bad)


def cache_dir() -> Path | None:
    """Where checked shard indexes are kept: $FACETRAIN_CACHE (`off`: nowhere), else ~/.cache/facetrain."""
    root = os.environ.get("FACETRAIN_CACHE")
    if root == "off":
        return None
    return Path(root or Path.home() / ".cache" / "facetrain") / "shard-check"


def _file_key(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def check_shard(data_dir: Path, shard: dict, rules: RecordRules, decode: bool = False) -> ShardIndex:
    """`load_shard_index`, then `check_record` on every entry (and with `decode`, `decode_record`: about
    1 ms a record, once); the result cached against the shard's and the index's size, times and inode, the
    rules and `decode` (a file written since is checked again)."""
    rec_path, idx_path = data_dir / shard["rec"], data_dir / shard["idx"]
    root = cache_dir()
    path = key = None
    if root is not None and rec_path.is_file() and idx_path.is_file():
        key = json.dumps([CHECK_VERSION, _file_key(rec_path), _file_key(idx_path), list(rules), shard["count"],
                          shard["bytes"], decode])  # taken before the scan: a write during it makes the key stale
        path = root / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return ShardIndex(z["keys"], z["offsets"], int(z["bad"]), str(z["first_bad"]))
        except (OSError, ValueError, KeyError):
            pass  # none yet, or damaged: checked again and rewritten
    keys, offsets = load_shard_index(data_dir, shard)
    result = _scan_shard(rec_path, keys, offsets, rules, decode)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_with(path, lambda f: np.savez(f, key=np.array(key), keys=result.keys,
                                                       offsets=result.offsets, bad=np.int64(result.bad),
                                                       first_bad=np.array(result.first_bad)))
        except OSError:
            pass  # a read-only cache: no cache, the check runs again next time
    return result
