"""Enumerating the images of a pack's sources: ImageFolder trees, list files, flat folders, `.rec` files.

Enumeration only reads directory entries, list lines and record headers; pixels are read later by the
pack workers. Everything that is not turned into a candidate image is returned as a `Skip`, never dropped.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .manifest import MANIFEST, load_manifest, shard_paths
from .recordio import IndexedRecordIO, RecordIO, RecordIOError, first_label, unpack_record


class SourceError(ValueError):
    """A source cannot be read at all (as opposed to single bad files in it, which are skipped)."""


@dataclass(frozen=True)
class Item:
    """One candidate image: a file path, or a record (rec path, byte offset)."""

    source: int
    class_name: str
    path: str
    offset: int = -1  # >= 0: a record at this byte offset of the .rec `path`
    size: int = 0  # bytes on disk (files) for the input fingerprint

    @property
    def display(self) -> str:
        return f"{self.path}@{self.offset}" if self.offset >= 0 else self.path


@dataclass(frozen=True)
class Skip:
    display: str
    reason: str
    detail: str = ""


@dataclass
class SourceListing:
    kind: str
    root: str
    items: list[Item] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    numeric_classes: bool = False  # class names are integers: order them as numbers


def _sorted_entries(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def list_image_folder(root: Path, source: int, progress: bool = True) -> SourceListing:
    out = SourceListing("imagefolder", str(root))
    for entry in tqdm(_sorted_entries(root), desc=f"scan {root.name}", unit="class", leave=False,
                      disable=not progress):
        if entry.is_dir():
            files = []
            for dirpath, dirnames, filenames in os.walk(entry.path):
                dirnames.sort()
                for name in sorted(filenames):
                    files.append(os.path.join(dirpath, name))
            if not files:
                out.empty_classes.append(entry.name)
                continue
            for f in files:
                out.items.append(Item(source, entry.name, f, size=_file_size(f)))
        else:
            out.skips.append(Skip(entry.path, "not in an identity folder"))
    return out


def list_flat_folder(root: Path, source: int, label_regex: str) -> SourceListing:
    pattern = re.compile(label_regex)
    out = SourceListing("flat", str(root))
    for entry in _sorted_entries(root):
        if entry.is_dir():
            out.skips.append(Skip(entry.path, "folder inside a flat source"))
            continue
        m = pattern.search(entry.name)
        if m is None:
            out.skips.append(Skip(entry.path, "no label match", f"{label_regex!r} does not match the name"))
            continue
        label = m.group("label") if "label" in pattern.groupindex else (m.group(1) if m.groups() else m.group(0))
        out.items.append(Item(source, label, entry.path, size=_file_size(entry.path)))
    return out


def list_file(path: Path, source: int, root: Optional[Path] = None) -> SourceListing:
    """`path<TAB>label` lines, or im2rec's `index<TAB>label[<TAB>label...]<TAB>path` lines.

    Relative paths are taken from `root`, else from the list file's folder.
    """
    base = root or path.parent
    out = SourceListing("list", str(path))
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
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
            full = rel if os.path.isabs(rel) else str(base / rel)
            out.items.append(Item(source, label.strip(), full, size=_file_size(full)))
    out.numeric_classes = bool(out.items) and all(_is_int(i.class_name) for i in out.items)
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def list_rec(rec_path: Path, source: int, progress: bool = True) -> SourceListing:
    """Image records of a `.rec` (with its `.idx` beside it, or scanned without one).

    An insightface-style file starts with a header record (flag > 0, no image) whose label gives the
    image key range [1, a) and the identity-record range [a, b); identity records are no images either.
    Every record whose image part is empty is structure, not data: it never reaches a decoder.
    """
    out = SourceListing("rec", str(rec_path))
    out.numeric_classes = True
    idx_path = rec_path.with_suffix(".idx")
    try:
        if idx_path.is_file():
            reader = IndexedRecordIO(idx_path, rec_path, "r")
            entries = sorted(reader.idx.items(), key=lambda kv: kv[1])
            records = ((key, off, reader.read_at(off)) for key, off in entries)
            total = len(entries)
        else:
            reader = RecordIO(rec_path, "r")
            records = ((None, off, payload) for off, payload in reader.scan())
            total = None
    except (OSError, RecordIOError) as e:
        raise SourceError(f"cannot read {rec_path}: {e}") from None
    image_keys: Optional[range] = None
    with reader:
        it = iter(tqdm(records, total=total, desc=f"scan {rec_path.name}", unit="rec", leave=False,
                       disable=not progress))
        while True:
            try:
                key, off, payload = next(it)
            except StopIteration:
                break
            except RecordIOError as e:
                out.skips.append(Skip(f"{rec_path}", "corrupt record", str(e)))
                if total is None:
                    break  # without an index nothing after a broken frame can be found
                continue
            try:
                header, image = unpack_record(payload)
            except RecordIOError as e:
                out.skips.append(Skip(f"{rec_path}@{off}", "corrupt record", str(e)))
                continue
            if off == 0 and header.flag > 0 and not image:
                # insightface's header record: label (first identity record's key, end); images before it
                image_keys = range(1, int(header.label[0]))
                continue
            if image_keys is not None and key is not None and key not in image_keys:
                continue  # an identity record: (start, end) of its images, no pixels
            if not image:
                continue
            out.items.append(Item(source, str(int(first_label(header))), str(rec_path), off))
    return out


def list_packed(data_dir: Path, source: int, progress: bool = True) -> SourceListing:
    """Every record of a dataset packed by this tool (its train shards; masked shards are derived data)."""
    manifest = load_manifest(data_dir)
    out = SourceListing("packed", str(data_dir))
    out.numeric_classes = True
    for (rec, _), shard in zip(shard_paths(data_dir, manifest), manifest["shards"]):
        if shard.get("kind", "train") != "train":
            continue
        sub = list_rec(rec, source, progress)
        out.items.extend(sub.items)
        out.skips.extend(sub.skips)
    return out


def list_source(src: str, source: int, label_regex: Optional[str] = None,
                list_root: Optional[Path] = None, progress: bool = True) -> SourceListing:
    path = Path(src)
    if not path.exists():
        raise SourceError(f"source {src} does not exist")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return list_packed(path, source, progress)
        if label_regex:
            return list_flat_folder(path, source, label_regex)
        entries = _sorted_entries(path)
        if not any(e.is_dir() for e in entries):
            raise SourceError(f"{src} has no identity sub-folders; for a flat folder give --label-regex "
                              f"(for example '^(subject\\d+)\\.')")
        return list_image_folder(path, source, progress)
    if path.suffix == ".rec":
        return list_rec(path, source, progress)
    return list_file(path, source, list_root)
