"""`maskgen folder`: masked copies of every image under a folder, in the same tree (for evaluation sets,
or to compare with other tools on the same files)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.landmarks import worker_context

from .masker import NOSE_COVERED, Masker
from .shapes import MASK_TYPES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class FolderOptions:
    src: Path
    out: Path
    mode: str = "mixed"
    seed: int = 0
    types: Sequence[str] = MASK_TYPES
    nose_covered: float = NOSE_COVERED
    aligned: bool = True
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


_WORKER: dict = {}


def _init(mode, types, aligned, nose_covered) -> None:
    _WORKER["masker"] = Masker(mode, types, aligned, nose_covered)


def _one(job: tuple[str, str, int]):
    src, dst, seed = job
    data = Path(src).read_bytes()
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        return src, None, "undecodable image"
    result = _WORKER["masker"].mask(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), np.random.default_rng([seed, 0x6D61736B]))
    if result is None:
        return src, None, "no face found"
    params = []
    if Path(dst).suffix.lower() in (".jpg", ".jpeg"):
        from .build import jpeg_quality

        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality(data) or 95]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp{Path(dst).suffix}")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(result.image, cv2.COLOR_RGB2BGR), params):
        return src, None, "write failed"
    tmp.replace(dst)
    return src, result.meta, ""


def mask_folder(opts: FolderOptions) -> dict:
    """Mask every image under `src` into `out` (same relative paths); returns counts."""
    # Imported here, not with the module: every worker process imports this module for `_init` and
    # `_one`, and needs neither the dataset builder (shards, manifests) nor tqdm (about 0.1 s of CPU each).
    from tqdm import tqdm

    from .build import seeded_key

    files = list_images(opts.src)
    if not files:
        raise ValueError(f"no images under {opts.src}")
    ids = np.arange(len(files))
    seeds = (seeded_key(opts.seed, ids, 4) >> np.uint64(1)).tolist()
    jobs = [(str(p), str(opts.out / p.relative_to(opts.src)), int(s)) for p, s in zip(files, seeds)]
    opts.out.mkdir(parents=True, exist_ok=True)
    init = (opts.mode, tuple(opts.types), opts.aligned, opts.nose_covered)
    done = skipped = fallback = 0
    meta_path = opts.out / "maskgen-meta.jsonl"
    with open(meta_path, "w", encoding="utf-8") as meta_file, \
            tqdm(total=len(jobs), desc="maskgen", unit="img", disable=not opts.progress) as bar:
        if opts.workers <= 1:
            _init(*init)
            results = map(_one, jobs)
            pool = None
        else:
            pool = worker_context().Pool(opts.workers, initializer=_init, initargs=init)
            results = pool.imap(_one, jobs, chunksize=8)
        try:
            for src, meta, reason in results:
                bar.update()
                rel = str(Path(src).relative_to(opts.src))
                if meta is None:
                    skipped += 1
                    meta_file.write(json.dumps({"file": rel, "skipped": reason}) + "\n")
                    continue
                done += 1
                fallback += int(meta["fallback"])
                meta_file.write(json.dumps({"file": rel, **meta}, separators=(",", ":")) + "\n")
        finally:
            if pool is not None:  # every result is in (or the run failed): nothing left to wait for
                pool.terminate()
                pool.join()
    return {"images": len(files), "masked": done, "skipped": skipped, "fallbacks": fallback}
