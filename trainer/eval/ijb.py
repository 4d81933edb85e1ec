"""IJB-B and IJB-C: the template protocols that face-recognition papers report, on the released layout.

    python -m trainer.eval --checkpoint model.pt --ijb ROOT --ijb-set IJBC [--save-features f.npz]
    python -m trainer.eval --checkpoint model.pt --ijb ROOT --features f.npz   # re-score, no embedding

ROOT is laid out as insightface's IJB release (read unchanged):
    meta/ijbc_face_tid_mid.txt          `image_name template_id media_id`, one line per face crop
    meta/ijbc_name_5pts_score.txt       `image_name x1 y1 ... x5 y5 detector_score`, the same lines in order
    meta/ijbc_template_pair_label.txt   `template_1 template_2 label` (1 = same subject)
    loose_crop/<image_name>             the loose face crops
    meta/ijbc_1N_gallery_G1.csv, _G2.csv, ijbc_1N_probe_mixed.csv   1:N (IJB-B: _S1, _S2), CSV with a
                                        header, TEMPLATE_ID and SUBJECT_ID first, one row per image
(ijbb_* for IJB-B.) 1:N runs when its three CSVs are present.

Alignment: each loose crop is warped to the 112x112 ArcFace template from its five given points by the
packer's similarity transform (pipeline.landmarks.warp_to_template; black outside the photo).

1:1 verification, as insightface's recognition/arcface_torch/eval_ijbc.py defines it:
- image feature: the embedding of the aligned crop plus that of its mirror image (flip test, "F2"); with
  --no-flip the crop alone. Norm score ("N1", default on): the raw feature, its norm kept; off, each image
  feature is L2-normalised first. Detector score ("D1", default on): the feature times the crop's detector
  score.
- media pooling: the mean of the image features of one media (a video's frames; a photo is its own media);
  template pooling: the sum of the media features, then L2-normalised.
- a pair's score is the dot product of its two template features (float32 here; insightface's float64
  differs by < 1e-6).
- the ROC is sklearn's roc_curve(label, score) with its default drop_intermediate=True (collinear points
  dropped). TAR at a FAR x is the TPR of the ROC point whose FPR is nearest to x (|fpr - x| least); of
  equally near points, the first of the curve flipped to descending FPR, as eval_ijbc.py walks it: the
  larger FPR, and of equal FPRs the largest TPR. No interpolation, and not a bound: the chosen point's FPR
  may exceed x (FAR 1e-6 on 15.6M impostors is the point nearest 15.6 false accepts). The JSON
  also gives `tar_at_far_strict`, the conservative rule of trainer.eval.tar_far.tar_at_far (at most
  floor(x * impostors) impostors accepted).

1:N identification (IJB-C: galleries G1 and G2, IJB-B: S1 and S2; the mixed probe templates searched in
each gallery separately, the two results averaged, as the protocol says):
- closed set, over the mated searches (probe subject in the gallery): a search finds its mate at rank r
  when fewer than r non-mate gallery templates score strictly above the best mate template (CMC, rank-1,
  rank-5).
- open set: FPIR(t) = share of non-mated searches whose top score is above t; TPIR(t) = share of mated
  searches whose mate is at rank 1 with a score above t. At FPIR f the threshold is the (k+1)-th highest
  non-mated top score, k = floor(f * non-mated searches) (trainer.eval.tar_far.tar_at_far's rule); None when
  k < 1.

The features (per image, before pooling) are saved before any scoring starts (--save-features, or beside
--output as OUTPUT_STEM.ijbc_features.npz for one checkpoint), and every input is checked before embedding
(meta files, pairs naming unknown templates, missing crops, landmarks outside their image): a bad input
stops the run at once with one line naming file and line.
"""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.imageio import ImageRejected, _exif_orientation, decode_rgb
from pipeline.landmarks import warp_to_template
from trainer.eval.common import FARS, far_key
from trainer.eval.embedding import embed_batches
from trainer.eval.folder import load_npz, save_npz
from trainer.eval.identification import cmc_from_topk
from trainer.eval.images import IMAGE_SIZE, VerificationError
from trainer.eval.tar_far import TarAtFar, tar_at_far

SETS = ("IJBB", "IJBC")
GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
FPIRS: tuple[float, ...] = (1e-2, 1e-1)


class IJBError(VerificationError):
    """The IJB layout, a meta file or a crop cannot be used; the message names the file and line."""


# ------------------------------------------------------------------------------------------ the layout


@dataclass
class TemplateSet:
    """A 1:N gallery or probe set: its templates (ascending) and the subject of each."""

    name: str
    templates: np.ndarray  # int64
    subjects: np.ndarray  # int64


@dataclass
class IJBLayout:
    root: Path
    name: str  # "IJBB" or "IJBC"
    images: list[str]  # crop file names under loose_crop/, one per face line
    templates: np.ndarray  # int64 [N] template of each image
    medias: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2] in the loose crop's pixels
    faceness: np.ndarray  # float32 [N] detector scores
    pair_t1: np.ndarray  # int64 [P]
    pair_t2: np.ndarray
    pair_label: np.ndarray  # bool [P]
    galleries: list[TemplateSet]
    probe: Optional[TemplateSet]

    def meta(self, suffix: str) -> Path:
        return meta_file(self.root, self.name, suffix)

    @property
    def crops(self) -> Path:
        return self.root / "loose_crop"


def meta_file(root: Path, name: str, suffix: str) -> Path:
    return Path(root) / "meta" / f"{name.lower()}_{suffix}"


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise IJBError(f"{path}: no such file (is {path.parent.parent} an IJB root?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise IJBError(f"{path}: cannot read ({e})") from None


def _int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise IJBError(f"{where}: {what} {text!r} is not an integer") from None


def _read_faces(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, tids, mids = [], [], []
    for lineno, line in enumerate(_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 3:
            raise IJBError(f"{where}: expected 'image_name template_id media_id', got {line.strip()!r}")
        names.append(fields[0])
        tids.append(_int(fields[1], where, "template id"))
        mids.append(_int(fields[2], where, "media id"))
    if not names:
        raise IJBError(f"{path}: no face lines")
    return names, np.asarray(tids, np.int64), np.asarray(mids, np.int64)


def _read_points(path: Path, names: Sequence[str], faces: Path) -> tuple[np.ndarray, np.ndarray]:
    tokens: list[str] = []
    linenos: list[int] = []
    for lineno, line in enumerate(_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        i = len(linenos)
        if len(fields) != 12:
            raise IJBError(f"{where}: expected 'image_name x1 y1 ... x5 y5 score' (12 fields), got "
                           f"{len(fields)}")
        if i >= len(names):
            raise IJBError(f"{where}: more lines than the {len(names)} faces of {faces}")
        if fields[0] != names[i]:
            raise IJBError(f"{where}: image {fields[0]!r}, but line {i + 1} of {faces} is {names[i]!r} "
                           "(the two files list the same crops in the same order)")
        tokens += fields[1:]
        linenos.append(lineno)
    if len(linenos) != len(names):
        raise IJBError(f"{path}: {len(linenos)} lines for the {len(names)} faces of {faces}")
    try:
        values = np.array(tokens, dtype=np.float64).reshape(-1, 11)  # one conversion for all lines
    except ValueError:
        for row in range(len(linenos)):
            try:
                [float(x) for x in tokens[11 * row:11 * row + 11]]
            except ValueError:
                raise IJBError(f"{path}:{linenos[row]}: a landmark or score is not a number") from None
        raise
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        raise IJBError(f"{path}:{linenos[bad[0]]}: a landmark or score is not finite")
    return values[:, :10].astype(np.float32).reshape(-1, 5, 2), values[:, 10].astype(np.float32)


def _nth_data_line(path: Path, row: int) -> int:
    """The 1-based line number of the row-th (0-based) non-blank line: only on the error path."""
    seen = -1
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == row:
                    return lineno
    return seen + 2


def _read_pairs(path: Path) -> np.ndarray:
    """int64 [P, 3] of a pair file (15.7M lines for IJB-C: numpy's C parser, Python only to name a bad
    line)."""
    if not path.is_file():
        raise IJBError(f"{path}: no such file (is {path.parent.parent} an IJB root?)")
    try:
        rows = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        for lineno, line in enumerate(_lines(path), 1):
            fields = line.split()
            if fields and (len(fields) != 3 or not all(f.lstrip("-").isdigit() for f in fields)):
                raise IJBError(f"{path}:{lineno}: expected 'template_1 template_2 label', got "
                               f"{line.strip()!r}") from None
        raise IJBError(f"{path}: cannot be parsed as 'template_1 template_2 label' lines") from None
    if rows.shape[0] == 0:
        raise IJBError(f"{path}: no pairs")
    if rows.shape[1] != 3:
        raise IJBError(f"{path}:{_nth_data_line(path, 0)}: expected 'template_1 template_2 label'")
    bad = np.flatnonzero((rows[:, 2] != 0) & (rows[:, 2] != 1))
    if len(bad):
        raise IJBError(f"{path}:{_nth_data_line(path, int(bad[0]))}: label {rows[bad[0], 2]} is not 0 or 1")
    return rows


def _read_template_csv(path: Path, known: set[int], name: str) -> TemplateSet:
    """A 1:N CSV: header, then TEMPLATE_ID,SUBJECT_ID,... per image; one subject per template."""
    lines = _lines(path)
    subject_of: dict[int, int] = {}
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split(",")
        where = f"{path}:{lineno}"
        if len(fields) < 2:
            raise IJBError(f"{where}: expected TEMPLATE_ID,SUBJECT_ID,..., got {line.strip()!r}")
        tid, sid = _int(fields[0], where, "template id"), _int(fields[1], where, "subject id")
        if subject_of.setdefault(tid, sid) != sid:
            raise IJBError(f"{where}: template {tid} is given subject {sid} here and {subject_of[tid]} "
                           "above")
        if tid not in known:
            raise IJBError(f"{where}: template {tid} has no face in "
                           f"{meta_file(path.parent.parent, name, 'face_tid_mid.txt')}")
    if not subject_of:
        raise IJBError(f"{path}: no templates")
    tids = np.array(sorted(subject_of), np.int64)
    return TemplateSet(path.stem.rsplit("_", 1)[-1], tids, np.array([subject_of[t] for t in tids], np.int64))


def read_layout(root: str | os.PathLike, name: str = "IJBC") -> IJBLayout:
    """Every meta file of an IJB root, checked (not the crops: see check_crops)."""
    root = Path(root)
    if name not in SETS:
        raise IJBError(f"unknown IJB set {name!r} (one of {', '.join(SETS)})")
    if not root.is_dir():
        raise IJBError(f"{root}: not a folder")
    faces = meta_file(root, name, "face_tid_mid.txt")
    images, templates, medias = _read_faces(faces)
    points, scores = _read_points(meta_file(root, name, "name_5pts_score.txt"), images, faces)
    known = np.unique(templates)
    pair_file = meta_file(root, name, "template_pair_label.txt")
    pairs = _read_pairs(pair_file)
    for col in (0, 1):
        pos = np.minimum(np.searchsorted(known, pairs[:, col]), len(known) - 1)
        bad = np.flatnonzero(known[pos] != pairs[:, col])
        if len(bad):
            raise IJBError(f"{pair_file}:{_nth_data_line(pair_file, int(bad[0]))}: template "
                           f"{pairs[bad[0], col]} has no face in {faces}")
    csvs = [meta_file(root, name, f"1N_gallery_{g}.csv") for g in GALLERIES[name]]
    csvs.append(meta_file(root, name, "1N_probe_mixed.csv"))
    present = [p.is_file() for p in csvs]
    galleries: list[TemplateSet] = []
    probe = None
    if any(present):
        if not all(present):
            missing = [str(p) for p, ok in zip(csvs, present) if not ok]
            raise IJBError(f"{missing[0]}: no such file (1:N needs {', '.join(p.name for p in csvs)})")
        known_set = set(known.tolist())
        galleries = [_read_template_csv(p, known_set, name) for p in csvs[:2]]
        probe = _read_template_csv(csvs[2], known_set, name)
    return IJBLayout(root, name, images, templates, medias, points, scores, pairs[:, 0].copy(),
                     pairs[:, 1].copy(), pairs[:, 2] == 1, galleries, probe)


# ------------------------------------------------------------------------------------ crops, embedding


class _CropSizes(Dataset):
    """(width, height) of each crop from its header (upright, as decoding will turn it), or an error."""

    def __init__(self, layout: IJBLayout) -> None:
        self.crops, self.images = layout.crops, layout.images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.crops / self.images[i]
        try:
            with Image.open(path) as img:
                w, h = img.size
                if _exif_orientation(img) in (5, 6, 7, 8):
                    w, h = h, w
            return w, h, ""
        except FileNotFoundError:
            return -1, -1, "no such file"
        except (UnidentifiedImageError, OSError) as e:
            return -1, -1, f"not a readable image ({e})"


def _collate_sizes(items):
    return np.array([(w, h) for w, h, _ in items], np.int64), [r for _, _, r in items]


def check_crops(layout: IJBLayout, workers: int = 2, progress: bool = True) -> None:
    """Every crop exists, is an image, and holds its five points (pixel-edge bounds: 0 <= x <= width):
    checked from the file headers before any embedding."""
    loader = DataLoader(_CropSizes(layout), batch_size=512, num_workers=workers, collate_fn=_collate_sizes)
    points_file = layout.meta("name_5pts_score.txt")
    start = 0
    for sizes, reasons in tqdm(loader, desc=f"check {layout.name} crops", unit="batch", disable=not progress):
        for j, reason in enumerate(reasons):
            if reason:
                raise IJBError(f"{layout.crops / layout.images[start + j]}: {reason} (line {start + j + 1} "
                               f"of {layout.meta('face_tid_mid.txt')})")
        pts = layout.landmarks[start:start + len(sizes)]
        wh = sizes[:, None, :].astype(np.float32)
        outside = np.flatnonzero(((pts < 0) | (pts > wh)).any(axis=(1, 2)))
        if len(outside):
            i = start + int(outside[0])
            raise IJBError(f"{points_file}:{i + 1}: a landmark of {layout.images[i]} lies outside its "
                           f"{sizes[outside[0], 0]}x{sizes[outside[0], 1]} image")
        start += len(sizes)


class _AlignedCrops(Dataset):
    """(aligned uint8 [112, 112, 3] RGB crop, error or "") per face line; decoded in loader workers."""

    def __init__(self, layout: IJBLayout) -> None:
        self.crops, self.images, self.landmarks = layout.crops, layout.images, layout.landmarks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.crops / self.images[i]
        try:
            rgb = decode_rgb(path.read_bytes())
        except (OSError, ImageRejected) as e:
            return np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8), f"{path}: {e} (line {i + 1})"
        return warp_to_template(rgb, self.landmarks[i].astype(np.float64), IMAGE_SIZE[0]), ""


def _collate_crops(items):
    return np.stack([c for c, _ in items]), [r for _, r in items]


def aligned_crop(layout: IJBLayout, i: int) -> np.ndarray:
    """The aligned 112x112 crop of face line i (what the model sees)."""
    crop, error = _AlignedCrops(layout)[i]
    if error:
        raise IJBError(error)
    return crop


def embed_layout(model: torch.nn.Module, layout: IJBLayout, device: torch.device, batch_size: int = 64,
                 flip: bool = True, workers: int = 2, progress: bool = True) -> np.ndarray:
    """float32 [N, D] image features in face-line order: the embedding, plus that of the mirror image with
    the flip test (not normalised: pooling decides)."""
    loader = DataLoader(_AlignedCrops(layout), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate_crops)

    def batches():
        for crops, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                raise IJBError(bad[0])
            yield crops

    out = [e for e, _ in tqdm(embed_batches(model, batches(), device, flip), total=len(loader),
                              desc=f"embed {layout.name}", unit="batch", disable=not progress)]
    return np.concatenate(out).astype(np.float32, copy=False)


def save_features(path: str | os.PathLike, features: np.ndarray, layout: IJBLayout, checkpoint: str,
                  network: str, flip: bool) -> None:
    from pipeline.manifest import sha256_file

    save_npz(path, embeddings=features, images=np.array(layout.images, dtype=str), set=np.array(layout.name),
             checkpoint_sha256=np.array(sha256_file(checkpoint)), network=np.array(network),
             flip=np.array(flip), normalized=np.array(False))


def load_features(path: str | os.PathLike, layout: IJBLayout, checkpoint: str) -> tuple[np.ndarray, bool]:
    """Image features saved by --save-features for this layout and checkpoint, and their flip flag."""
    try:
        data = load_npz(path, checkpoint)
    except VerificationError as e:
        raise IJBError(str(e)) from None
    if "images" not in data or str(data.get("set", "")) != layout.name:
        raise IJBError(f"{path}: not {layout.name} image features of --save-features")
    feats, names = data["embeddings"], data["images"]
    if len(names) != len(layout.images) or feats.shape[0] != len(names) or \
            not np.array_equal(names, np.array(layout.images, dtype=str)):
        raise IJBError(f"{path}: its {len(names)} images are not the {len(layout.images)} faces of "
                       f"{layout.meta('face_tid_mid.txt')}")
    return feats.astype(np.float32, copy=False), bool(data.get("flip", True))


# ------------------------------------------------------------------------------------ pooling, scoring


def _rows_matrix(starts: np.ndarray, cols: np.ndarray, values: np.ndarray, width: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """A sparse CSR [len(starts), width] matrix whose row r holds cols[starts[r]:starts[r + 1]]."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(np.r_[starts, len(cols)].astype(np.int64)),
                                       torch.from_numpy(np.asarray(cols, np.int64)),
                                       torch.from_numpy(np.asarray(values)).to(dtype),
                                       size=(len(starts), width), check_invariants=False)


def template_features(features: np.ndarray, faceness: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      norm_score: bool = True, detector_score: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(templates ascending, float32 [T, D] L2-normalised template features): image features (L2-normalised
    unless norm_score, times the detector score with detector_score), averaged per media, summed per
    template, normalised (a zero sum stays zero, as sklearn's normalize leaves it)."""
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))
    weight = np.ones(len(x), np.float64)  # per image, folded into the pooling matrix: no copy of x
    if not norm_score:
        weight /= torch.linalg.vector_norm(x, dim=1).double().numpy()
    if detector_score:
        weight *= np.asarray(faceness, np.float64)
    templates, medias = np.asarray(templates, np.int64), np.asarray(medias, np.int64)
    order = np.lexsort((medias, templates))
    t, m = templates[order], medias[order]
    media_start = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])])
    counts = np.diff(np.r_[media_start, len(t)])
    # media mean = a sparse [media, image] matrix of weight / count times the features (one kernel, no
    # gathered copy of the 469k x 512 features)
    mean_weight = weight[order] / np.repeat(counts, counts)
    mean_of = _rows_matrix(media_start, order, mean_weight, len(x), torch.float32)
    media = (mean_of @ x).double()
    media_t = t[media_start]
    t_start = np.flatnonzero(np.r_[True, media_t[1:] != media_t[:-1]])
    n_media = len(media_t)
    sum_of = _rows_matrix(t_start, np.arange(n_media), np.ones(n_media), n_media, torch.float64)
    pooled = (sum_of @ media).numpy()
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    pooled = np.divide(pooled, norms, out=np.zeros_like(pooled), where=norms > 0)
    return media_t[t_start], pooled.astype(np.float32)


def template_rows(known: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Row of each template id in `known` (ascending); every id must be there."""
    rows = np.searchsorted(known, templates)
    if len(templates) and (rows.max() >= len(known) or not np.array_equal(known[rows], templates)):
        raise IJBError("a template has no feature")  # read_layout names the line; this is a misuse guard
    return rows


def pair_scores(feats: np.ndarray, rows1: np.ndarray, rows2: np.ndarray, block: int = 1024,
                progress: bool = True) -> np.ndarray:
    """float32 [P] dot products feats[rows1[i]] . feats[rows2[i]].

    Pairs are taken in blocks of `block` distinct first templates; where the block's pairs fill at least
    1/32 of its (first template x second template) grid, one matrix product scores the grid and the pairs
    are picked from it (BLAS speed: 15.7M pairs of 3.5k gallery x 19.6k probe templates fill 1/4 of their
    grid), otherwise the pairs' rows are gathered and multiplied row by row."""
    rows1, rows2 = np.asarray(rows1, np.int64), np.asarray(rows2, np.int64)
    feats = np.ascontiguousarray(feats, np.float32)
    n = len(rows1)
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    sorted_already = bool(np.all(rows1[1:] >= rows1[:-1]))
    order = None if sorted_already else np.argsort(rows1, kind="stable")
    r1 = rows1 if order is None else rows1[order]
    r2 = rows2 if order is None else rows2[order]
    new = np.r_[True, r1[1:] != r1[:-1]]
    starts = np.flatnonzero(new)
    col_pos = np.zeros(len(feats), np.int64)
    mark = np.zeros(len(feats), bool)
    scores = np.empty(n, np.float32)
    for b in tqdm(range(0, len(starts), block), desc="score pairs", unit="block", disable=not progress,
                  leave=False):
        lo = starts[b]
        hi = starts[b + block] if b + block < len(starts) else n
        firsts = r1[starts[b:b + block]]
        second = r2[lo:hi]
        mark[:] = False
        mark[second] = True
        cols = np.flatnonzero(mark)
        if len(firsts) * len(cols) <= 32 * (hi - lo):
            grid = feats[firsts] @ feats[cols].T
            col_pos[cols] = np.arange(len(cols))
            row_pos = np.cumsum(new[lo:hi]) - 1
            scores[lo:hi] = grid[row_pos, col_pos[second]]
        else:
            for a in range(lo, hi, 4096):
                z = min(a + 4096, hi)
                scores[a:z] = np.einsum("ij,ij->i", feats[r1[a:z]], feats[r2[a:z]])
    if order is None:
        return scores
    out[order] = scores
    return out


def insightface_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) ascending as sklearn's roc_curve(labels, scores) with drop_intermediate=True gives them
    (its rule, re-implemented: a point per distinct score, collinear points dropped, (0, 0) prepended)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, bool)
    # Counts at or above each distinct score, from one sort of all scores (no argsort: 3x the time) and
    # a search among the few genuine scores.
    asc = np.sort(scores)
    first = np.flatnonzero(np.r_[True, asc[1:] != asc[:-1]])
    values = asc[first]
    at_or_above = len(asc) - first
    tps = (int(labels.sum()) - np.searchsorted(np.sort(scores[labels]), values, side="left"))[::-1]
    fps = at_or_above[::-1] - tps
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    with np.errstate(invalid="ignore", divide="ignore"):  # no negatives (or positives): NaN, as sklearn
        return fps / fps[-1], tps / tps[-1]


def nearest_tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """eval_ijbc.py's TAR@FAR: on the curve flipped to descending FPR, the first point with the least
    |fpr - far| (np.argmin takes the first, as its min over (distance, index) tuples does)."""
    f, t = np.asarray(fpr)[::-1], np.asarray(tpr)[::-1]
    return {far: float(t[int(np.argmin(np.abs(f - far)))]) for far in fars}


@dataclass
class VerificationResult:
    scores: np.ndarray  # float32 [P]
    labels: np.ndarray  # bool [P]
    fpr: np.ndarray
    tpr: np.ndarray
    tar_at_far: dict[float, float]
    strict: dict[float, TarAtFar]

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": int(len(self.labels)),
            "genuine": int(self.labels.sum()),
            "impostor": int((~self.labels).sum()),
            "tar_at_far": {far_key(f): v for f, v in self.tar_at_far.items()},
            "tar_at_far_strict": {far_key(f): r.tar for f, r in self.strict.items()},
            "threshold_at_far_strict": {far_key(f): r.threshold for f, r in self.strict.items()},
        }


def verify_templates(known: np.ndarray, feats: np.ndarray, t1: np.ndarray, t2: np.ndarray, labels: np.ndarray,
                     fars: Sequence[float] = FARS, progress: bool = True) -> VerificationResult:
    """1:1 template-pair scores, their ROC and TAR at each FAR (both rules)."""
    labels = np.asarray(labels, bool)
    scores = pair_scores(feats, template_rows(known, t1), template_rows(known, t2), progress=progress)
    fpr, tpr = insightface_roc(scores, labels)
    return VerificationResult(scores, labels, fpr, tpr, nearest_tar_at_far(fpr, tpr, fars),
                              tar_at_far(scores[labels], scores[~labels], fars))


@dataclass
class SearchResult:
    gallery: str
    mated: int
    non_mated: int
    cmc: np.ndarray  # rates at ranks 1..max_rank over the mated searches
    tpir: dict[float, Optional[float]]
    thresholds: dict[float, Optional[float]]


def search(known: np.ndarray, feats: np.ndarray, gallery: TemplateSet, probe: TemplateSet,
           fpirs: Sequence[float] = FPIRS, max_rank: int = 10, chunk: int = 4096) -> SearchResult:
    """One gallery's 1:N result for every probe template (rules in the module docstring)."""
    g = feats[template_rows(known, gallery.templates)]
    p = feats[template_rows(known, probe.templates)]
    k = min(max_rank, len(g))
    mated = np.isin(probe.subjects, gallery.subjects)
    # Mate and non-mate scores from the same product, so that a tie between them stays a tie.
    mate = np.full(len(p), -np.inf, np.float32)
    top = np.empty((len(p), k), np.float32)
    for a in range(0, len(p), chunk):
        scores = p[a:a + chunk] @ g.T
        same = probe.subjects[a:a + chunk, None] == gallery.subjects[None, :]
        mate[a:a + chunk] = np.where(same, scores, -np.inf).max(axis=1)
        scores[same] = -np.inf
        top[a:a + chunk] = -np.sort(np.partition(-scores, k - 1, axis=1)[:, :k], axis=1)
    m = np.flatnonzero(mated)
    cmc = cmc_from_topk(mate[m], np.arange(len(m)), top[m])
    if k < max_rank:  # a gallery smaller than max_rank: every mate is found within it
        cmc = np.r_[cmc, np.full(max_rank - k, cmc[-1] if len(cmc) else np.nan)]
    rank1_mate = np.where(top[m, 0] > mate[m], -np.inf, mate[m])
    non_mated_top = top[~mated, 0]
    tars = tar_at_far(rank1_mate, non_mated_top, fpirs)
    return SearchResult(gallery.name, len(m), int((~mated).sum()), cmc, {f: r.tar for f, r in tars.items()},
                        {f: r.threshold for f, r in tars.items()})


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    return None if any(v is None for v in values) else float(np.mean(values))


def identification_summary(results: Sequence[SearchResult]) -> dict[str, Any]:
    """The protocol's figures: each gallery's, and their mean (IJB-C: G1 and G2 averaged)."""
    cmc = np.mean([r.cmc for r in results], axis=0)
    fpirs = list(results[0].tpir)
    per = {r.gallery: {"mated": r.mated, "non_mated": r.non_mated, "rank1": float(r.cmc[0]),
                       "rank5": float(r.cmc[4]) if len(r.cmc) >= 5 else None, "cmc": r.cmc.tolist(),
                       "tpir_at_fpir": {far_key(f): r.tpir[f] for f in fpirs},
                       "threshold_at_fpir": {far_key(f): r.thresholds[f] for f in fpirs}}
           for r in results}
    return {"rank1": float(cmc[0]), "rank5": float(cmc[4]) if len(cmc) >= 5 else None, "cmc": cmc.tolist(),
            "tpir_at_fpir": {far_key(f): _mean([r.tpir[f] for r in results]) for f in fpirs},
            "galleries": per}


@dataclass
class IJBScores:
    verification: VerificationResult
    identification: list[SearchResult]


def score_layout(layout: IJBLayout, features: np.ndarray, norm_score: bool = True,
                 detector_score: bool = True, fars: Sequence[float] = FARS, max_rank: int = 10,
                 progress: bool = True) -> IJBScores:
    """Both protocols on image features of every face line."""
    if features.shape[0] != len(layout.images):
        raise IJBError(f"{len(features)} features for the {len(layout.images)} faces of "
                       f"{layout.meta('face_tid_mid.txt')}")
    known, feats = template_features(features, layout.faceness, layout.templates, layout.medias, norm_score,
                                     detector_score)
    ver = verify_templates(known, feats, layout.pair_t1, layout.pair_t2, layout.pair_label, fars, progress)
    ident = [search(known, feats, g, layout.probe, FPIRS, max(max_rank, 5)) for g in layout.galleries]
    return IJBScores(ver, ident)


# ----------------------------------------------------------------------------------------- command line


def add_ijb_arguments(parser: argparse.ArgumentParser, source_group=None) -> None:
    """The IJB options of `python -m trainer.eval`; --ijb joins `source_group` (the mutually exclusive
    --pairs/--data group) when given."""
    (source_group or parser).add_argument("--ijb", metavar="ROOT",
                                          help="IJB-B/IJB-C root in insightface's layout "
                                               "(meta/, loose_crop/)")
    parser.add_argument("--ijb-set", choices=SETS, default="IJBC", help="--ijb: which set (default IJBC)")
    parser.add_argument("--ijb-norm-score", action=argparse.BooleanOptionalAction, default=True,
                        help="--ijb: keep each image feature's norm in pooling (eval_ijbc.py's N1; "
                             "default on)")
    parser.add_argument("--ijb-detector-score", action=argparse.BooleanOptionalAction, default=True,
                        help="--ijb: weight each image by its detector score (eval_ijbc.py's D1; default on)")
    parser.add_argument("--save-features", metavar="NPZ",
                        help="--ijb: save the image features here before scoring starts (default with "
                             "--output and one checkpoint: OUTPUT_STEM.ijbc_features.npz)")
    parser.add_argument("--features", metavar="NPZ",
                        help="--ijb: score these saved image features instead of embedding")


def run_ijb(args: argparse.Namespace, model: torch.nn.Module, device: torch.device
            ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """One checkpoint on --ijb: (the JSON result, {name: ROC (fpr, tpr)}, {name: CMC rates})."""
    if (args.features or args.save_features) and len(args.checkpoint) > 1:
        raise IJBError("--features and --save-features take one --checkpoint")
    if args.features and args.save_features:
        raise IJBError("--features re-scores saved features; --save-features is for embedding")
    checkpoint = args.checkpoint[0] if len(args.checkpoint) == 1 else None
    progress = not args.no_progress
    layout = read_layout(args.ijb, args.ijb_set)
    name = layout.name
    save_to = None
    if args.features:
        features, flip = load_features(args.features, layout, checkpoint)
    else:
        check_crops(layout, args.workers, progress)
        flip = not args.no_flip
        features = embed_layout(model, layout, device, args.batch_size, flip, args.workers, progress)
        save_to = args.save_features
        if save_to is None and args.output and checkpoint is not None:
            # An hour of embedding is never lost to a failure after it: kept beside the results.
            save_to = f"{Path(args.output).with_suffix('')}.{name.lower()}_features.npz"
        if save_to:
            save_features(save_to, features, layout, checkpoint, model.network, flip)
    res = score_layout(layout, features, args.ijb_norm_score, args.ijb_detector_score, args.fars,
                       args.max_rank, progress)
    out: dict[str, Any] = {"ijb": str(layout.root), "set": name, "flip": flip,
                           "norm_score": args.ijb_norm_score, "detector_score": args.ijb_detector_score,
                           "images": len(layout.images), "templates": len(np.unique(layout.templates)),
                           "acc": None, "std": None, **res.verification.summary()}
    cmc_curves = {}
    if res.identification:
        out.update(identification_summary(res.identification))
        cmc_curves[f"{name} 1:N"] = np.asarray(out["cmc"])
    if args.features:
        out["features"] = str(args.features)
    elif save_to:
        out["features"] = str(save_to)
    return out, {f"{name} 1:1": (res.verification.fpr, res.verification.tpr)}, cmc_curves
