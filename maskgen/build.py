"""`maskgen build`: add masked copies of a seeded, per-identity share of a packed dataset's images.

Order of work, and why:
1. Scan the record headers of the unmasked shards (ids, identities): a few bytes per record.
2. Choose `round(ratio * N)` images, spread over identities by largest remainders (every identity gets
   its share, give or take one image), each identity's images in a seeded order of their ids: the choice
   depends on the seed and the data alone, never on shard layout or worker count.
3. Mask them in worker processes (each holds its own MediaPipe graph); each image draws its mask from a
   random stream seeded by (seed, source id). Records are written in a seeded shuffled order, so the
   masked shards mix identities like the others.
4. New shards are written under temporary names and the manifest is swapped atomically; only then are the
   previous masked shards removed and the new ones given their final names (hard links, each step
   behind another manifest swap). The dataset is consistent at every instant: an interrupted run leaves
   it as it was, or complete with the new masks.

A masked record keeps its source's identity, gets a new unique id (the manifest's `next_id` before any
masks plus the image's position in the write order: an image that cannot be masked leaves its id unused)
and the source's id in `id2`, and carries a label vector named by `label_fields`.

Across machines (issue N): `--part K/N` masks the K-th of N contiguous ranges of the write order into
`maskgen.part-KKKKK.*` files without the lock or the manifest (every part scans and chooses the same
images: the choice depends on the data and the seed alone); `--merge` then checks that all N parts
finished with the same dataset and settings and commits their shards as step 4 does. Memory: the scan is
numpy arrays (~36 bytes a record); only the chosen share becomes task objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from pipeline.imageio import jpeg_quality
from pipeline.landmarks import worker_context
from pipeline.manifest import ManifestError, decode_identity, load_manifest, sha256_file, write_manifest
from pipeline.recordio import (
    IRHeader,
    RecordIOError,
    frame_record,
    map_file,
    pack_record,
    peek_header,
    read_frame,
    read_index,
    release_behind,
    unpack_record,
)
from pipeline.shards import ShardWriter, read_record_image
from pipeline.worker_pool import worker_pool

from .lock import DatasetLock, LockBusy
from .masker import MODE_CHOICES, MODES, Masker, MaskingOptions, skip_reason
from .seeds import image_seeds, seeded_key
from .shapes import MASK_TYPES
from .workers import batched_map

MASKED_KIND = "masked"
PREFIX = "masked"
TMP_PREFIX = "maskgen.tmp-"
PART_PREFIX = "maskgen.part-"  # a part's files until the merge: maskgen.part-00003.masked-00000.rec
SIDECAR = "maskgen-meta.jsonl"
# Label fields maskgen adds after the dataset's own. Codes: mask_type 1.. in MASK_TYPES order, mask_mode
# 1 = 2d, 2 = 3d; 0 in every field on unmasked records (readers pad missing values with 0).
LABEL_FIELDS = ("masked", "mask_type", "mask_mode", "mask_fallback", "mask_nose_covered",
                "mask_r", "mask_g", "mask_b")


class BuildError(RuntimeError):
    """The build cannot go on; the message is the one-line reason shown to the user."""


@dataclass
class BuildOptions(MaskingOptions):
    data: Path
    ratio: float = 0.05
    shard_size_mb: float = 1024.0

    def settings(self) -> dict:
        d = asdict(self)
        for k in ("data", "workers", "progress"):
            d.pop(k)
        d["types"] = list(self.types)
        return d


@dataclass(frozen=True)
class Source:
    """One unmasked record: where it is and what its header says."""

    shard: int
    offset: int
    id: int
    identity: int
    label: tuple  # the record's label values (a scalar label as one value)


@dataclass(frozen=True)
class Task:
    source: Source
    rec_path: str
    seed: int


# ---------------------------------------------------------------------------------------------- scanning
@dataclass
class Scan:
    """Every unmasked record as arrays (issue N: ~36 bytes a record, not an object each): its shard,
    offset, id, identity and label values (padded or cut to the dataset's label fields)."""

    shard: np.ndarray
    offset: np.ndarray
    id: np.ndarray
    identity: np.ndarray
    labels: np.ndarray  # float32 [N, len(label_fields)]

    def __len__(self) -> int:
        return len(self.id)

    def source(self, i: int) -> Source:
        return Source(int(self.shard[i]), int(self.offset[i]), int(self.id[i]), int(self.identity[i]),
                      tuple(self.labels[i].tolist()))


def scan_sources(data: Path, manifest: dict, progress: bool = True,
                 skipped: Optional[Counter] = None) -> Scan:
    """Every unmasked record; one whose identity is outside [0, num_classes) is counted in `skipped`
    ("label out of range") and never copied: a masked copy would hand the trainer a class it has not."""
    shards = manifest["shards"]
    fields = list(manifest["label_fields"])
    num_classes = int(manifest["num_classes"])
    shard_of, offsets, ids, identities, labels = array("i"), array("q"), array("q"), array("q"), array("f")
    width = len(fields)
    for si, shard in enumerate(shards):
        if shard.get("kind", "train") == MASKED_KIND:
            continue
        _, shard_offsets = read_index(data / shard["idx"])
        with map_file(data / shard["rec"]) as buf:
            released = 0
            for off in tqdm(shard_offsets, desc=f"scan {shard['rec']}", unit="rec", disable=not progress,
                            leave=False):
                released = release_behind(buf, released, off)  # a header a record touches every page
                header = peek_header(buf, off)
                if header is None:  # split before its label ends (or malformed: read_frame raises)
                    header, _ = unpack_record(read_frame(buf, off)[0])
                values = np.atleast_1d(header.label).astype(np.float64)
                padded = np.zeros(width)
                padded[:min(len(values), width)] = values[:width]
                identity = int(decode_identity(padded, fields))
                if not 0 <= identity < num_classes:
                    if skipped is not None:
                        skipped["label out of range"] += 1
                    continue
                shard_of.append(si)
                offsets.append(off)
                ids.append(int(header.id))
                identities.append(identity)
                labels.extend(padded.astype(np.float32).tolist())

    def arr(a, dtype):
        return np.frombuffer(a, dtype) if len(a) else np.zeros(0, dtype)

    return Scan(arr(shard_of, np.int32), arr(offsets, np.int64), arr(ids, np.int64), arr(identities, np.int64),
                arr(labels, np.float32).reshape(-1, width))


# ---------------------------------------------------------------------------------------------- choosing
def choose_indices(ids: np.ndarray, identities: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """`round(ratio * N)` record indices, stratified per identity, in a seeded shuffled (write) order."""
    if not 0 < ratio <= 1:
        raise BuildError(f"--ratio must be in (0, 1], got {ratio}")
    ids = np.asarray(ids, np.int64)
    identities = np.asarray(identities, np.int64)
    uniq, group, sizes = np.unique(identities, return_inverse=True, return_counts=True)
    total = int(round(ratio * sizes.sum()))
    exact = ratio * sizes
    take = np.floor(exact).astype(np.int64)
    # Largest remainders get the images left over; ties broken by a seeded key per identity.
    left = total - int(take.sum())
    if left > 0:
        order = np.lexsort((seeded_key(seed, uniq, 1), -(exact - take)))
        take[order[:left]] += 1
    # Each identity's images in a seeded order of their ids (ties: listing order); its first `take`.
    by = np.lexsort((seeded_key(seed, ids, 2), group))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(len(by)) - starts[group[by]]
    chosen = by[rank < take[group[by]]]
    keys = seeded_key(seed, ids[chosen], 3)
    return chosen[np.argsort(keys, kind="stable")]


def choose(sources: Sequence[Source], ratio: float, seed: int) -> list[Source]:
    """`choose_indices` over `Source` objects."""
    picked = choose_indices(np.array([s.id for s in sources], np.int64),
                            np.array([s.identity for s in sources], np.int64), ratio, seed)
    return [sources[i] for i in picked.tolist()]


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(mode: str, types: Sequence[str], aligned: bool, nose_covered: float) -> None:
    _WORKER.update(masker=Masker(mode, types, aligned, nose_covered))


def _read_payload(path: str, offset: int) -> bytes:
    return read_record_image(path, offset)


def mask_records(payloads: Sequence[bytes], seeds: Sequence[int], masker: Masker) -> list[tuple]:
    """Per record's image bytes: (encoded masked JPEG, metadata) or (None, reason), masked together
    (`Masker.mask_batch`: an image whose masking raises is skipped with its reason, alone)."""
    out: list = [None] * len(payloads)
    decoded = {}
    for k, payload in enumerate(payloads):
        arr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None or arr.dtype != np.uint8:
            out[k] = (None, "undecodable image")
            continue
        grey = arr.ndim == 2
        decoded[k] = (cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB if grey else cv2.COLOR_BGR2RGB), grey)
    keys = list(decoded)
    results = masker.mask_batch([decoded[k][0] for k in keys], [seeds[k] for k in keys])
    for k, result in zip(keys, results):
        reason = skip_reason(result)
        if reason is not None:
            out[k] = (None, reason)
            continue
        quality = jpeg_quality(payloads[k]) or 95
        image = cv2.cvtColor(result.image, cv2.COLOR_RGB2GRAY if decoded[k][1] else cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out[k] = (buf.tobytes(), dict(result.meta, quality=quality)) if ok else (None, "encode failed")
    return out


def _process(tasks: list[Task]) -> list[tuple]:
    out: list = [None] * len(tasks)
    payloads, seeds, where = [], [], []
    for k, task in enumerate(tasks):
        try:
            payloads.append(_read_payload(task.rec_path, task.source.offset))
        except (OSError, RecordIOError, ValueError) as e:
            out[k] = (None, f"unreadable record: {e}")
            continue
        seeds.append(task.seed)
        where.append(k)
    for k, res in zip(where, mask_records(payloads, seeds, _WORKER["masker"])):
        out[k] = res
    return out


class _Tasks:
    """The tasks of write positions [lo, hi), made as they are read (issue N: an object per chosen image,
    held for the whole run, was ~700 bytes each in the parent and again in every forked worker)."""

    def __init__(self, plan: "_Plan", seed: int, lo: int, hi: int) -> None:
        self.plan, self.seed, self.lo, self.hi = plan, seed, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __iter__(self) -> Iterator[Task]:
        plan, step = self.plan, 4096
        for start in range(self.lo, self.hi, step):
            picked = plan.chosen[start:min(start + step, self.hi)]
            for i, seed in zip(picked.tolist(), image_seeds(self.seed, plan.scan.id[picked])):
                src = plan.scan.source(i)
                yield Task(src, plan.shard_paths[src.shard], int(seed))


def _run(opts: BuildOptions, tasks: "_Tasks", pool: Optional[Pool]):
    bar = tqdm(total=len(tasks), desc="maskgen", unit="img", disable=not opts.progress, smoothing=0.05)
    try:
        with batched_map(_process, tasks, pool) as results:
            for task, res in results:
                bar.update()
                yield task, res
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------- the build
def label_fields_for(fields: Sequence[str]) -> list[str]:
    return list(fields) + [f for f in LABEL_FIELDS if f not in fields]


def label_vector(fields: Sequence[str], source: Source, meta: dict) -> np.ndarray:
    mine = {
        "masked": 1.0,
        "mask_type": float(MASK_TYPES.index(meta["mask_type"]) + 1),
        "mask_mode": float(MODES.index(meta["mode"]) + 1),
        "mask_fallback": float(meta["fallback"]),
        "mask_nose_covered": float(meta["nose_covered"]),
        "mask_r": float(meta["colour"][0]),
        "mask_g": float(meta["colour"][1]),
        "mask_b": float(meta["colour"][2]),
    }
    values = np.zeros(len(fields), np.float32)
    for i, name in enumerate(fields):
        if name in mine:
            values[i] = mine[name]
        elif i < len(source.label):
            values[i] = source.label[i]
    return values


def _stale_files(data: Path, manifest: dict) -> list[Path]:
    """maskgen's files that the manifest does not reference (left by an earlier run)."""
    used = {s[k] for s in manifest["shards"] for k in ("rec", "idx")}
    used.add(manifest.get("maskgen", {}).get("sidecar", ""))
    out = []
    for pattern in (f"{TMP_PREFIX}*", f"{PREFIX}-*.rec", f"{PREFIX}-*.idx", f"{PREFIX}-*.partial", SIDECAR):
        out += [p for p in data.glob(pattern) if p.name not in used]
    return out


def _unlink(paths) -> None:
    for p in paths:
        try:
            Path(p).unlink()
        except FileNotFoundError:
            pass


def build(opts: BuildOptions, part: tuple[int, int] = (0, 1), merge: bool = False) -> dict:
    """Run the build under the dataset's lock; return the new manifest.

    `part=(K, N)` with N > 1 masks only the K-th of N ranges of the chosen images, without the lock and
    without touching the manifest (N processes on N machines); it returns the part's journal. `merge`
    then takes the parts' results into the dataset, as one build would have (same records and ids)."""
    data = Path(opts.data)
    if opts.mode not in MODE_CHOICES:
        raise BuildError(f"--mode must be one of {', '.join(MODE_CHOICES)}")
    if not 0 < opts.ratio <= 1:
        raise BuildError(f"--ratio must be in (0, 1], got {opts.ratio}")
    k, n = part
    if not 0 <= k < n:
        raise BuildError(f"--part K/N needs 0 <= K < N, not {k}/{n}")
    try:
        load_manifest(data)  # a folder that is no dataset gets no lock file either
        if n > 1:
            return _build_part(opts, data, load_manifest(data), k, n)
        with DatasetLock(data):
            manifest = load_manifest(data)
            return _merge_parts(opts, data, manifest) if merge else _build(opts, data, manifest)
    except ManifestError as e:
        raise BuildError(str(e)) from None
    except LockBusy as e:
        raise BuildError(str(e)) from None


@dataclass
class _Plan:
    scan: Scan
    chosen: np.ndarray  # record indices of `scan` in write order; position p gets id first_id + p
    first_id: int
    fields: list
    base: list
    old: list
    shard_paths: list
    skipped: Counter


def _plan(opts: BuildOptions, data: Path, manifest: dict) -> _Plan:
    base = [s for s in manifest["shards"] if s.get("kind", "train") != MASKED_KIND]
    old = [s for s in manifest["shards"] if s.get("kind", "train") == MASKED_KIND]
    previous = manifest.get("maskgen", {})
    first_id = int(previous.get("base_next_id", manifest.get("next_id", 0)))
    if not base:
        raise BuildError(f"{data} has no unmasked shards to take images from")
    skipped: Counter = Counter()
    scan = scan_sources(data, manifest, opts.progress, skipped)
    if not len(scan):
        raise BuildError(f"{data} has no records in its unmasked shards")
    first_id = max(first_id, int(scan.id.max()) + 1)
    chosen = choose_indices(scan.id, scan.identity, opts.ratio, opts.seed)
    if not len(chosen):
        raise BuildError(f"--ratio {opts.ratio} of {len(scan)} images is no image at all")
    return _Plan(scan, chosen, first_id, label_fields_for(manifest["label_fields"]), base, old,
                 [str(data / s["rec"]) for s in manifest["shards"]], skipped)


def _write_range(opts: BuildOptions, data: Path, plan: _Plan, lo: int, hi: int, prefix: str,
                 sidecar: Path, pool: Optional[Pool]) -> tuple[list[dict], Counter, Counter, int]:
    """Mask the chosen images at positions [lo, hi) into `<prefix>masked-NNNNN` shards and a sidecar;
    return (shard entries, counts, skipped, records written). A masked record's id is `first_id` plus its
    position: an image that cannot be masked leaves its id unused, so that parts agree on every id."""
    tasks = _Tasks(plan, opts.seed, lo, hi)
    writer = ShardWriter(data, f"{prefix}{PREFIX}", int(opts.shard_size_mb * (1 << 20)))
    entries: list[dict] = []
    counts: Counter = Counter()
    skipped: Counter = Counter()
    written = 0
    try:
        with open(sidecar, "w", encoding="utf-8") as side:
            for pos, (task, (jpeg, meta)) in enumerate(_run(opts, tasks, pool), lo):
                if jpeg is None:
                    skipped[meta] += 1
                    continue
                src = task.source
                rid = plan.first_id + pos
                header = IRHeader(len(plan.fields), label_vector(plan.fields, src, meta), rid, src.id)
                shard_index = len(entries)
                if writer.add(rid, frame_record(pack_record(header, jpeg))):
                    entries.append(writer.finish(MASKED_KIND))
                side.write(json.dumps({"id": rid, "id2": src.id, "identity": src.identity, "shard": shard_index,
                                       "source": {"rec": Path(task.rec_path).name, "offset": src.offset},
                                       **meta}, separators=(",", ":")) + "\n")
                written += 1
                counts[meta["mask_type"]] += 1
                counts["mode:" + meta["mode"]] += 1
                counts["fallback"] += int(meta["fallback"])
            if writer.pending:
                entries.append(writer.finish(MASKED_KIND))
            side.flush()
            os.fsync(side.fileno())
    except BaseException:
        writer.abandon()
        raise
    return entries, counts, skipped, written


def _build(opts: BuildOptions, data: Path, manifest: dict) -> dict:
    _unlink(_stale_files(data, manifest))
    tmp = f"{TMP_PREFIX}{secrets.token_hex(4)}."
    sidecar_tmp = data / f"{tmp}{SIDECAR}"
    try:
        with worker_pool(opts.workers, _init_worker, opts.masker_args(), worker_context()) as pool:
            plan = _plan(opts, data, manifest)
            entries, counts, skipped, written = _write_range(opts, data, plan, 0, len(plan.chosen), tmp,
                                                             sidecar_tmp, pool)
        skipped.update(plan.skipped)
        if written == 0:
            raise BuildError(f"no image could be masked ({dict(skipped)})")
        _commit(data, manifest, plan, entries, sidecar_tmp, opts, written, counts, skipped)
    except BaseException:
        current = load_manifest(data)
        _unlink(_stale_files(data, current))
        raise
    return load_manifest(data)


# ---------------------------------------------------------------------------------------------- parts
def _part_prefix(k: int) -> str:
    return f"{PART_PREFIX}{k:05d}."


def _part_files(data: Path, k: int) -> list[Path]:
    return list(data.glob(f"{_part_prefix(k)}*"))


def _parts_fingerprint(opts: BuildOptions, data: Path, n: int) -> str:
    """The dataset (its manifest's bytes), the settings and the number of parts: what parts must share."""
    h = hashlib.sha256((data / "manifest.json").read_bytes())
    h.update(json.dumps({"settings": opts.settings(), "parts": n}, sort_keys=True).encode())
    return h.hexdigest()


def _build_part(opts: BuildOptions, data: Path, manifest: dict, k: int, n: int) -> dict:
    journal_path = data / f"{_part_prefix(k)}json"
    fingerprint = _parts_fingerprint(opts, data, n)
    if journal_path.is_file():
        journal = json.loads(journal_path.read_text())
        if journal.get("fingerprint") == fingerprint and journal.get("done"):
            return journal
    _unlink(_part_files(data, k))  # an unfinished or other run of this part: started over
    sidecar = data / f"{_part_prefix(k)}{SIDECAR}"
    try:
        with worker_pool(opts.workers, _init_worker, opts.masker_args(), worker_context()) as pool:
            plan = _plan(opts, data, manifest)
            lo, hi = k * len(plan.chosen) // n, (k + 1) * len(plan.chosen) // n
            entries, counts, skipped, written = _write_range(opts, data, plan, lo, hi, _part_prefix(k), sidecar,
                                                             pool)
    except BaseException:
        _unlink(_part_files(data, k))
        raise
    journal = {"fingerprint": fingerprint, "part": k, "parts": n, "settings": opts.settings(), "entries": entries,
               "counts": dict(counts), "skipped": dict(skipped), "written": written, "done": True}
    atomic_write_json(journal_path, journal)
    return journal


def _merge_parts(opts: BuildOptions, data: Path, manifest: dict) -> dict:
    journals = sorted(data.glob(f"{PART_PREFIX}*.json"))
    if not journals:
        raise BuildError(f"{data} holds no maskgen parts to merge; run `maskgen build --part K/N` first")
    first = json.loads(journals[0].read_text())
    n = int(first["parts"])
    settings = dict(first["settings"], types=tuple(first["settings"]["types"]))
    opts = BuildOptions(data=data, workers=opts.workers, progress=opts.progress, **settings)
    fingerprint = _parts_fingerprint(opts, data, n)
    parts = []
    for k in range(n):
        path = data / f"{_part_prefix(k)}json"
        j = json.loads(path.read_text()) if path.is_file() else None
        if j is None or j.get("fingerprint") != fingerprint or not j.get("done"):
            missing = [k2 for k2 in range(n) if not (data / f"{_part_prefix(k2)}json").is_file()]
            raise BuildError(f"maskgen part {k} of {n} is not finished or was built from another dataset or "
                             f"settings (parts without a journal: {missing or 'none'}); run it again")
        parts.append(j)
    _unlink(_stale_files(data, manifest))
    plan = _plan(opts, data, manifest)
    tmp = f"{TMP_PREFIX}{secrets.token_hex(4)}."
    sidecar_tmp = data / f"{tmp}{SIDECAR}"
    entries: list[dict] = []
    counts: Counter = Counter()
    skipped: Counter = Counter(plan.skipped)
    written = 0
    try:
        with open(sidecar_tmp, "w", encoding="utf-8") as out:
            for k, j in enumerate(parts):
                with open(data / f"{_part_prefix(k)}{SIDECAR}", encoding="utf-8") as side:
                    for line in side:  # shard indexes become indexes among all parts' shards
                        row = json.loads(line)
                        row["shard"] += len(entries)
                        out.write(json.dumps(row, separators=(",", ":")) + "\n")
                entries += j["entries"]
                counts.update(j["counts"])
                skipped.update(j["skipped"])
                written += j["written"]
            out.flush()
            os.fsync(out.fileno())
        if written == 0:
            raise BuildError(f"no image could be masked ({dict(skipped)})")
        _commit(data, manifest, plan, entries, sidecar_tmp, opts, written, counts, skipped)
    except BaseException:
        _unlink([sidecar_tmp])
        raise
    for k in range(n):
        _unlink(_part_files(data, k))
    return load_manifest(data)


def _commit(data: Path, manifest: dict, plan: _Plan, entries: list, sidecar_tmp: Path, opts: BuildOptions,
            written: int, counts: Counter, skipped: Counter) -> None:
    base, old, fields, first_id = plan.base, plan.old, plan.fields, plan.first_id

    def manifest_with(shards: list, sidecar: str) -> dict:
        m = dict(manifest)
        m["shards"] = base + shards
        m["num_images"] = sum(s["count"] for s in m["shards"])
        m["label_fields"] = fields
        m["next_id"] = first_id + len(plan.chosen)
        m["maskgen"] = {
            "settings": opts.settings(),
            "count": written,
            "ratio_achieved": round(written / len(plan.scan), 6),
            "base_next_id": first_id,
            "sidecar": sidecar,
            "sidecar_sha256": sha256_file(data / sidecar),
            "mask_types": {str(i + 1): t for i, t in enumerate(MASK_TYPES)},
            "mask_modes": {str(i + 1): t for i, t in enumerate(MODES)},
            "by_type": {t: counts[t] for t in MASK_TYPES},
            "by_mode": {t: counts["mode:" + t] for t in MODES},
            "fallbacks": counts["fallback"],
            "skipped": dict(sorted(skipped.items())),
            "created_by": "maskgen build",
        }
        return m

    # 1. The new shards, under their temporary names: the dataset now holds the new masks.
    write_manifest(data, manifest_with(entries, sidecar_tmp.name))
    # 2. The previous run's files are unreferenced now.
    _unlink([data / s[k] for s in old for k in ("rec", "idx")])
    if manifest.get("maskgen", {}).get("sidecar"):
        _unlink([data / manifest["maskgen"]["sidecar"]])
    # 3. Final names as hard links beside the temporary ones, then a manifest that uses them.
    final = []
    for i, e in enumerate(entries):
        e2 = dict(e, rec=f"{PREFIX}-{i:05d}.rec", idx=f"{PREFIX}-{i:05d}.idx")
        for k in ("rec", "idx"):
            _link(data / e[k], data / e2[k])
        final.append(e2)
    _link(sidecar_tmp, data / SIDECAR)
    fsync_dir(data)
    write_manifest(data, manifest_with(final, SIDECAR))
    _unlink([data / e[k] for e in entries for k in ("rec", "idx")] + [sidecar_tmp])
    fsync_dir(data)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links: copy, then make it durable
        atomic_write_bytes(dst, src.read_bytes())
