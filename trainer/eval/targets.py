"""Verification sets: what the trainer's periodic evaluation and `python -m trainer.eval --pairs` score.
(`.bin` packs are pickles: load only packs from sources you trust.)

A verification set is a list of image pairs with a same/different flag, from
- an insightface `.bin` pack: a pickle of (list of encoded images, list of bool issame), two images a pair;
- an LFW-style `pairs.txt` with an image root: `name n1 n2` (same person) and `name1 n1 name2 n2`
  (different) lines, optionally after a `folds pairs_per_fold` header; an image `name/name_0001.jpg`
  (LFW) or `name/1.png` (ImageFolder) under the root; or `path1 path2 0|1` lines, paths relative to the
  root. Tab-separated lines may hold names with spaces.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from pipeline.imageio import ImageRejected
from trainer.eval.images import (
    IMAGE_EXTENSIONS,
    IMAGE_SIZE,
    VerificationError,
    decode_image,
    face_crop,
    read_image_file,
)

logger = logging.getLogger("trainer")


@dataclass
class VerificationSet:
    """Unique images and the pairs over them."""

    name: str
    images: np.ndarray  # uint8 [M, 112, 112, 3] RGB
    pairs: np.ndarray  # int64 [N, 2] indices into images
    issame: np.ndarray  # bool [N]
    source: str = ""
    align_failures: int = 0  # images whose face was not found under --align (resized whole instead)
    mask_failures: int = 0  # probes that could not be masked (mask_probes), compared unmasked

    def __post_init__(self) -> None:
        if len(self.pairs) != len(self.issame):
            raise VerificationError(f"{self.name}: {len(self.pairs)} pairs but {len(self.issame)} "
                                    "issame flags")
        if len(self.pairs) and (self.pairs.min() < 0 or self.pairs.max() >= len(self.images)):
            raise VerificationError(f"{self.name}: a pair points past the {len(self.images)} images")



def load_bin(path: str | os.PathLike, name: Optional[str] = None, align: bool = False,
             progress: bool = False) -> VerificationSet:
    """An insightface verification pack (lfw.bin, cfp_fp.bin, agedb_30.bin, or pack's holdout_pairs.bin)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            bins, issame = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise VerificationError(f"{path}: no such file") from None
    except Exception as e:
        raise VerificationError(f"{path}: not an insightface .bin pack ({type(e).__name__}: {e})") from None
    if len(bins) != 2 * len(issame):
        raise VerificationError(f"{path}: {len(bins)} images for {len(issame)} pairs (needs two per pair)")
    images = np.empty((len(bins), IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    failures = 0
    for i, b in enumerate(tqdm(bins, desc=f"decode {path.name}", disable=not progress, leave=False)):
        data = b.tobytes() if isinstance(b, np.ndarray) else bytes(b)
        try:
            rgb = decode_image(data)
        except ImageRejected as e:
            raise VerificationError(f"{path}: image {i} does not decode ({e})") from None
        images[i], failed = face_crop(rgb, align)
        failures += failed
    pairs = np.arange(len(bins), dtype=np.int64).reshape(-1, 2)
    issame = np.asarray(issame, dtype=bool)
    return VerificationSet(name or path.stem, images, pairs, issame, str(path), failures)


def _is_int(s: str) -> bool:
    return s.strip().lstrip("-").isdigit()


def _lfw_image(root: Path, name: str, number: str) -> Path:
    n = int(number)
    stems = (f"{name}/{name}_{n:04d}", f"{name}/{n}", f"{name}/{number}")
    for stem in stems:
        for ext in IMAGE_EXTENSIONS:
            candidate = root / (stem + ext)
            if candidate.is_file():
                return candidate
    raise VerificationError(f"no image for {name!r} number {number} under {root} (tried {stems[0]}.jpg, "
                            f"{stems[1]}.png and other extensions)")


def parse_pairs_txt(path: str | os.PathLike, root: Optional[str | os.PathLike] = None
                    ) -> tuple[list[tuple[Path, Path]], list[bool]]:
    """The image paths and issame flags of a pairs.txt (formats in the module docstring)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VerificationError(f"{path}: cannot read ({e})") from None
    pairs: list[tuple[Path, Path]] = []
    issame: list[bool] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in (line.split("\t") if "\t" in line else line.split())]
        fields = [f for f in fields if f]
        where = f"{path}:{lineno}"
        if all(_is_int(f) for f in fields) and len(fields) <= 2 and not pairs:
            continue  # LFW's header: folds and pairs per fold
        if len(fields) == 3 and _is_int(fields[1]) and _is_int(fields[2]):
            pairs.append((_lfw_image(root, fields[0], fields[1]), _lfw_image(root, fields[0], fields[2])))
            issame.append(True)
        elif len(fields) == 4 and _is_int(fields[1]) and _is_int(fields[3]):
            pairs.append((_lfw_image(root, fields[0], fields[1]), _lfw_image(root, fields[2], fields[3])))
            issame.append(False)
        elif len(fields) == 3 and fields[2] in ("0", "1"):
            a, b = root / fields[0], root / fields[1]
            for p in (a, b):
                if not p.is_file():
                    raise VerificationError(f"{where}: no image {p}")
            pairs.append((a, b))
            issame.append(fields[2] == "1")
        else:
            raise VerificationError(f"{where}: expected 'name n1 n2', 'name1 n1 name2 n2' or "
                                    f"'path1 path2 0|1', got {line.strip()!r}")
    if not pairs:
        raise VerificationError(f"{path}: no pairs")
    return pairs, issame


def load_pairs_txt(path: str | os.PathLike, root: Optional[str | os.PathLike] = None, align: bool = False,
                   name: Optional[str] = None, progress: bool = False) -> VerificationSet:
    """An LFW-style pairs list; every distinct image is read (and aligned, with `align`) once."""
    path = Path(path)
    pair_paths, issame = parse_pairs_txt(path, root)
    index: dict[Path, int] = {}
    for a, b in pair_paths:
        index.setdefault(a, len(index))
        index.setdefault(b, len(index))
    images = np.empty((len(index), IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    failures = 0
    for p, i in tqdm(index.items(), desc=f"read {path.name}", disable=not progress, leave=False):
        rgb = read_image_file(p)
        if not align and rgb.shape[:2] != (IMAGE_SIZE[1], IMAGE_SIZE[0]):
            raise VerificationError(f"{p} is {rgb.shape[1]}x{rgb.shape[0]}, not an aligned "
                                    f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} face: pass --align to detect and "
                                    "align faces")
        images[i], failed = face_crop(rgb, align)
        failures += failed
    if failures:
        logger.warning("%s: no face found in %d of %d images; those were resized whole", path, failures,
                       len(index))
    pairs = np.array([(index[a], index[b]) for a, b in pair_paths], dtype=np.int64)
    return VerificationSet(name or pairs_list_name(path), images, pairs, np.asarray(issame, bool), str(path),
                           failures)


def pairs_list_name(path: str | os.PathLike) -> str:
    """A pairs list's default name: its stem, or its folder's name when the stem only says "pairs"
    (lfw/pairs.txt is "lfw")."""
    path = Path(path)
    return path.resolve().parent.name or path.stem if path.stem.lower() == "pairs" else path.stem


def load_target(path: str | os.PathLike, root: Optional[str | os.PathLike] = None, align: bool = False,
                name: Optional[str] = None, progress: bool = False) -> VerificationSet:
    """A `.bin` pack or a pairs list (any other suffix), by file name."""
    path = Path(path)
    if path.suffix == ".bin":
        return load_bin(path, name, align, progress)
    return load_pairs_txt(path, root, align, name, progress)


def mask_probes(target: VerificationSet, mode: str = "mixed", seed: int = 0,
                progress: bool = False) -> VerificationSet:
    """The masked-probe protocol on a pairs list: the first image of every pair gets a synthetic mask
    (maskgen, drawn from the pair's own seeded stream), the second stays as it is. An image that is the
    probe of one pair and the gallery of another is used masked and unmasked accordingly."""
    from maskgen.masker import Masker  # mediapipe loads only when asked for

    probes = np.unique(target.pairs[:, 0])
    masker = Masker(mode=mode, aligned=True)
    masked = np.empty((len(probes),) + target.images.shape[1:], np.uint8)
    failures = 0
    try:
        for j, i in enumerate(tqdm(probes, desc=f"mask {target.name}", disable=not progress, leave=False)):
            result = masker.mask(target.images[i], np.random.default_rng([seed, int(i)]))
            if result is None:
                failures += 1
                masked[j] = target.images[i]
            else:
                masked[j] = result.image
    finally:
        masker.close()
    slot = np.full(len(target.images), -1, np.int64)
    slot[probes] = len(target.images) + np.arange(len(probes))
    pairs = np.stack([slot[target.pairs[:, 0]], target.pairs[:, 1]], axis=1)
    return VerificationSet(f"{target.name}_masked_probe", np.concatenate([target.images, masked]), pairs,
                           target.issame, target.source, target.align_failures, failures)


_CACHE: dict[tuple, VerificationSet] = {}
_CACHE_LIMIT = 8


def cached_target(path: str | os.PathLike, name: Optional[str] = None) -> VerificationSet:
    """load_target, decoded once per process while the file is unchanged (the trainer evaluates the same
    targets every few thousand steps)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, name)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = load_target(path, name=name)
    return _CACHE[key]

