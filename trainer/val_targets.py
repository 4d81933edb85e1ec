"""The trainer's verification targets, checked whole before the first step (config `val_targets`).

A target that is missing, unreadable, or a pairs.txt over raw photos used to fail when it was first
evaluated: at the end of training, or `verbose` steps in. `prepare_val_targets` reads every target once
(rank 0; the decoded set stays in trainer.eval.targets' per-process cache for the evaluations) and turns
each problem into a one-line ConfigError naming the target.

A pairs.txt whose images are not aligned 112x112 faces is aligned when `val_align` is set
(pipeline/align.py, as `pipeline pack --align`), and the aligned set is cached as an insightface pack,
`<pairs stem>.aligned.bin` beside the pairs.txt (or in OUTPUT/val_cache/ when that folder is read-only),
so that later runs and `python -m trainer.eval` read it instead of aligning again (`aligned_cache`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from PIL import Image

from trainer.config import Config, ConfigError
from trainer.eval.images import IMAGE_SIZE, VerificationError
from trainer.eval.targets import (
    aligned_cache,
    cache_candidates,
    cached_target,
    load_pairs_txt,
    parse_pairs_txt,
    write_bin,
)

logger = logging.getLogger("trainer")

CACHE_DIR = "val_cache"  # in the run folder, when the pairs.txt's own folder is read-only


def resolve_val_targets(cfg: Config) -> dict[str, Path]:
    """Target name -> path; a bare name is also looked up in the data folder, ".bin" added (insightface)."""
    targets = {}
    for item in cfg.val_targets:
        path = Path(item)
        candidates = [path]
        if not path.is_absolute() and cfg.data:
            candidates += [Path(cfg.data) / item, Path(cfg.data) / f"{item}.bin"]
        candidates.append(Path(f"{item}.bin"))
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise ConfigError(f"val target {item!r} not found (looked for {', '.join(map(str, candidates))})")
        if found.is_dir():
            raise ConfigError(f"val target {item!r}: {found} is a folder; name its .bin pack or pairs.txt")
        targets[path.stem if path.suffix in (".bin", ".txt") else path.name] = found
    return targets


def first_unaligned(pairs_txt: str | os.PathLike) -> Optional[tuple[Path, tuple[int, int]]]:
    """The first image of a pairs list that is not an aligned 112x112 face, with its size; None when all
    are. Reads the image headers only."""
    pair_paths, _ = parse_pairs_txt(pairs_txt)
    seen: set[Path] = set()
    for a, b in pair_paths:
        for p in (a, b):
            if p in seen:
                continue
            seen.add(p)
            try:
                with Image.open(p) as img:
                    size = img.size
            except OSError as e:
                raise VerificationError(f"image {p} cannot be read ({e})") from None
            if size != IMAGE_SIZE:
                return p, size
    return None


def align_and_cache(pairs_txt: Path, name: str, output: Optional[Path], progress: bool) -> Path:
    """Align every face of `pairs_txt` once and write the aligned pack; returns its path."""
    logger.info("val target %s: aligning the faces of %s once (val_align)", name, pairs_txt)
    target = load_pairs_txt(pairs_txt, align=True, name=name, progress=progress)
    extra = [output / CACHE_DIR] if output is not None else []
    errors = []
    for candidate in cache_candidates(pairs_txt, extra):
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            write_bin(target, candidate)
        except OSError as e:
            errors.append(f"{candidate}: {e.strerror or e}")
            continue
        logger.info("val target %s: aligned set cached as %s (%d faces not found, resized whole)", name,
                    candidate, target.align_failures)
        return candidate
    raise ConfigError(f"val target {name}: cannot write the aligned copy of {pairs_txt} "
                      f"({'; '.join(errors)})")


def prepare_val_targets(cfg: Config, output: Optional[Path], progress: bool = False) -> dict[str, Path]:
    """Every target checked and read once; name -> the file to evaluate (an aligned cache for a pairs.txt
    over raw photos). Raises ConfigError naming the target and what to do."""
    targets = resolve_val_targets(cfg)
    extra = [output / CACHE_DIR] if output is not None else []
    ready = {}
    for name, path in targets.items():
        try:
            if path.suffix != ".bin":
                cache = aligned_cache(path, extra)
                if cache is not None:
                    logger.info("val target %s: reading the aligned copy %s", name, cache)
                    path = cache
                else:
                    raw = first_unaligned(path)
                    if raw is not None and not cfg.val_align:
                        image, (w, h) = raw
                        raise ConfigError(
                            f"val target {name}: {path} lists raw photos ({image} is {w}x{h}, not an aligned "
                            f"112x112 face): set val_align=true to align them once before training (cached "
                            f"as {cache_candidates(path)[0].name}), or pack aligned faces")
                    if raw is not None:
                        path = align_and_cache(path, name, output, progress)
            cached_target(path, name=name)  # reads and decodes every image now; evaluation reuses it
        except VerificationError as e:
            raise ConfigError(f"val target {name}: {e}") from None
        ready[name] = path
    return ready
