"""Make a small packed dataset big enough for a reader benchmark: its shards copied under new names.

glint24 is ~800 images, under two batches of 512: an epoch would be one step, and a reader that pads or drops
its last batch would be timed on work it does not count. Copies of every shard (`rep<k>-<name>`, entered in
the manifest like any shard) make an epoch many batches long; the records are the same, so is the work.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.manifest import load_manifest, shard_entry, write_manifest


def replicate_shards(data_dir: str | os.PathLike, min_images: int) -> int:
    """Copy the shards of `data_dir` until it holds at least `min_images` images; returns the total."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    originals = list(manifest["shards"])
    per_copy = sum(s["count"] for s in originals)
    copy = 1
    while manifest["num_images"] < min_images:
        for s in originals:
            rec, idx = f"rep{copy}-{s['rec']}", f"rep{copy}-{s['idx']}"
            shutil.copyfile(data_dir / s["rec"], data_dir / rec)
            shutil.copyfile(data_dir / s["idx"], data_dir / idx)
            manifest["shards"].append(shard_entry(data_dir, rec, idx, s["count"], s.get("kind", "train")))
        manifest["num_images"] += per_copy
        copy += 1
    write_manifest(data_dir, manifest)
    return manifest["num_images"]
