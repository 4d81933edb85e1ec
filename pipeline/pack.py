"""`python -m pipeline pack`: face images in, shuffled MXNet RecordIO shards plus a manifest out.

Order of work, and why:
1. Enumerate every source (no pixels read) and give each identity a contiguous class id.
2. Hold out `--holdout` images per identity (for verification pairs of people seen in training).
3. Shuffle the rest across identities with the seed: DALI shuffles only inside a buffer and hands each
   rank a contiguous block, so the order on disk is the order that matters.
4. Decode/convert/encode in worker processes, in that order; the main process writes records and cuts
   shards at `--shard-size`. The same input and seed therefore give byte-identical shards.
5. Each finished shard is renamed into place and recorded in a journal under `.pack-state/`; an
   interrupted pack resumes from the last finished shard. `manifest.json` is written last, so a folder
   without it never looks complete.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tqdm import tqdm

from .atomic import atomic_write_bytes, atomic_write_json
from .attributes import load_attributes
from .imageio import RESIZE_MODES, ImageRejected, prepare_image
from .manifest import MANIFEST, VERSION, identity_label_fields, identity_label_vector, load_manifest
from .recordio import (
    IndexedRecordIO,
    IRHeader,
    RecordIO,
    RecordIOError,
    first_label,
    frame_record,
    pack_record,
    unpack_record,
)
from .shards import ShardWriter
from .sources import Item, Skip, SourceError, list_source

STATE_DIR = ".pack-state"
JOURNAL = "journal.json"
SKIPPED = "skipped.tsv"
CLASSES = "classes.tsv"
HOLDOUT_PAIRS = "holdout_pairs.bin"


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
    resize_mode: str = "crop"
    attributes: Optional[str] = None  # TSV or CelebA list_attr_celeba.txt (pipeline/attributes.py)
    overwrite: bool = False
    progress: bool = True

    def fingerprint_fields(self) -> dict:
        d = asdict(self)
        for k in ("out", "workers", "overwrite", "progress", "strict"):
            d.pop(k)
        d["sources"] = [os.path.abspath(s) for s in self.sources]
        if self.attributes:
            d["attributes_sha256"] = hashlib.sha256(Path(self.attributes).read_bytes()).hexdigest()
        return d


@dataclass(frozen=True)
class Task:
    """One image to process, in write order."""

    item: Item
    class_id: int
    rec_id: int
    stream: str  # "holdout" or "train"
    attributes: tuple = ()  # values of the attribute fields, -1 where unknown


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(size, quality, resize_mode, align, num_classes) -> None:
    _WORKER.update(size=tuple(size), quality=quality, resize_mode=resize_mode, transform=None, recs={},
                   num_classes=num_classes)
    if align:
        from .align import align_face  # imported in the worker: mediapipe state is per process

        _WORKER["transform"] = align_face


def _read_input(item: Item) -> bytes:
    if item.offset < 0:
        with open(item.path, "rb") as f:
            return f.read()
    recs = _WORKER["recs"]
    if item.path not in recs:  # kept open (mapped) for the worker's life: a source .rec is read throughout
        recs[item.path] = RecordIO(item.path, "r")
    return unpack_record(recs[item.path].read_at(item.offset))[1]


def _process(task: Task):
    """(status, data, content hash, notes): 'ok' with the framed record, or 'skip' with (reason, detail)."""
    try:
        raw = _read_input(task.item)
    except FileNotFoundError:
        return "skip", ("missing file", ""), b"", []
    except (OSError, RecordIOError) as e:
        return "skip", ("unreadable", str(e)), b"", []
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    try:
        jpeg, notes = prepare_image(raw, _WORKER["size"], _WORKER["quality"], _WORKER["resize_mode"],
                                    _WORKER["transform"])
    except ImageRejected as e:
        return "skip", (e.reason, e.detail), digest, []
    except Exception as e:  # a decoder bug on one file must not end a multi-hour pack
        return "skip", ("corrupt image", f"{type(e).__name__}: {e}"), digest, []
    # Framing here keeps the single writer process down to I/O and checksums.
    label = identity_label_vector(task.class_id, _WORKER["num_classes"])
    if task.attributes:
        label = (label or [float(task.class_id)]) + list(task.attributes)
    header = IRHeader(0, float(task.class_id) if label is None else label, task.rec_id, 0)
    return "ok", frame_record(pack_record(header, jpeg)), digest, notes


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    tasks: list[Task]
    class_names: list[str]
    num_classes: int
    num_train: int
    num_holdout: int
    enum_skips: list[Skip]
    empty_classes: list[str]
    sources: list[dict]
    fingerprint: str
    attribute_fields: list[str] = field(default_factory=list)


def plan_pack(opts: PackOptions) -> Plan:
    listings = []
    for i, src in enumerate(opts.sources):
        listing = list_source(src, i, opts.label_regex, Path(opts.list_root) if opts.list_root else None,
                              opts.progress)
        listings.append(listing)
    items_by_class: dict = defaultdict(list)
    class_order: list = []
    for listing in listings:
        names = sorted({it.class_name for it in listing.items},
                       key=(lambda n: int(n)) if listing.numeric_classes else (lambda n: n))
        for name in names:
            key = name if opts.merge_classes else (listing.items[0].source, name)
            if key not in items_by_class:
                class_order.append(key)
                items_by_class[key]  # noqa: B018 - creates the entry in first-seen order
        for it in listing.items:
            items_by_class[it.class_name if opts.merge_classes else (it.source, it.class_name)].append(it)
    if opts.keep_labels:
        bad = [k for k in class_order if not str(k if opts.merge_classes else k[1]).lstrip("-").isdigit()]
        if bad:
            raise PackError(f"--keep-labels needs integer labels; {len(bad)} are not (first: {bad[0]!r})")
        class_ids = {k: int(k if opts.merge_classes else k[1]) for k in class_order}
        if class_ids and min(class_ids.values()) < 0:
            raise PackError("--keep-labels needs labels >= 0")
        num_classes = max(class_ids.values()) + 1 if class_ids else 0
    else:
        class_ids = {k: i for i, k in enumerate(class_order)}
        num_classes = len(class_order)
    class_names = [""] * num_classes
    for k, cid in class_ids.items():
        label = k if opts.merge_classes else f"{k[1]}"
        class_names[cid] = label if (opts.merge_classes or len(opts.sources) == 1) else f"{k[0]}/{k[1]}"

    rng = np.random.default_rng([opts.seed, 0])
    holdout: list[tuple[Item, int]] = []
    train: list[tuple[Item, int]] = []
    for key in class_order:
        items = items_by_class[key]
        k = min(opts.holdout, len(items) - 1) if opts.holdout > 0 else 0
        chosen = set(rng.choice(len(items), size=k, replace=False).tolist()) if k > 0 else set()
        for j, it in enumerate(items):
            (holdout if j in chosen else train).append((it, class_ids[key]))
    order = np.random.default_rng([opts.seed, 1]).permutation(len(train))
    attr_names, attrs_of = load_attributes(opts.attributes, listings) if opts.attributes else ([], None)

    def attrs(it: Item) -> tuple:
        return attrs_of(it) if attrs_of else ()

    tasks = [Task(train[j][0], train[j][1], pos, "train", attrs(train[j][0])) for pos, j in enumerate(order.tolist())]
    tasks = [Task(it, cid, len(train) + j, "holdout", attrs(it)) for j, (it, cid) in enumerate(holdout)] + tasks

    fp = hashlib.sha256(json.dumps(opts.fingerprint_fields(), sort_keys=True).encode())
    for t in tasks:
        fp.update(f"{t.item.display}\t{t.item.size}\t{t.class_id}\t{t.rec_id}\t{t.stream}\t{t.attributes}\n".encode())
    return Plan(
        tasks=tasks, class_names=class_names, num_classes=num_classes, num_train=len(train),
        num_holdout=len(holdout),
        enum_skips=[s for listing in listings for s in listing.skips],
        empty_classes=[f"{lst.root}/{c}" for lst in listings for c in lst.empty_classes],
        sources=[{"path": os.path.abspath(lst.root), "kind": lst.kind, "candidates": len(lst.items)}
                 for lst in listings],
        fingerprint=fp.hexdigest(),
        attribute_fields=attr_names,
    )


# ---------------------------------------------------------------------------------------------- the pack
def _dataset_files(out: Path) -> list[Path]:
    pats = ("train-*", "masked-*", "holdout-*", MANIFEST, SKIPPED, CLASSES, HOLDOUT_PAIRS, "maskgen*")
    return [p for pat in pats for p in out.glob(pat)]


def _prepare_out(opts: PackOptions, plan: Plan) -> Optional[dict]:
    """Make `out` ready; return the journal to resume from, or None for a fresh start."""
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    state = out / STATE_DIR
    if (out / MANIFEST).exists():
        if not opts.overwrite:
            raise PackError(f"{out} already holds a finished dataset; pass --overwrite to replace it")
        for p in _dataset_files(out):
            p.unlink()
        shutil.rmtree(state, ignore_errors=True)
    journal_path = state / JOURNAL
    if journal_path.is_file():
        journal = json.loads(journal_path.read_text())
        if journal.get("fingerprint") == plan.fingerprint and _journal_intact(out, journal):
            return journal
        print(f"pack: {out} holds an unfinished pack of other input or options; starting over", flush=True)
    shutil.rmtree(state, ignore_errors=True)
    for p in _dataset_files(out):
        p.unlink()
    state.mkdir()
    return None


def _journal_intact(out: Path, journal: dict) -> bool:
    for entry in journal["shards"]:
        rec = out / entry["rec"]
        if not rec.is_file() or rec.stat().st_size != entry["bytes"]:
            return False
    return True


def pack(opts: PackOptions) -> dict:
    """Run a pack (or finish an interrupted one); return the manifest."""
    if opts.resize_mode not in RESIZE_MODES:
        raise PackError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}")
    if not 1 <= opts.quality <= 100:
        raise PackError("--quality must be in 1..100")
    out = opts.out
    try:
        plan = plan_pack(opts)
    except SourceError as e:
        raise PackError(str(e)) from None
    if (out / MANIFEST).exists() and not opts.overwrite:
        existing = load_manifest(out)
        if existing.get("fingerprint") == plan.fingerprint:
            print(f"pack: {out} is already packed from this input with these options", flush=True)
            return existing
    if plan.num_train == 0:
        raise PackError("no images found in the sources")
    if opts.strict and plan.enum_skips:
        s = plan.enum_skips[0]
        raise PackError(f"--strict: {len(plan.enum_skips)} inputs skipped, first {s.display}: {s.reason}")
    if plan.num_classes > (1 << 24):
        print(f"pack: {plan.num_classes} identities exceed float32's exact range (2^24); labels are also "
              f"stored as exact (hi, lo) pieces, see label_fields", flush=True)

    journal = _prepare_out(opts, plan)
    state = out / STATE_DIR
    if journal is None:
        journal = {"fingerprint": plan.fingerprint, "shards": [], "next_task": 0, "skipped_bytes": 0,
                   "counters": {}, "hash_files": []}
    seen: dict[bytes, str] = {}
    for name in journal["hash_files"]:
        for digest, disp in pickle.loads((state / name).read_bytes()):
            seen[digest] = disp
    counters = Counter(journal["counters"])
    with open(state / "skipped.partial", "ab") as f:
        f.truncate(journal["skipped_bytes"])
    skipped_log = open(state / "skipped.partial", "a", encoding="utf-8")
    if journal["next_task"] == 0 and journal["skipped_bytes"] == 0:
        for s in plan.enum_skips:
            _log_skip(skipped_log, counters, s.display, s.reason, s.detail)

    max_bytes = int(opts.shard_size_mb * (1 << 20))
    done_by_kind = Counter(e["kind"] for e in journal["shards"])
    writers = {"train": ShardWriter(out, "train", max_bytes, done_by_kind["train"]),
               "holdout": ShardWriter(out, "holdout", max_bytes, done_by_kind["holdout"])}
    pending_hashes: dict[str, list[tuple[bytes, str]]] = {"train": [], "holdout": []}

    def finish_shard(kind: str, next_task: int) -> None:
        entry, _ = writers[kind].finish(kind)
        name = f"{entry['rec']}.hashes"
        atomic_write_bytes(state / name, pickle.dumps(pending_hashes[kind]))
        pending_hashes[kind] = []
        skipped_log.flush()
        journal["shards"].append(entry)
        journal["hash_files"].append(name)
        journal["next_task"] = next_task
        journal["skipped_bytes"] = os.path.getsize(state / "skipped.partial")
        journal["counters"] = dict(counters)
        atomic_write_json(state / JOURNAL, journal)

    start = journal["next_task"]
    tasks = plan.tasks
    try:
        for pos, task, result in _run_workers(opts, tasks, start, plan.num_classes):
            status, data, digest, notes = result
            display = task.item.display
            if status == "ok" and digest in seen:
                status, data = "skip", ("duplicate", f"same bytes as {seen[digest]}")
            if status == "skip":
                if opts.strict:
                    raise PackError(f"--strict: {display}: {data[0]}" + (f" ({data[1]})" if data[1] else ""))
                _log_skip(skipped_log, counters, display, *data)
            else:
                seen[digest] = display
                counters.update(notes)
                counters["images:" + task.stream] += 1
                pending_hashes[task.stream].append((digest, display))
                if writers[task.stream].add(task.rec_id, data, digest):
                    finish_shard(task.stream, pos + 1)
            # A stream ends: close its last shard so that shard boundaries depend on the input alone.
            nxt = tasks[pos + 1].stream if pos + 1 < len(tasks) else None
            if nxt != task.stream and writers[task.stream].pending:
                finish_shard(task.stream, pos + 1)
    except BaseException:
        for w in writers.values():
            w.abandon()
        skipped_log.close()
        raise
    skipped_log.close()
    return _finalise(opts, plan, journal, counters)


def _log_skip(log, counters: Counter, display: str, reason: str, detail: str = "") -> None:
    clean = lambda s: s.replace("\t", " ").replace("\n", " ")  # noqa: E731
    log.write(f"{clean(display)}\t{reason}\t{clean(detail)}\n")
    counters["skipped:" + reason] += 1


def _run_workers(opts: PackOptions, tasks: list[Task], start: int,
                 num_classes: int) -> Iterable[tuple[int, Task, tuple]]:
    todo = tasks[start:]
    bar = tqdm(total=len(tasks), initial=start, desc="pack", unit="img", disable=not opts.progress,
               smoothing=0.05)
    init = (opts.size, opts.quality, opts.resize_mode, opts.align, num_classes)
    try:
        if opts.workers <= 1:
            _init_worker(*init)
            results = map(_process, todo)
            for pos, (task, res) in enumerate(zip(todo, results), start):
                bar.update()
                yield pos, task, res
            return
        ctx = mp.get_context("fork" if not opts.align else "spawn")
        with ctx.Pool(opts.workers, initializer=_init_worker, initargs=init) as pool:
            results = pool.imap(_process, todo, chunksize=32)
            for pos, (task, res) in enumerate(zip(todo, results), start):
                bar.update()
                yield pos, task, res
    finally:
        bar.close()


def _finalise(opts: PackOptions, plan: Plan, journal: dict, counters: Counter) -> dict:
    out, state = opts.out, opts.out / STATE_DIR
    train_shards = [e for e in journal["shards"] if e["kind"] == "train"]
    holdout_shards = [e for e in journal["shards"] if e["kind"] == "holdout"]
    skipped = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("skipped:")}
    conversions = {k: v for k, v in counters.items() if ":" not in k}
    written_train = sum(e["count"] for e in train_shards)
    if written_train == 0:
        os.replace(state / "skipped.partial", out / SKIPPED)
        raise PackError(f"every input was skipped ({sum(skipped.values())}); the reasons are in {out / SKIPPED}")
    lines = "".join(f"{i}\t{name}\n" for i, name in enumerate(plan.class_names))
    atomic_write_bytes(out / CLASSES, lines.encode())
    os.replace(state / "skipped.partial", out / SKIPPED)
    manifest = {
        "version": VERSION,
        "image_size": list(opts.size),
        "num_images": written_train,
        "num_classes": plan.num_classes,
        "label_fields": identity_label_fields(plan.num_classes) + plan.attribute_fields,
        "shards": train_shards,
        "next_id": plan.num_train + plan.num_holdout,
        "classes_file": CLASSES,
        "sources": plan.sources,
        "seed": opts.seed,
        "quality": opts.quality,
        "resize_mode": opts.resize_mode,
        "aligned": opts.align,
        "skipped": {"count": sum(skipped.values()), "by_reason": dict(sorted(skipped.items())), "file": SKIPPED},
        "empty_classes": plan.empty_classes,
        "conversions": dict(sorted(conversions.items())),
        "fingerprint": plan.fingerprint,
        "created_by": "python -m pipeline pack",
    }
    if holdout_shards:
        pairs = _write_holdout_pairs(out, holdout_shards, opts)
        manifest["holdout"] = {"shards": holdout_shards, "num_images": sum(e["count"] for e in holdout_shards),
                               "pairs": HOLDOUT_PAIRS, "num_pairs": pairs}
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(state, ignore_errors=True)
    return manifest


def _write_holdout_pairs(out: Path, shards: list[dict], opts: PackOptions) -> int:
    """An insightface verification pack over the held-out images: every genuine pair, as many impostors."""
    images: list[bytes] = []
    labels: list[int] = []
    for e in shards:
        with IndexedRecordIO(out / e["idx"], out / e["rec"], "r") as r:
            for key in r.keys:
                header, img = unpack_record(r.read_idx(key))
                images.append(img)
                labels.append(int(first_label(header)))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_class[lab].append(i)
    genuine = [(a, b) for members in by_class.values() for x, a in enumerate(members) for b in members[x + 1:]]
    rng = np.random.default_rng([opts.seed, 2])
    impostor: set[tuple[int, int]] = set()
    n = len(labels)
    max_impostors = n * (n - 1) // 2 - len(genuine)
    target = min(len(genuine), max_impostors)
    while len(impostor) < target:
        a, b = sorted(rng.integers(0, n, size=2).tolist())
        if a != b and labels[a] != labels[b]:
            impostor.add((a, b))
    pairs = [(a, b, True) for a, b in genuine] + [(a, b, False) for a, b in sorted(impostor)]
    if opts.holdout_pairs and len(pairs) > opts.holdout_pairs:
        keep = rng.choice(len(pairs), size=opts.holdout_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    order = rng.permutation(len(pairs))
    bins: list[bytes] = []
    issame: list[bool] = []
    for i in order.tolist():
        a, b, same = pairs[i]
        bins += [images[a], images[b]]
        issame.append(same)
    atomic_write_bytes(out / HOLDOUT_PAIRS, pickle.dumps((bins, issame), protocol=4))
    return len(issame)
