"""A pack's plan and the layout of its state: what `pipeline.pack` (every part) and `pipeline.merge` share.

The plan (`plan_pack`), and why:
1. Enumerate every source (no pixels read) and give each identity a contiguous class id.
2. Hold out `--holdout` images per identity (for verification pairs of people seen in training), then
   `--val-split` of each identity's remaining images (a stratified validation split: at least one image
   of an identity with two or more left, never its last one).
3. Shuffle the rest across identities with the seed: DALI shuffles only inside a buffer and hands each
   rank a contiguous block, so the order on disk is the order that matters. Holdout images come first
   in this write order, then the validation images, then the shuffled training images; each gets its
   record id from its position (training images 0..num_train-1, the others after them).

Every part of a pack (`--part K/N`) computes the same plan (class ids, holdout, shuffle: they depend on
the listing and the seed alone) and packs the K-th of N contiguous ranges of the write order
(`part_range`). Memory: the plan is numpy arrays and byte buffers (`pipeline.sources`).

The state layout: `.pack-state/plan.json` records the options, the plan's fingerprint and the number of
parts, and `.pack-state/part-K/journal.json` the finished shards of part K (`load_journal`,
`journal_intact`).
In `classes.tsv` (`id<TAB>name` lines) a tab, newline or backslash in a name is written as `\\t`, `\\n`,
`\\\\` (`tsv_field`); `skipped.tsv` holds one `skip_line` per image left out.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .attributes import load_attributes
from .sources import SourceListing, list_source

STATE_DIR = ".pack-state"
PLAN = "plan.json"
JOURNAL = "journal.json"
SKIPPED = "skipped.tsv"
CLASSES = "classes.tsv"
HOLDOUT_PAIRS = "holdout_pairs.bin"
# The streams of the write order, in that order (docs/design.md section 1: shard kinds).
STREAMS = ("holdout", "val", "train")


class PackError(RuntimeError):
    """The pack cannot go on; the message is the one-line reason shown to the user."""


@dataclass
class PackOptions:
    sources: list[str]
    out: Path
    size: tuple[int, int] = (112, 112)
    quality: int = 95
    shard_size_mb: float = 1024.0
    seed: int = 0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    strict: bool = False
    align: bool = False
    label_regex: Optional[str] = None
    list_root: Optional[str] = None
    merge_classes: bool = False
    keep_labels: bool = False
    holdout: int = 0
    holdout_pairs: int = 0
    val_split: float = 0.0  # share of each identity's images (after --holdout) in the "val" shards
    resize_mode: str = "crop"
    attributes: Optional[str] = None  # TSV or CelebA list_attr_celeba.txt (pipeline/attributes.py)
    overwrite: bool = False
    progress: bool = True
    part: tuple[int, int] = (0, 1)  # (K, N): this process packs the K-th of N ranges

    def fingerprint_fields(self) -> dict:
        d = asdict(self)
        for k in ("out", "workers", "overwrite", "progress", "strict", "part"):
            d.pop(k)
        if not self.val_split:
            d.pop("val_split")  # a pack without a validation split keeps the fingerprint it had before it
        d["sources"] = [os.path.abspath(s) for s in self.sources]
        if self.attributes:
            d["attributes_sha256"] = hashlib.sha256(Path(self.attributes).read_bytes()).hexdigest()
        return d

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["sources"] = [os.path.abspath(s) for s in self.sources]
        return d

    @classmethod
    def from_json(cls, d: dict, out: Path, progress: bool = True) -> "PackOptions":
        d = dict(d, out=out, progress=progress, part=(0, 1), size=tuple(d["size"]))
        return cls(**d)



# ---------------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """The write order of a pack as arrays: position p holds global item `order[p]`; the first
    `num_holdout` positions are the holdout stream, the next `num_val` the validation stream, the rest the
    shuffled training stream."""

    listings: list[SourceListing]
    starts: np.ndarray  # global index of each listing's first item, then the total
    item_cid: np.ndarray  # class id of each global item
    order: np.ndarray
    num_classes: int
    num_train: int
    num_holdout: int
    class_src: np.ndarray  # per class id: its source (-1: no identity has this id) ...
    class_local: np.ndarray  # ... and its index in that source's class names
    fingerprint: str
    merge_classes: bool = False
    attribute_fields: list[str] = field(default_factory=list)
    attrs_of: Optional[object] = None
    num_val: int = 0

    @property
    def total(self) -> int:
        return len(self.order)

    def item(self, pos: int) -> tuple[SourceListing, int, int]:
        g = int(self.order[pos])
        s = int(np.searchsorted(self.starts, g, side="right")) - 1
        return self.listings[s], g - int(self.starts[s]), g

    def stream(self, pos: int) -> str:
        if pos < self.num_holdout:
            return "holdout"
        return "val" if pos < self.num_holdout + self.num_val else "train"

    def rec_id(self, pos: int) -> int:
        held = self.num_holdout + self.num_val
        return self.num_train + pos if pos < held else pos - held

    def task(self, pos: int) -> tuple:
        listing, i, g = self.item(pos)
        path = listing.path(i)
        offset = listing.offset(i)
        attrs = self.attrs_of(path, offset) if self.attrs_of else ()
        return path, offset, int(self.item_cid[g]), self.rec_id(pos), attrs

    def display(self, pos: int) -> str:
        listing, i, _ = self.item(pos)
        return listing.display(i)

    def class_name(self, cid: int) -> str:
        s = int(self.class_src[cid])
        if s < 0:
            return ""
        name = self.listings[s].class_names[int(self.class_local[cid])]
        return name if (self.merge_classes or len(self.listings) == 1) else f"{s}/{name}"

    @property
    def enum_skips(self) -> list:
        return [s for listing in self.listings for s in listing.skips]

    @property
    def empty_classes(self) -> list[str]:
        return [f"{lst.root}/{c}" for lst in self.listings for c in lst.empty_classes]

    @property
    def sources(self) -> list[dict]:
        return [{"path": os.path.abspath(lst.root), "kind": lst.kind, "candidates": len(lst)}
                for lst in self.listings]


def _check_out_outside_sources(opts: PackOptions) -> None:
    out = Path(os.path.abspath(opts.out))
    for src in opts.sources:
        s = Path(os.path.abspath(src))
        if s.is_dir() and (out == s or s in out.parents):
            raise PackError(f"--out {opts.out} is inside the source {src}: a rerun would pack the output "
                            f"as a new identity; choose a folder outside it")


def plan_pack(opts: PackOptions) -> Plan:
    _check_out_outside_sources(opts)
    listings = [list_source(src, opts.label_regex, Path(opts.list_root) if opts.list_root else None,
                            opts.progress) for src in opts.sources]
    # Per source: each local identity's rank (first-seen order over the sources) and class id.
    ranks, cids = [], []
    key_rank: dict = {}
    key_first: list = []  # per rank: (source, local index)
    for s, lst in enumerate(listings):
        n = len(lst.class_names)
        if opts.merge_classes:
            r = np.empty(n, np.int64)
            for j in range(n):
                key = lst.class_names.raw(j)
                if key not in key_rank:
                    key_rank[key] = len(key_first)
                    key_first.append((s, j))
                r[j] = key_rank[key]
        else:
            r = np.arange(len(key_first), len(key_first) + n, dtype=np.int64)
            key_first += [(s, j) for j in range(n)]
        ranks.append(r)
    num_ranks = len(key_first)
    if opts.keep_labels:
        for s, lst in enumerate(listings):
            names = [lst.class_names[j] for j in range(len(lst.class_names))]
            bad = [n for n in names if not n.lstrip("-").isdigit()]
            if bad:
                raise PackError(f"--keep-labels needs integer labels; {len(bad)} are not (first: {bad[0]!r})")
            c = np.array([int(n) for n in names], np.int64)
            if len(c) and c.min() < 0:
                raise PackError("--keep-labels needs labels >= 0")
            cids.append(c)
        num_classes = max((int(c.max()) + 1 for c in cids if len(c)), default=0)
    else:
        cids = ranks
        num_classes = num_ranks
    class_src = np.full(num_classes, -1, np.int32)
    class_local = np.full(num_classes, -1, np.int64)
    for r_, (s, j) in enumerate(key_first):
        cid = int(cids[s][j])
        class_src[cid], class_local[cid] = s, j
    starts = np.cumsum([0] + [len(lst) for lst in listings]).astype(np.int64)
    item_cid = np.concatenate([c[lst.item_class].astype(np.int32) for c, lst in zip(cids, listings)]) \
        if listings else np.zeros(0, np.int32)
    item_rank = np.concatenate([r[lst.item_class] for r, lst in zip(ranks, listings)])
    # Items grouped by identity (first-seen order), each identity's items in listing order.
    if len(item_rank) and np.any(np.diff(item_rank) < 0):
        grouped = np.argsort(item_rank, kind="stable")
    else:
        grouped = np.arange(len(item_rank), dtype=np.int64)
    counts = np.bincount(item_rank, minlength=num_ranks) if len(item_rank) else np.zeros(0, np.int64)
    del item_rank

    held = np.zeros(len(grouped), bool)
    val = np.zeros(len(grouped), bool)
    if opts.holdout > 0 or opts.val_split > 0:
        rng = np.random.default_rng([opts.seed, 0])
        rng_val = np.random.default_rng([opts.seed, 2])
        start = 0
        for n in counts.tolist():
            k = min(opts.holdout, n - 1)
            if k > 0:
                held[start + rng.choice(n, size=k, replace=False)] = True
            if opts.val_split > 0:
                free = start + np.flatnonzero(~held[start:start + n])
                v = val_count(len(free), opts.val_split)
                if v > 0:
                    val[free[rng_val.choice(len(free), size=v, replace=False)]] = True
            start += n
    holdout = grouped[held]
    val_items = grouped[val]
    train = grouped[~(held | val)]
    del grouped, held, val
    perm = np.random.default_rng([opts.seed, 1]).permutation(len(train))
    order = np.concatenate([holdout, val_items, train[perm]]).astype(np.int64)
    num_holdout, num_val, num_train = len(holdout), len(val_items), len(train)
    del holdout, val_items, train, perm
    attr_names, attrs_of = load_attributes(opts.attributes, listings) if opts.attributes else ([], None)

    fp = hashlib.sha256(json.dumps(opts.fingerprint_fields(), sort_keys=True).encode())
    for lst in listings:
        fp.update(lst.content_digest)
    fp.update(item_cid.tobytes())
    fp.update(order.tobytes())
    fp.update(f"{num_holdout}\t{num_classes}".encode() + (f"\t{num_val}".encode() if num_val else b""))
    return Plan(listings=listings, starts=starts, item_cid=item_cid, order=order, num_classes=num_classes,
                num_train=num_train, num_holdout=num_holdout, class_src=class_src, class_local=class_local,
                fingerprint=fp.hexdigest(), merge_classes=opts.merge_classes, attribute_fields=attr_names,
                attrs_of=attrs_of, num_val=num_val)


def val_count(n: int, share: float) -> int:
    """Validation images of an identity with `n` images left after the holdout: round(share * n), at least
    1 where n >= 2, at most n - 1 (the identity keeps a training image)."""
    return min(max(int(np.floor(share * n + 0.5)), 1 if n >= 2 else 0), n - 1) if n > 0 else 0



# ---------------------------------------------------------------------------------------------- state layout
def part_range(total: int, k: int, n: int) -> tuple[int, int]:
    """Write positions [lo, hi) of part k of n: contiguous, sizes differing by at most one."""
    return k * total // n, (k + 1) * total // n


def shard_prefix(kind: str, k: int, n: int) -> str:
    return kind if n == 1 else f"{kind}-p{k:05d}"


def part_dir(out: Path, k: int) -> Path:
    return out / STATE_DIR / f"part-{k:05d}"


def load_journal(out: Path, k: int) -> Optional[dict]:
    path = part_dir(out, k) / JOURNAL
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def journal_intact(out: Path, journal: dict) -> bool:
    for entry in journal["shards"]:
        rec = out / entry["rec"]
        if not rec.is_file() or rec.stat().st_size != entry["bytes"]:
            return False
    return True


def skip_line(display: str, reason: str, detail: str = "") -> str:
    clean = lambda s: s.replace("\t", " ").replace("\n", " ")  # noqa: E731
    return f"{clean(display)}\t{reason}\t{clean(detail)}\n"


def tsv_field(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

