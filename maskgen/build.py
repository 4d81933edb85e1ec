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

A masked record keeps its source's identity, gets a new unique id (ids from the manifest's `next_id`
before any masks) and the source's id in `id2`, and carries a label vector named by `label_fields`.
"""
from __future__ import annotations

import json
import os
import secrets
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_write_bytes, fsync_dir
from pipeline.imageio import jpeg_quality
from pipeline.manifest import ManifestError, decode_identity, load_manifest, sha256_file, write_manifest
from pipeline.recordio import (
    IRHeader,
    RecordIO,
    RecordIOError,
    frame_record,
    map_file,
    pack_record,
    peek_header,
    read_frame,
    read_index,
    unpack_record,
)
from pipeline.shards import ShardWriter

from .lock import DatasetLock, LockBusy
from .masker import MODE_CHOICES, MODES, Masker, MaskingOptions, skip_reason
from .seeds import image_seeds, seeded_key
from .shapes import MASK_TYPES
from .workers import batched_map

MASKED_KIND = "masked"
PREFIX = "masked"
TMP_PREFIX = "maskgen.tmp-"
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
def scan_sources(data: Path, manifest: dict, progress: bool = True,
                 skipped: Optional[Counter] = None) -> list[Source]:
    """Every unmasked record; one whose identity is outside [0, num_classes) is counted in `skipped`
    ("label out of range") and never copied: a masked copy would hand the trainer a class it has not."""
    sources: list[Source] = []
    num_classes = int(manifest["num_classes"])
    shards = manifest["shards"]
    fields = list(manifest["label_fields"])
    for si, shard in enumerate(shards):
        if shard.get("kind", "train") == MASKED_KIND:
            continue
        _, offsets = read_index(data / shard["idx"])
        with map_file(data / shard["rec"]) as buf:
            for off in tqdm(offsets, desc=f"scan {shard['rec']}", unit="rec", disable=not progress, leave=False):
                header = peek_header(buf, off)
                if header is None:  # split before its label ends (or malformed: read_frame raises)
                    header, _ = unpack_record(read_frame(buf, off)[0])
                values = tuple(np.atleast_1d(header.label).astype(float).tolist())
                padded = np.zeros(len(fields))
                padded[:min(len(values), len(fields))] = values[:len(fields)]
                identity = int(decode_identity(padded, fields))
                if not 0 <= identity < num_classes:
                    if skipped is not None:
                        skipped["label out of range"] += 1
                    continue
                sources.append(Source(si, off, int(header.id), identity, values))
    return sources


# ---------------------------------------------------------------------------------------------- choosing
def choose(sources: Sequence[Source], ratio: float, seed: int) -> list[Source]:
    """`round(ratio * N)` sources, stratified per identity, in a seeded shuffled (write) order."""
    if not 0 < ratio <= 1:
        raise BuildError(f"--ratio must be in (0, 1], got {ratio}")
    by_identity: dict[int, list[Source]] = defaultdict(list)
    for s in sources:
        by_identity[s.identity].append(s)
    identities = np.array(sorted(by_identity))
    sizes = np.array([len(by_identity[i]) for i in identities])
    total = int(round(ratio * sizes.sum()))
    exact = ratio * sizes
    take = np.floor(exact).astype(np.int64)
    # Largest remainders get the images left over; ties broken by a seeded key per identity.
    left = total - int(take.sum())
    if left > 0:
        order = np.lexsort((seeded_key(seed, identities, 1), -(exact - take)))
        take[order[:left]] += 1
    chosen: list[Source] = []
    for ident, k in zip(identities.tolist(), take.tolist()):
        if k <= 0:
            continue
        members = by_identity[ident]
        keys = seeded_key(seed, np.array([m.id for m in members]), 2)
        chosen += [members[j] for j in np.argsort(keys, kind="stable")[:k]]
    keys = seeded_key(seed, np.array([c.id for c in chosen], dtype=np.int64), 3)
    return [chosen[j] for j in np.argsort(keys, kind="stable")]


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(mode: str, types: Sequence[str], aligned: bool, nose_covered: float) -> None:
    _WORKER.update(masker=Masker(mode, types, aligned, nose_covered), recs={})


def _read_payload(path: str, offset: int) -> bytes:
    recs = _WORKER["recs"]
    if path not in recs:  # kept open (mapped) for the worker's life: sources come from every shard
        recs[path] = RecordIO(path, "r")
    return unpack_record(recs[path].read_at(offset))[1]


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


def _run(opts: BuildOptions, tasks: list[Task]):
    bar = tqdm(total=len(tasks), desc="maskgen", unit="img", disable=not opts.progress, smoothing=0.05)
    try:
        with batched_map(_process, tasks, opts.workers, _init_worker, opts.masker_args()) as results:
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


def build(opts: BuildOptions) -> dict:
    """Run the build under the dataset's lock; return the new manifest."""
    data = Path(opts.data)
    if opts.mode not in MODE_CHOICES:
        raise BuildError(f"--mode must be one of {', '.join(MODE_CHOICES)}")
    if not 0 < opts.ratio <= 1:
        raise BuildError(f"--ratio must be in (0, 1], got {opts.ratio}")
    try:
        load_manifest(data)  # a folder that is no dataset gets no lock file either
        with DatasetLock(data):
            return _build(opts, data, load_manifest(data))
    except ManifestError as e:
        raise BuildError(str(e)) from None
    except LockBusy as e:
        raise BuildError(str(e)) from None


def _build(opts: BuildOptions, data: Path, manifest: dict) -> dict:
    _unlink(_stale_files(data, manifest))
    base = [s for s in manifest["shards"] if s.get("kind", "train") != MASKED_KIND]
    old = [s for s in manifest["shards"] if s.get("kind", "train") == MASKED_KIND]
    previous = manifest.get("maskgen", {})
    first_id = int(previous.get("base_next_id", manifest.get("next_id", 0)))
    if not base:
        raise BuildError(f"{data} has no unmasked shards to take images from")

    skipped: Counter = Counter()
    sources = scan_sources(data, manifest, opts.progress, skipped)
    if not sources:
        raise BuildError(f"{data} has no records in its unmasked shards")
    if first_id <= max(s.id for s in sources):
        first_id = max(s.id for s in sources) + 1
    chosen = choose(sources, opts.ratio, opts.seed)
    if not chosen:
        raise BuildError(f"--ratio {opts.ratio} of {len(sources)} images is no image at all")
    shard_paths = [str(data / s["rec"]) for s in manifest["shards"]]
    seeds = image_seeds(opts.seed, np.array([s.id for s in chosen]))
    tasks = [Task(s, shard_paths[s.shard], int(k)) for s, k in zip(chosen, seeds)]

    fields = label_fields_for(manifest["label_fields"])
    tmp = f"{TMP_PREFIX}{secrets.token_hex(4)}."
    writer = ShardWriter(data, f"{tmp}{PREFIX}", int(opts.shard_size_mb * (1 << 20)))
    sidecar_tmp = data / f"{tmp}{SIDECAR}"
    entries: list[dict] = []
    counts: Counter = Counter()
    next_key = first_id
    try:
        with open(sidecar_tmp, "w", encoding="utf-8") as side:
            for task, (jpeg, meta) in _run(opts, tasks):
                if jpeg is None:
                    skipped[meta] += 1
                    continue
                src = task.source
                # Ids stay consecutive over the records actually written, whatever was skipped.
                rid = next_key
                next_key += 1
                header = IRHeader(len(fields), label_vector(fields, src, meta), rid, src.id)
                shard_index = len(entries)
                if writer.add(rid, frame_record(pack_record(header, jpeg)), b""):
                    entries.append(writer.finish(MASKED_KIND)[0])
                side.write(json.dumps({"id": rid, "id2": src.id, "identity": src.identity, "shard": shard_index,
                                       "source": {"rec": Path(task.rec_path).name, "offset": src.offset},
                                       **meta}, separators=(",", ":")) + "\n")
                counts[meta["mask_type"]] += 1
                counts["mode:" + meta["mode"]] += 1
                counts["fallback"] += int(meta["fallback"])
            if writer.pending:
                entries.append(writer.finish(MASKED_KIND)[0])
            side.flush()
            os.fsync(side.fileno())
        written = next_key - first_id
        if written == 0:
            raise BuildError(f"no image could be masked ({dict(skipped)})")
        _commit(data, manifest, base, old, entries, tmp, fields, opts, first_id, written, counts, skipped,
                len(sources))
    except BaseException:
        writer.abandon()
        current = load_manifest(data)
        _unlink(_stale_files(data, current))
        raise
    return load_manifest(data)


def _commit(data: Path, manifest: dict, base: list, old: list, entries: list, tmp: str, fields: list,
            opts: BuildOptions, first_id: int, written: int, counts: Counter, skipped: Counter,
            num_sources: int) -> None:
    sidecar_tmp = data / f"{tmp}{SIDECAR}"

    def final_name(name: str) -> str:
        return name[len(tmp):]  # "maskgen.tmp-XXXX.masked-00000.rec" -> "masked-00000.rec"

    def manifest_with(shards: list, sidecar: str) -> dict:
        m = dict(manifest)
        m["shards"] = base + shards
        m["num_images"] = sum(s["count"] for s in m["shards"])
        m["label_fields"] = fields
        m["next_id"] = first_id + written
        m["maskgen"] = {
            "settings": opts.settings(),
            "count": written,
            "ratio_achieved": round(written / num_sources, 6),
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
    for e in entries:
        e2 = dict(e)
        for k in ("rec", "idx"):
            e2[k] = final_name(e[k])
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
