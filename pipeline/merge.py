"""`python -m pipeline merge DATA`: the parts of a pack (`pack --part K/N`) made into one dataset.

A single-machine pack ends here too (as part 0 of 1), so that both give the same records: the merge
checks that every part finished the same plan, drops the images that repeat the bytes of an image of an
earlier part (a part sees only its own duplicates; the first in write order is kept, as in one process),
rewriting only the shards that hold such an image, and writes `classes.tsv`, `skipped.tsv`, the holdout
pairs and, last, `manifest.json` (docs/design.md section 1). The manifest lists the shards in write
order: the parts' holdout shards, then their validation shards (`--val-split`), then their training
shards, part by part.

The merge does not hold the parts' plan: it enumerates the sources again with the options the parts
recorded (`.pack-state/plan.json`) and refuses when the fingerprint differs (the sources changed).
The "conversions" counts are the parts' sums and may include an image the merge dropped as a duplicate.
"""
from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_with
from .digests import DigestSet
from .manifest import MANIFEST, VERSION, identity_label_fields, load_manifest
from .pack_plan import (
    CLASSES,
    HOLDOUT_PAIRS,
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
    plan_pack,
    skip_line,
    tsv_field,
)
from .recordio import IndexedRecordIO, first_label, frame_record, unpack_record
from .shards import ShardWriter
from .sources import SourceError


def merge(out: Path, progress: bool = True, plan: Optional[Plan] = None,
          opts: Optional[PackOptions] = None) -> dict:
    """Check the parts in `out` and write the dataset; return its manifest."""
    out = Path(out)
    state = out / STATE_DIR
    if not (state / PLAN).is_file():
        if (out / MANIFEST).is_file():
            print(f"merge: {out} is already a finished dataset", flush=True)
            return load_manifest(out)
        raise PackError(f"{out} holds no pack parts to merge (no {STATE_DIR}/{PLAN}); run `pack --part K/N` first")
    info = json.loads((state / PLAN).read_text())
    n = int(info["parts"])
    if opts is None:
        opts = PackOptions.from_json(info["options"], out, progress)
    if plan is None:
        try:
            plan = plan_pack(opts)
        except SourceError as e:
            raise PackError(str(e)) from None
    if plan.fingerprint != info["fingerprint"]:
        raise PackError(f"the sources or options of {out}'s parts changed since they were packed; pack them again")
    journals, unfinished = [], []
    for k in range(n):
        j = load_journal(out, k)
        ok = (j is not None and j.get("fingerprint") == info["fingerprint"] and j.get("parts") == n
              and j.get("done") and journal_intact(out, j))
        journals.append(j)
        if not ok:
            unfinished.append(k)
    if unfinished:
        shown = ", ".join(map(str, unfinished[:10])) + (" ..." if len(unfinished) > 10 else "")
        raise PackError(f"{len(unfinished)} of {n} parts are not finished (part {shown}); run "
                        f"`python -m pipeline pack ... --part K/{n}` for each, then merge again")

    counters: Counter = Counter()
    for j in journals:
        counters.update(j["counters"])
    dups, dup_lines = _cross_part_duplicates(out, plan, journals, counters)
    shards, replaced = _final_shards(out, journals, dups, plan, progress)
    train = [e for e in shards if e["kind"] == "train"]
    holdout = [e for e in shards if e["kind"] == "holdout"]
    val = [e for e in shards if e["kind"] == "val"]
    skipped = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("skipped:")}
    conversions = {k: v for k, v in counters.items() if ":" not in k}

    def write_skipped(f) -> None:
        for k in range(n):
            with open(part_dir(out, k) / "skipped.partial", "rb") as src:
                shutil.copyfileobj(src, f)
        f.write("".join(dup_lines).encode("utf-8", "surrogateescape"))

    atomic_write_with(out / SKIPPED, write_skipped)
    written = sum(e["count"] for e in train)
    if written == 0:
        raise PackError(f"every input was skipped ({sum(skipped.values())}); the reasons are in {out / SKIPPED}")

    def write_classes(f) -> None:
        lines = []
        for cid in range(plan.num_classes):
            lines.append(f"{cid}\t{tsv_field(plan.class_name(cid))}\n")
            if len(lines) >= 65536:
                f.write("".join(lines).encode("utf-8", "surrogateescape"))
                lines = []
        f.write("".join(lines).encode("utf-8", "surrogateescape"))

    atomic_write_with(out / CLASSES, write_classes)
    manifest = {
        "version": VERSION,
        "image_size": list(opts.size),
        "num_images": written,
        "num_classes": plan.num_classes,
        "label_fields": identity_label_fields(plan.num_classes) + plan.attribute_fields,
        "shards": train,
        "next_id": plan.num_train + plan.num_holdout + plan.num_val,
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
        "created_by": "python -m pipeline pack" + (f" --part K/{n} + merge" if n > 1 else ""),
    }
    if n > 1:
        manifest["parts"] = n
    if holdout:
        pairs = _write_holdout_pairs(out, holdout, opts)
        manifest["holdout"] = {"shards": holdout, "num_images": sum(e["count"] for e in holdout),
                               "pairs": HOLDOUT_PAIRS, "num_pairs": pairs}
    if val:
        manifest["val"] = {"shards": val, "num_images": sum(e["count"] for e in val), "share": opts.val_split}
    atomic_write_json(out / MANIFEST, manifest)
    for name in replaced:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
    shutil.rmtree(state, ignore_errors=True)
    return manifest


def _cross_part_duplicates(out: Path, plan: Plan, journals: list[dict],
                           counters: Counter) -> tuple[dict[str, dict[int, int]], list[str]]:
    """Images whose bytes an earlier part wrote: {shard rec name: {record id: first position}}, and their
    skipped.tsv lines (counted in `counters` as the single pack would have)."""
    dups: dict[str, dict[int, int]] = defaultdict(dict)
    if len(journals) == 1:
        return dups, []  # one part saw every image itself
    known = DigestSet(plan.total)
    lines = []
    for k, j in enumerate(journals):
        found_in_part = []
        for entry, name in zip(j["shards"], j["hash_files"]):
            rows = np.load(part_dir(out, k) / name)
            first = known.find(rows) if k else np.full(len(rows), -1, np.int64)
            for r in np.flatnonzero(first >= 0).tolist():
                pos = int(rows["pos"][r])
                dups[entry["rec"]][plan.rec_id(pos)] = int(first[r])
                lines.append((pos, int(first[r])))
            found_in_part.append(rows[first < 0])
        for rows in found_in_part:
            known.extend(rows)
    out_lines = []
    for pos, first in sorted(lines):
        out_lines.append(skip_line(plan.display(pos), "duplicate", f"same bytes as {plan.display(first)}"))
        counters["images:" + plan.stream(pos)] -= 1
        counters["skipped:duplicate"] += 1
    return dups, out_lines


def _final_shards(out: Path, journals: list[dict], dups: dict, plan: Plan,
                  progress: bool) -> tuple[list[dict], list[str]]:
    """The shards in write order; one that holds a cross-part duplicate is rewritten without it
    (`<prefix>d-NNNNN`), and the name it replaces is returned, to be removed after the manifest."""
    shards, replaced = [], []
    for j in journals:
        for entry in j["shards"]:
            drop = dups.get(entry["rec"])
            if not drop:
                shards.append(entry)
                continue
            prefix, index = entry["rec"][:-len(".rec")].rsplit("-", 1)
            writer = ShardWriter(out, prefix + "d", 1 << 62, int(index))
            with IndexedRecordIO(out / entry["idx"], out / entry["rec"], "r") as r:
                for key in tqdm(r.keys, desc=f"rewrite {entry['rec']}", leave=False, disable=not progress):
                    if key in drop:
                        continue
                    writer.add(key, frame_record(r.read_idx(key)))
            if writer.pending:
                shards.append(writer.finish(entry["kind"]))
            replaced += [entry["rec"], entry["idx"]]
    return [e for kind in STREAMS for e in shards if e["kind"] == kind], replaced


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
