"""Enumerating the images of a pack's sources: ImageFolder trees, list files, flat folders, `.rec` files.

Enumeration only reads directory entries, list lines and record headers; pixels are read later by the
pack workers. Everything that is not turned into a candidate image is returned as a `Skip`, never dropped.

Memory does not grow with the dataset beyond a few dozen bytes per image (issue N: WebFace42M's 42M
images): a listing holds its paths as one byte buffer with offsets (`StringTable`), relative to their
identity folder, and its labels, record offsets and order as numpy arrays, never an object per image.
File names are kept as the bytes the file system gave (`os.fsencode`), so that a name that is not UTF-8
is packed like any other and shown with `surrogateescape`.
"""
from __future__ import annotations

import hashlib
import os
import re
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from .manifest import MANIFEST, load_manifest, shard_paths
from .recordio import (
    RecordIOError,
    close_map,
    first_label,
    open_map,
    read_frame,
    read_index,
    release_behind,
    unpack_record,
)

SCAN_THREADS = 16  # directory listing waits on the file system, not the CPU: threads overlap the waits
SCAN_CHUNK = 64  # identity folders per thread task


class SourceError(ValueError):
    """A source cannot be read at all (as opposed to single bad files in it, which are skipped)."""


@dataclass(frozen=True)
class Skip:
    display: str
    reason: str
    detail: str = ""


class StringTable:
    """Many byte strings as one buffer and the end offset of each: about len + 8 bytes a string, where a
    Python str costs 50 more."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ends = array("q")

    def append(self, s: bytes) -> None:
        self._buf += s
        self._ends.append(len(self._buf))

    def __len__(self) -> int:
        return len(self._ends)

    def raw(self, i: int) -> bytes:
        start = self._ends[i - 1] if i else 0
        return bytes(self._buf[start:self._ends[i]])

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.raw(i))

    def digest(self, h) -> None:
        h.update(self._buf)
        h.update(memoryview(self._ends).cast("B"))


@dataclass
class SourceListing:
    """A source's candidate images, grouped by identity in the source's identity order.

    Item i is identity `item_class[i]` (an index into `class_names`); its bytes are the file
    `path(i)`, or the record at `item_offset[i]` of `rec_files[item_file[i]]`.
    """

    kind: str
    root: str
    class_names: StringTable = field(default_factory=StringTable)
    item_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    paths: Optional[StringTable] = None  # file kinds: relative to the identity folder, or as listed
    perm: Optional[np.ndarray] = None  # paths[perm[i]] is item i's (list files are read in line order)
    under_class: bool = False  # path = root/class name/relative path (ImageFolder trees)
    base: str = ""
    rec_files: list[str] = field(default_factory=list)
    item_file: Optional[np.ndarray] = None
    item_offset: Optional[np.ndarray] = None
    skips: list[Skip] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    content_digest: bytes = b""  # names, sizes and labels: the input part of the pack's fingerprint

    def __len__(self) -> int:
        return len(self.item_class)

    def path(self, i: int) -> str:
        if self.paths is None:
            return self.rec_files[int(self.item_file[i])]
        rel = self.paths.raw(int(self.perm[i]) if self.perm is not None else i)
        if self.under_class:
            return os.fsdecode(os.path.join(os.fsencode(self.base), self.class_names.raw(int(self.item_class[i])),
                                            rel))
        return os.fsdecode(os.path.join(os.fsencode(self.base), rel))

    def offset(self, i: int) -> int:
        return -1 if self.item_offset is None else int(self.item_offset[i])

    def display(self, i: int) -> str:
        off = self.offset(i)
        return f"{self.path(i)}@{off}" if off >= 0 else self.path(i)


def ordered_map(fn: Callable, jobs: Iterable, threads: int = SCAN_THREADS) -> Iterator:
    """`fn(job)` in `threads` threads, results in job order, at most 4 per thread in flight (bounded memory)."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _size(path: bytes) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _walk(top: bytes, prefix: bytes, names: list, sizes: list) -> None:
    """Files under `top` as paths relative to the identity folder: a folder's files (sorted), then its
    sub-folders (sorted), as os.walk visits them."""
    with os.scandir(top) as it:
        entries = sorted(it, key=lambda e: e.name)
    subdirs = []
    for e in entries:
        if e.is_dir():
            subdirs.append(e)
        else:
            names.append(prefix + e.name)
            sizes.append(_size(e.path))
    for d in subdirs:
        _walk(d.path, prefix + d.name + b"/", names, sizes)


def _list_classes(root: bytes, class_dirs: list[bytes]) -> list[tuple[list, list]]:
    out = []
    for name in class_dirs:
        names: list = []
        sizes: list = []
        try:
            _walk(os.path.join(root, name), b"", names, sizes)
        except OSError:
            pass  # an unreadable identity folder is an empty one, reported as such
        out.append((names, sizes))
    return out


def list_image_folder(root: Path, progress: bool = True) -> SourceListing:
    """One sub-folder per identity; the folders are listed by threads (a 2M-identity tree is mostly waits
    on the file system), the results taken in name order."""
    out = SourceListing("imagefolder", str(root), paths=StringTable(), under_class=True, base=str(root))
    broot = os.fsencode(root)
    dirs = []
    with os.scandir(broot) as it:
        for e in it:
            if e.is_dir():
                dirs.append(e.name)
            else:
                out.skips.append(Skip(os.fsdecode(e.path), "not in an identity folder"))
    dirs.sort()
    out.skips.sort(key=lambda s: s.display)
    h = hashlib.blake2b(digest_size=16)
    classes = array("i")
    chunks = (dirs[i:i + SCAN_CHUNK] for i in range(0, len(dirs), SCAN_CHUNK))
    bar = tqdm(total=len(dirs), desc=f"scan {root.name}", unit="class", leave=False, disable=not progress,
               smoothing=0.05)
    k = 0
    for chunk_result in ordered_map(lambda c: _list_classes(broot, c), chunks):
        for names, sizes in chunk_result:
            name = dirs[k]
            k += 1
            if not names:
                out.empty_classes.append(os.fsdecode(name))
                continue
            cid = len(out.class_names)
            out.class_names.append(name)
            for n in names:
                out.paths.append(n)
            classes.extend([cid] * len(names))
            h.update(np.asarray(sizes, np.int64).tobytes())
        bar.update(len(chunk_result))
    bar.close()
    del dirs
    out.item_class = np.frombuffer(classes, np.int32) if len(classes) else np.zeros(0, np.int32)
    out.class_names.digest(h)
    out.paths.digest(h)
    out.content_digest = h.digest()
    return out


def _group(out: SourceListing, raw_class: array, labels: dict, numeric: bool, h) -> None:
    """Sort the identities (as numbers when they all are), then the items by identity, stably."""
    names = list(labels)
    key = (lambda n: int(n)) if numeric else (lambda n: os.fsencode(n))
    order = sorted(range(len(names)), key=lambda j: key(names[j]))
    rank = np.empty(len(names), np.int32)
    rank[np.asarray(order, np.int64)] = np.arange(len(names), dtype=np.int32)
    for j in order:
        out.class_names.append(os.fsencode(names[j]))
    raw = np.frombuffer(raw_class, np.int32) if len(raw_class) else np.zeros(0, np.int32)
    item_class = rank[raw] if len(raw) else raw
    perm = np.argsort(item_class, kind="stable")
    out.item_class = item_class[perm]
    if out.item_offset is not None:
        out.item_offset = out.item_offset[perm]
        out.item_file = out.item_file[perm]
        out.perm = None
    elif not np.array_equal(perm, np.arange(len(perm))):
        out.perm = perm
    out.class_names.digest(h)
    h.update(out.item_class.tobytes())
    out.content_digest = h.digest()


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def list_flat_folder(root: Path, label_regex: str) -> SourceListing:
    pattern = re.compile(label_regex)
    out = SourceListing("flat", str(root), paths=StringTable(), base=str(root))
    raw_class = array("i")
    labels: dict[str, int] = {}
    h = hashlib.blake2b(digest_size=16)
    with os.scandir(os.fsencode(root)) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = os.fsdecode(entry.name)
        if entry.is_dir():
            out.skips.append(Skip(os.fsdecode(entry.path), "folder inside a flat source"))
            continue
        m = pattern.search(name)
        if m is None:
            out.skips.append(Skip(os.fsdecode(entry.path), "no label match",
                                  f"{label_regex!r} does not match the name"))
            continue
        label = m.group("label") if "label" in pattern.groupindex else (m.group(1) if m.groups() else m.group(0))
        raw_class.append(labels.setdefault(label, len(labels)))
        out.paths.append(entry.name)
        h.update(_size(entry.path).to_bytes(8, "little", signed=True))
    out.paths.digest(h)
    _group(out, raw_class, labels, False, h)
    return out


def list_file(path: Path, root: Optional[Path] = None) -> SourceListing:
    """`path<TAB>label` lines, or im2rec's `index<TAB>label[<TAB>label...]<TAB>path` lines.

    Relative paths are taken from `root`, else from the list file's folder.
    """
    base = root or path.parent
    out = SourceListing("list", str(path), paths=StringTable(), base=str(base))
    raw_class = array("i")
    labels: dict[str, int] = {}
    h = hashlib.blake2b(digest_size=16)
    bbase = os.fsencode(base)
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    line = line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise SourceError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not line.strip() or line.startswith("#"):
                    continue
                cols = line.split("\t")
                if len(cols) == 2:
                    rel, label = cols
                elif len(cols) >= 3:
                    rel, label = cols[-1], cols[1]
                    label = str(int(float(label))) if _is_number(label) else label
                else:
                    out.skips.append(Skip(f"{path}:{lineno}", "bad list line", "expected path<TAB>label"))
                    continue
                raw_class.append(labels.setdefault(label.strip(), len(labels)))
                brel = os.fsencode(rel)
                out.paths.append(brel)
                h.update(_size(os.path.join(bbase, brel)).to_bytes(8, "little", signed=True))
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
    out.paths.digest(h)
    _group(out, raw_class, labels, bool(labels) and all(_is_int(n) for n in labels), h)
    return out


def _scan_rec(rec_path: Path, file_index: int, offsets: array, files: array, labels: array,
              skips: list[Skip], progress: bool) -> None:
    """Image records of one `.rec`, read front to back (the `.idx`, when there is one, only to step over
    a broken frame). An insightface-style file's header record (flag > 0, no image) and its identity
    records (no image either) are structure, not data: a record whose image part is empty never reaches
    a decoder."""
    try:
        buf = open_map(rec_path)
    except (OSError, RecordIOError) as e:
        raise SourceError(f"cannot read {rec_path}: {e}") from None
    found = released = 0
    bar = tqdm(desc=f"scan {rec_path.name}", unit="rec", leave=False, disable=not progress)
    try:
        pos = 0
        while pos < len(buf):
            try:
                payload, nxt = read_frame(buf, pos)
            except RecordIOError as e:
                if found == 0:
                    raise SourceError(f"{rec_path} is not a RecordIO file: {e}") from None
                skips.append(Skip(f"{rec_path}@{pos}", "corrupt record", str(e)))
                resume = _next_indexed_offset(rec_path, pos)
                if resume is None:
                    break  # without an index nothing after a broken frame can be found
                pos = resume
                continue
            off, pos = pos, nxt
            found += 1
            bar.update()
            released = release_behind(buf, released, pos)  # a 100 GB .rec would count whole
            try:
                header, image = unpack_record(payload)
                label = first_label(header)
            except RecordIOError as e:
                skips.append(Skip(f"{rec_path}@{off}", "corrupt record", str(e)))
                continue
            if not image:
                continue
            offsets.append(off)
            files.append(file_index)
            labels.append(int(label))
    finally:
        bar.close()
        close_map(buf)
    if found == 0:
        raise SourceError(f"{rec_path} holds no records")


def _next_indexed_offset(rec_path: Path, after: int) -> Optional[int]:
    idx = rec_path.with_suffix(".idx")
    if not idx.is_file():
        return None
    try:
        _, offs = read_index(idx)
    except (OSError, RecordIOError):
        return None
    later = [o for o in offs if o > after]
    return min(later) if later else None


def _rec_listing(kind: str, root: str, rec_files: list[Path], progress: bool) -> SourceListing:
    out = SourceListing(kind, root, rec_files=[str(p) for p in rec_files])
    offsets, files, labels = array("q"), array("i"), array("q")
    for i, rec in enumerate(rec_files):
        _scan_rec(rec, i, offsets, files, labels, out.skips, progress)
    out.item_offset = np.frombuffer(offsets, np.int64) if len(offsets) else np.zeros(0, np.int64)
    out.item_file = np.frombuffer(files, np.int32) if len(files) else np.zeros(0, np.int32)
    lab = np.frombuffer(labels, np.int64) if len(labels) else np.zeros(0, np.int64)
    uniq, inv = np.unique(lab, return_inverse=True)
    h = hashlib.blake2b(digest_size=16)
    for p in rec_files:
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\n".encode("utf-8", "surrogateescape"))
    h.update(out.item_offset.tobytes())
    perm = np.argsort(inv, kind="stable")
    out.item_class = inv.astype(np.int32)[perm]
    out.item_offset = out.item_offset[perm]
    out.item_file = out.item_file[perm]
    for u in uniq.tolist():
        out.class_names.append(str(u).encode())
    out.class_names.digest(h)
    h.update(out.item_class.tobytes())
    out.content_digest = h.digest()
    return out


def list_rec(rec_path: Path, progress: bool = True) -> SourceListing:
    return _rec_listing("rec", str(rec_path), [rec_path], progress)


def list_packed(data_dir: Path, progress: bool = True) -> SourceListing:
    """Every record of a dataset packed by this tool (its train shards; masked shards are derived data)."""
    manifest = load_manifest(data_dir)
    recs = [rec for (rec, _), shard in zip(shard_paths(data_dir, manifest), manifest["shards"])
            if shard.get("kind", "train") == "train"]
    return _rec_listing("packed", str(data_dir), recs, progress)


def list_source(src: str, label_regex: Optional[str] = None, list_root: Optional[Path] = None,
                progress: bool = True) -> SourceListing:
    path = Path(src)
    if not path.exists():
        raise SourceError(f"source {src} does not exist")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return list_packed(path, progress)
        if label_regex:
            return list_flat_folder(path, label_regex)
        with os.scandir(path) as it:
            if not any(e.is_dir() for e in it):
                raise SourceError(f"{src} has no identity sub-folders; for a flat folder give --label-regex "
                                  f"(for example '^(subject\\d+)\\.')")
        return list_image_folder(path, progress)
    if path.suffix == ".rec":
        return list_rec(path, progress)
    return list_file(path, list_root)
