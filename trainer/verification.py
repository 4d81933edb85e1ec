"""Verification sets and the flip-test embeddings: what the trainer's periodic evaluation and
`python -m trainer.eval` run. (`.bin` packs are pickles: load only packs from sources you trust.)

A verification set is a list of image pairs with a same/different flag, from
- an insightface `.bin` pack: a pickle of (list of encoded images, list of bool issame), two images a pair;
- an LFW-style `pairs.txt` with an image root: `name n1 n2` (same person) and `name1 n1 name2 n2`
  (different) lines, optionally after a `folds pairs_per_fold` header; an image `name/name_0001.jpg`
  (LFW) or `name/1.png` (ImageFolder) under the root; or `path1 path2 0|1` lines, paths relative to the
  root. Tab-separated lines may hold names with spaces.
Embeddings follow insightface: pixels (x - 127.5) / 127.5 in RGB, and with the flip test the embedding of
an image plus that of its mirror image, L2-normalised before scoring.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline.augment import MEAN, STD
from pipeline.imageio import ImageRejected, decode_rgb, resize_to
from trainer import metrics

logger = logging.getLogger("trainer")

IMAGE_SIZE = (112, 112)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".gif", ".webp", ".tif", ".tiff")


class VerificationError(ValueError):
    """A verification set cannot be read; the message says which file and why."""


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


# ---------------------------------------------------------------------------------------------- images


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB (grey, palette, 16-bit and CMYK images converted)."""
    return decode_rgb(data)


def face_crop(rgb: np.ndarray, align: bool = False,
              size: tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, bool]:
    """The 112x112 face to embed, and whether alignment failed. With `align` the face is detected and
    warped to the ArcFace template (pipeline.align); where no face is found, and without `align`, an
    image of another size is resized (short side, centre crop) as insightface's `.bin` loader does."""
    failed = False
    if align:
        from pipeline.align import align_face  # mediapipe loads only when asked for

        crop = align_face(rgb, size=size[0])
        if crop is not None:
            return np.ascontiguousarray(crop), False
        failed = True
    if rgb.shape[:2] != (size[1], size[0]):
        rgb = resize_to(rgb, size, "crop")
    return np.ascontiguousarray(rgb), failed


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VerificationError(f"cannot read image {path}: {e.strerror}") from None
    try:
        return decode_image(data)
    except ImageRejected as e:
        raise VerificationError(f"image {path}: {e}") from None


# ------------------------------------------------------------------------------------- loading sets


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
    return VerificationSet(name or path.stem, images, pairs, np.asarray(issame, bool), str(path), failures)


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


# -------------------------------------------------------------------------------------- embeddings


@dataclass
class Embeddings:
    embeddings: np.ndarray  # float32 [N, D]: with the flip test, the sum of both views (not normalised)
    xnorm: float  # mean L2 norm of the single-view embeddings (insightface's XNorm)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's forward broadcasts buffers to the other ranks, which are not evaluating.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB -> float32 [B, 3, H, W] in [-1, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    return x.permute(0, 3, 1, 2).float().sub_(MEAN).div_(STD)


def embed_batches(model: nn.Module, batches: Iterable[np.ndarray], device: str | torch.device,
                  flip: bool = True, amp_dtype: Optional[torch.dtype] = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each uint8 [B, 112, 112, 3] batch: (embeddings [B, D], single-view norms [B] or [2B]).

    The model runs in eval mode and is put back in the mode it was in."""
    model = _unwrap(model)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            # Entered per batch: grad mode is thread state, and must not leak to the caller between yields.
            amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                x = to_input(batch, device)
                views = [x, torch.flip(x, dims=[3])] if flip else [x]
                out = [model(v).float() for v in views]
                norms = torch.cat([o.norm(dim=1) for o in out]).cpu().numpy()
                emb = (out[0] + out[1] if flip else out[0]).cpu().numpy()
            if not np.isfinite(emb).all():
                raise FloatingPointError("the model produced NaN or inf embeddings")
            yield emb, norms
    finally:
        model.train(was_training)


def embed_images(model: nn.Module, images: np.ndarray | Sequence[np.ndarray], device: str | torch.device,
                 batch_size: int = 64, flip: bool = True, amp_dtype: Optional[torch.dtype] = None,
                 progress: bool = False, desc: str = "embed") -> Embeddings:
    """Embeddings of uint8 [N, 112, 112, 3] RGB images, batch by batch."""
    n = len(images)
    batches = (np.asarray(images[i:i + batch_size]) for i in range(0, n, batch_size))
    embs, norms = [], []
    for emb, norm in tqdm(embed_batches(model, batches, device, flip, amp_dtype), total=-(-n // batch_size),
                          desc=desc, disable=not progress, leave=False, unit="batch"):
        embs.append(emb)
        norms.append(norm)
    if not embs:
        raise VerificationError("no images to embed")
    return Embeddings(np.concatenate(embs), float(np.mean(np.concatenate(norms))))


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class PairResult:
    """Verification on a list of pairs: insightface's 10-fold accuracy and TAR at FAR."""

    pairs: int
    kfold: metrics.KFoldResult
    tar_at_far: dict[float, metrics.TarAtFar]
    xnorm: float
    genuine: np.ndarray = field(repr=False)  # cosine similarities of the genuine pairs
    impostor: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "acc": self.kfold.acc,
            "std": self.kfold.std,
            "threshold": float(np.mean(self.kfold.thresholds)),  # squared L2 distance of unit vectors
            "xnorm": self.xnorm,
            "genuine": int(len(self.genuine)),
            "impostor": int(len(self.impostor)),
            "tar_at_far": {metrics.far_key(f): r.tar for f, r in self.tar_at_far.items()},
        }

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        return metrics.roc_points(self.genuine, self.impostor)


def score_pairs(embeddings: np.ndarray, pairs: np.ndarray, issame: np.ndarray, xnorm: float = float("nan"),
                fars: Sequence[float] = metrics.FARS, n_folds: int = 10) -> PairResult:
    e1, e2 = embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]
    kfold = metrics.kfold_accuracy(metrics.pair_distances(e1, e2), issame, n_folds)
    sims = metrics.pair_similarities(e1, e2)
    genuine, impostor = sims[issame], sims[~issame]
    tars = metrics.tar_at_far(genuine, impostor, fars)
    return PairResult(len(issame), kfold, tars, xnorm, genuine, impostor)


def verify(model: nn.Module, target: VerificationSet, device: str | torch.device, batch_size: int = 64,
           flip: bool = True, fars: Sequence[float] = metrics.FARS, amp_dtype: Optional[torch.dtype] = None,
           progress: bool = False) -> PairResult:
    emb = embed_images(model, target.images, device, batch_size, flip, amp_dtype, progress, desc=target.name)
    return score_pairs(emb.embeddings, target.pairs, target.issame, emb.xnorm, fars)


def evaluate_targets(model: nn.Module, targets: Mapping[str, Any] | Sequence[Any], device: str | torch.device,
                     batch_size: int = 64, flip: bool = True,
                     fars: Sequence[float] = metrics.FARS) -> dict[str, dict[str, Any]]:
    """{name: {"acc", "std", "xnorm", "pairs", "threshold", "tar_at_far", ...}} for each target.

    A target is a VerificationSet or a path to a `.bin`/pairs.txt (images under its folder), given as a
    list or as {name: target}. Paths are decoded once per process and kept (the trainer evaluates the
    same targets again and again). The model's train/eval mode is left as it was."""
    if isinstance(targets, Mapping):
        items = list(targets.items())
    else:
        items = [(None, t) for t in targets]
    results = {}
    for name, target in items:
        if not isinstance(target, VerificationSet):
            target = cached_target(target, name=name)
        name = name or target.name
        results[name] = verify(model, target, device, batch_size, flip, fars).summary()
        results[name]["align_failures"] = target.align_failures
    return results
