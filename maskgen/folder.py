"""`maskgen folder`: masked copies of every image under a folder, in the same tree (for evaluation sets,
or to compare with other tools on the same files)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.imageio import ImageRejected, decode_any, encode_image, jpeg_quality
from pipeline.landmarks import worker_context
from pipeline.worker_pool import worker_pool

from .masker import Masker, MaskingOptions, skip_reason
from .seeds import image_seeds
from .workers import batched_map

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class FolderOptions(MaskingOptions):
    src: Path
    out: Path


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


_WORKER: dict = {}


def _init(mode, types, aligned, nose_covered) -> None:
    _WORKER["masker"] = Masker(mode, types, aligned, nose_covered)


def _batch(jobs: list[tuple[str, str, int]]) -> list[tuple[str, Optional[dict], str]]:
    """(source, metadata or None, reason skipped) per job, masked together (`Masker.mask_batch`)."""
    data = [Path(src).read_bytes() for src, _, _ in jobs]
    images = [decode_any(d) for d in data]
    todo = [k for k, rgb in enumerate(images) if rgb is not None]
    results = _WORKER["masker"].mask_batch([images[k] for k in todo], [jobs[k][2] for k in todo])
    out = {k: _write(jobs[k], data[k], result) for k, result in zip(todo, results)}
    return [out.get(k, (job[0], None, "undecodable image")) for k, job in enumerate(jobs)]


def _write(job: tuple[str, str, int], data: bytes, result) -> tuple[str, Optional[dict], str]:
    src, dst, _ = job
    reason = skip_reason(result)
    if reason is not None:
        return src, None, reason
    suffix = Path(dst).suffix.lower()
    quality = (jpeg_quality(data) or 95) if suffix in (".jpg", ".jpeg") else 95
    try:
        encoded = encode_image(result.image, suffix, quality)
    except ImageRejected as e:
        return src, None, str(e)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
    tmp.write_bytes(encoded)
    tmp.replace(dst)
    return src, result.meta, ""


def mask_folder(opts: FolderOptions) -> dict:
    """Mask every image under `src` into `out` (same relative paths); returns counts."""
    files = list_images(opts.src)
    if not files:
        raise ValueError(f"no images under {opts.src}")
    seeds = image_seeds(opts.seed, np.arange(len(files)))
    jobs = [(str(p), str(opts.out / p.relative_to(opts.src)), int(s)) for p, s in zip(files, seeds)]
    opts.out.mkdir(parents=True, exist_ok=True)
    with worker_pool(opts.workers, _init, opts.masker_args(), worker_context()) as pool, \
            batched_map(_batch, jobs, pool) as results:
        # Imported after the workers start, not with the module: they never draw a progress bar, and
        # tqdm's import (50 ms, most of it reading every installed package's metadata) overlaps their start.
        from tqdm import tqdm

        done = skipped = fallback = 0
        with open(opts.out / "maskgen-meta.jsonl", "w", encoding="utf-8") as meta_file, \
                tqdm(total=len(jobs), desc="maskgen", unit="img", disable=not opts.progress) as bar:
            for _, (src, meta, reason) in results:
                bar.update()
                rel = str(Path(src).relative_to(opts.src))
                if meta is None:
                    skipped += 1
                    meta_file.write(json.dumps({"file": rel, "skipped": reason}) + "\n")
                    continue
                done += 1
                fallback += int(meta["fallback"])
                meta_file.write(json.dumps({"file": rel, **meta}, separators=(",", ":")) + "\n")
    return {"images": len(files), "masked": done, "skipped": skipped, "fallbacks": fallback}
