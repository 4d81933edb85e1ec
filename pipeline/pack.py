"""`python -m pipeline pack`: face images in, shuffled MXNet RecordIO shards plus a manifest out.

Order of work, and why:
1. Compute the plan (`pipeline.pack_plan`): class ids, the holdout and validation images, the shuffled
   write order, each image's record id from its position.
2. Decode/convert/encode in worker processes, in that order; the main process writes records and cuts
   shards at `--shard-size`. The same input and seed therefore give byte-identical shards.
3. Each finished shard is renamed into place and recorded in a journal under `.pack-state/part-K/`; an
   interrupted pack resumes from the last finished shard. `manifest.json` is written last (by
   `pipeline.merge`), so a folder without it never looks complete.

Packing across machines (issue N): `--part K/N` packs the K-th of N contiguous ranges of the write order.
Every part enumerates the sources and computes the same plan, writes `train-pKKKKK-*` shards and its
journal, and `python -m pipeline merge DATA` then checks the parts and writes the one manifest. A
single-machine pack is part 0 of 1 followed by the same merge. Byte-identical duplicates are skipped inside
a part as it goes (the first in write order is kept); a duplicate of an image of an earlier part can only
be seen by the merge, which drops it and rewrites that one shard, so the records are the same as a single
pack's. Memory: the content hashes are `pipeline.digests` runs.

A pack deletes only files it wrote itself: the shards its journals list, and the files a manifest names
when `--overwrite` replaces a finished dataset. Any other file in `--out` that looks like pack output
stops the pack with the files named.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import threading
from array import array
from collections import Counter
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tqdm import tqdm

from .atomic import atomic_write_json, atomic_write_with
from .digests import RECORD, DigestSet, split
from .imageio import RESIZE_MODES, ImageRejected, prepare_image
from .malloc_limits import fix_mmap_threshold
from .manifest import MANIFEST, identity_label_vector, load_manifest
from .merge import merge
from .pack_plan import (
    CLASSES,
    HOLDOUT_PAIRS,
    JOURNAL,
    PLAN,
    SKIPPED,
    STATE_DIR,
    STREAMS,
    PackError,
    PackOptions,
    Plan,
    journal_intact,
    load_journal,
    part_dir,
    part_range,
    plan_pack,
    shard_prefix,
    skip_line,
)
from .recordio import IRHeader, RecordIOError, frame_record, pack_record
from .shards import ShardWriter, read_record_image
from .sources import SourceError
from .worker_pool import worker_pool

# Names a pack (or maskgen) writes: a file of such a name that no journal or manifest lists is not ours.
OUTPUT_PATTERNS = ("train-*", "holdout-*", "val-*", "masked-*", "maskgen*", MANIFEST, SKIPPED, CLASSES,
                   HOLDOUT_PAIRS)
_PARTIAL = re.compile(r"^(?:train|holdout|val)-(?:p(\d{5})-)?\d{5}d?\.rec\.partial$")


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(size, quality, resize_mode, align) -> None:
    _WORKER.update(size=tuple(size), quality=quality, resize_mode=resize_mode, transform=None)
    if align:
        from .align import align_face  # imported in the worker: mediapipe state is per process

        _WORKER["transform"] = align_face


def _read_input(path: str, offset: int) -> bytes:
    if offset < 0:
        with open(path, "rb") as f:
            return f.read()
    return read_record_image(path, offset)


def _process(task: tuple, num_classes: int):
    """(status, data, content hash, notes): 'ok' with the framed record, or 'skip' with (reason, detail)."""
    path, offset, class_id, rec_id, attributes = task
    try:
        raw = _read_input(path, offset)
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
    label = identity_label_vector(class_id, num_classes)
    if attributes:
        label = (label or [float(class_id)]) + list(attributes)
    header = IRHeader(0, float(class_id) if label is None else label, rec_id, 0)
    return "ok", frame_record(pack_record(header, jpeg)), digest, notes


def _process_chunk(job: tuple[int, list]) -> list:
    num_classes, tasks = job  # sent with the tasks: the workers start before the plan exists
    return [_process(t, num_classes) for t in tasks]


# ---------------------------------------------------------------------------------------------- ownership
def _journals(out: Path) -> list[tuple[int, dict]]:
    state = out / STATE_DIR
    found = []
    if state.is_dir():
        for d in sorted(state.glob("part-*")):
            if d.name[5:].isdigit():
                j = load_journal(out, int(d.name[5:]))
                if j is not None:
                    found.append((int(d.name[5:]), j))
    return found


def manifest_files(manifest: dict) -> list[str]:
    """Every file a finished dataset's manifest names (pack's and maskgen's)."""
    names = [s[k] for s in manifest.get("shards", []) for k in ("rec", "idx")]
    names += [s[k] for split in ("holdout", "val") for s in manifest.get(split, {}).get("shards", [])
              for k in ("rec", "idx")]
    names += [manifest.get("classes_file") or "", manifest.get("skipped", {}).get("file") or "",
              manifest.get("holdout", {}).get("pairs") or "", manifest.get("maskgen", {}).get("sidecar") or ""]
    return [n for n in names if n]


def journal_files(journal: dict) -> list[str]:
    return [e[k] for e in journal.get("shards", []) for k in ("rec", "idx")]


def foreign_files(out: Path) -> list[str]:
    """Files in `out` named like pack output that no manifest or journal of ours lists."""
    owned = {MANIFEST}
    if (out / MANIFEST).is_file():
        try:
            owned.update(manifest_files(load_manifest(out)))
        except ValueError:
            pass
    for _, j in _journals(out):
        owned.update(journal_files(j))
    found = set()
    for pat in OUTPUT_PATTERNS:
        for p in out.glob(pat):
            if p.name in owned:
                continue
            m = _PARTIAL.match(p.name)
            if m and part_dir(out, int(m.group(1) or 0)).is_dir():
                continue  # a shard being written by a part of ours
            found.add(p.name)
    if (out / MANIFEST).is_file() and not owned - {MANIFEST}:
        found.add(MANIFEST)  # a manifest.json that is not a dataset's
    return sorted(found)


def _unlink(paths: Iterable[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def remove_dataset(out: Path) -> None:
    """Delete a finished dataset's files: the manifest first (the folder stops looking complete), then
    every file it names, then the pack state."""
    manifest = load_manifest(out)
    (out / MANIFEST).unlink()
    _unlink(out / n for n in manifest_files(manifest))
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _drop_part(out: Path, k: int, journal: Optional[dict]) -> None:
    """Remove what part k wrote: the shards its journal lists, its unfinished shard, its state."""
    if journal:
        _unlink(out / n for n in journal_files(journal))
    for p in out.glob("*.rec.partial"):
        m = _PARTIAL.match(p.name)
        if m and int(m.group(1) or 0) == k:
            p.unlink()
    shutil.rmtree(part_dir(out, k), ignore_errors=True)


def _prepare_part(opts: PackOptions, plan: Plan) -> Optional[dict]:
    """Make `out` ready for this part; return its journal to resume from, or None for a fresh start."""
    out = opts.out
    k, n = opts.part
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        if not opts.overwrite:
            raise PackError(f"{out} already holds a finished dataset; pass --overwrite to replace it")
        foreign = foreign_files(out)
        if foreign:
            raise PackError(f"{out} holds files that are not this dataset's: {_names(foreign)}; move them away")
        remove_dataset(out)
    journal = load_journal(out, k)
    if journal is not None:
        if (journal.get("fingerprint") == plan.fingerprint and journal.get("parts") == n
                and journal_intact(out, journal)):
            return journal
        print(f"pack: {out} holds an unfinished part {k} of other input or options; starting it over", flush=True)
        _drop_part(out, k, journal)
    foreign = foreign_files(out)
    if foreign:
        raise PackError(f"{out} holds files that pack did not write: {_names(foreign)}; move them away or "
                        f"choose another --out")
    _drop_part(out, k, None)
    part_dir(out, k).mkdir(parents=True)
    info = {"fingerprint": plan.fingerprint, "parts": n, "options": opts.to_json()}
    plan_path = out / STATE_DIR / PLAN
    try:
        current = json.loads(plan_path.read_text())
    except (OSError, json.JSONDecodeError):
        current = None
    if current is None or (current["fingerprint"], current["parts"]) != (plan.fingerprint, n):
        atomic_write_json(plan_path, info)
    return None


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# ---------------------------------------------------------------------------------------------- the pack
def _validate(opts: PackOptions) -> None:
    if opts.resize_mode not in RESIZE_MODES:
        raise PackError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}")
    if not 1 <= opts.quality <= 100:
        raise PackError("--quality must be in 1..100")
    if not (opts.shard_size_mb > 0 and np.isfinite(opts.shard_size_mb)):
        raise PackError(f"--shard-size must be a positive number of MB, not {opts.shard_size_mb}")
    if opts.holdout < 0 or opts.holdout_pairs < 0:
        raise PackError("--holdout and --holdout-pairs must be >= 0")
    if not 0.0 <= opts.val_split < 1.0:
        raise PackError(f"--val-split must be a share in [0, 1), not {opts.val_split}")
    k, n = opts.part
    if not 0 <= k < n:
        raise PackError(f"--part K/N needs 0 <= K < N, not {k}/{n}")


def pack(opts: PackOptions) -> dict:
    """Run a pack (or finish an interrupted one). A whole pack returns the manifest; a part of several
    (`opts.part`) returns its journal, and `pipeline.merge.merge` makes the dataset once all are done."""
    _validate(opts)
    # Large freed blocks go back to the system at once: glibc would otherwise raise its mmap threshold
    # past the size of the workers' result chunks (~100 KB) and the writer's heap would fragment, growing
    # ~100 bytes an image (issue N). Set before the workers fork, so theirs is the same.
    fix_mmap_threshold(MMAP_THRESHOLD)
    out = opts.out
    # The workers start before the plan exists: forked after it, each would inherit the plan and the heap
    # the enumeration freed, and copy them page by page as it allocates (issue N: ~40 bytes an image each).
    # mediapipe (--align) cannot run in a forked child of a process that has used it
    context = mp.get_context("fork" if not opts.align else "spawn")
    with worker_pool(opts.workers, _init_worker, (opts.size, opts.quality, opts.resize_mode, opts.align),
                     context) as pool:
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
        if plan.num_classes > (1 << 24) and opts.part[0] == 0:
            print(f"pack: {plan.num_classes} identities exceed float32's exact range (2^24); labels are also "
                  f"stored as exact (hi, lo) pieces, see label_fields", flush=True)
        journal = run_part(opts, plan, pool)
    if opts.part[1] > 1:
        return journal
    return merge(out, opts.progress, plan=plan, opts=opts)


def run_part(opts: PackOptions, plan: Plan, pool: Optional[Pool] = None) -> dict:
    out = opts.out
    k, n = opts.part
    lo, hi = part_range(plan.total, k, n)
    journal = _prepare_part(opts, plan)
    state = part_dir(out, k)
    if journal is None:
        journal = {"fingerprint": plan.fingerprint, "part": k, "parts": n, "range": [lo, hi], "shards": [],
                   "hash_files": [], "next": lo, "skipped_bytes": 0, "counters": {}, "done": False}
    if journal["done"]:
        return journal
    seen = DigestSet(hi - lo)
    for name in journal["hash_files"]:
        seen.extend(np.load(state / name))
    counters = Counter(journal["counters"])
    with open(state / "skipped.partial", "ab") as f:
        f.truncate(journal["skipped_bytes"])
    # File names are kept as the bytes the file system gave: surrogateescape writes them back as such.
    skipped_log = open(state / "skipped.partial", "a", encoding="utf-8", errors="surrogateescape")
    if journal["next"] == 0 and journal["skipped_bytes"] == 0:
        for s in plan.enum_skips:
            _log_skip(skipped_log, counters, s.display, s.reason, s.detail)

    max_bytes = int(opts.shard_size_mb * (1 << 20))
    done_by_kind = Counter(e["kind"] for e in journal["shards"])
    writers = {kind: ShardWriter(out, shard_prefix(kind, k, n), max_bytes, done_by_kind[kind])
               for kind in STREAMS}
    # Per stream, the hashes of the shard being written (hi, lo, position): 24 bytes a record.
    pending = {kind: (array("Q"), array("Q"), array("q")) for kind in STREAMS}

    def finish_shard(kind: str, next_pos: int) -> None:
        entry = writers[kind].finish(kind)
        name = f"{entry['rec']}.hashes.npy"
        hi_words, lo_words, positions = pending[kind]
        rows = np.empty(len(positions), RECORD)
        rows["hi"], rows["lo"], rows["pos"] = hi_words, lo_words, positions
        atomic_write_with(state / name, lambda f: np.save(f, rows))
        pending[kind] = (array("Q"), array("Q"), array("q"))
        skipped_log.flush()
        journal["shards"].append(entry)
        journal["hash_files"].append(name)
        journal["next"] = next_pos
        journal["skipped_bytes"] = os.path.getsize(state / "skipped.partial")
        journal["counters"] = dict(counters)
        atomic_write_json(state / JOURNAL, journal)

    try:
        for pos, result in _run_workers(opts, plan, journal["next"], hi, pool):
            status, data, digest, notes = result
            stream = plan.stream(pos)
            if status == "ok":
                first = seen.get(digest)
                if first >= 0:
                    status, data = "skip", ("duplicate", f"same bytes as {plan.display(first)}")
            if status == "skip":
                display = plan.display(pos)
                if opts.strict:
                    raise PackError(f"--strict: {display}: {data[0]}" + (f" ({data[1]})" if data[1] else ""))
                _log_skip(skipped_log, counters, display, *data)
            else:
                seen.add(digest, pos)
                counters.update(notes)
                counters["images:" + stream] += 1
                hi_word, lo_word = split(digest)
                pending[stream][0].append(hi_word)
                pending[stream][1].append(lo_word)
                pending[stream][2].append(pos)
                if writers[stream].add(plan.rec_id(pos), data):
                    finish_shard(stream, pos + 1)
            # A stream ends: close its last shard so that shard boundaries depend on the input alone.
            nxt = plan.stream(pos + 1) if pos + 1 < hi else None
            if nxt != stream and writers[stream].pending:
                finish_shard(stream, pos + 1)
    except BaseException:
        for w in writers.values():
            w.abandon()
        skipped_log.close()
        raise
    skipped_log.flush()
    journal["next"] = hi
    journal["skipped_bytes"] = os.path.getsize(state / "skipped.partial")
    journal["counters"] = dict(counters)
    journal["done"] = True
    skipped_log.close()
    atomic_write_json(state / JOURNAL, journal)
    return journal


def _log_skip(log, counters: Counter, display: str, reason: str, detail: str = "") -> None:
    log.write(skip_line(display, reason, detail))
    counters["skipped:" + reason] += 1


CHUNK = 32  # images per worker task
MMAP_THRESHOLD = 1 << 16  # below a result chunk's size (32 records of a few KB)
IN_FLIGHT = 4  # chunks per worker between the task maker and the writer


def _run_workers(opts: PackOptions, plan: Plan, start: int, end: int,
                 pool: Optional[Pool]) -> Iterable[tuple[int, tuple]]:
    """(position, result) in write order for positions [start, end); tasks are made as the workers
    take them, never held for the whole range."""
    lo, hi = part_range(plan.total, *opts.part)
    bar = tqdm(total=hi - lo, initial=start - lo, desc="pack" if opts.part[1] == 1 else f"pack part {opts.part[0]}",
               unit="img", disable=not opts.progress, smoothing=0.05)

    # Pool.imap takes tasks as fast as it can and keeps results until they are read: a semaphore keeps
    # at most IN_FLIGHT chunks between the task maker and this loop, whichever side is slower.
    in_flight = threading.Semaphore(IN_FLIGHT * max(1, opts.workers))
    stop = threading.Event()

    def chunks():
        for c in range(start, end, CHUNK):
            in_flight.acquire()
            if stop.is_set():  # the loop below ended early: let the pool's task thread finish
                return
            yield plan.num_classes, [plan.task(p) for p in range(c, min(c + CHUNK, end))]

    try:
        results = map(_process_chunk, chunks()) if pool is None else pool.imap(_process_chunk, chunks())
        try:
            pos = start
            for res in results:
                in_flight.release()
                for r in res:
                    bar.update()
                    yield pos, r
                    pos += 1
        finally:
            stop.set()
            in_flight.release()
    finally:
        bar.close()
