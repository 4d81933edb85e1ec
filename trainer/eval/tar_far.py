"""TAR at FAR, as the papers report it. Pure numbers in, numbers out: no models, no files.

- `tar_at_far`: the true-accept rate at a false-accept rate, on given genuine and impostor scores.
- `all_pairs_verification`: TAR@FAR and 10-fold accuracy on the all-to-all 1:1 protocol of the MFR
  challenge (every genuine pair against every impostor pair of a labelled set, or of a probe set against
  a gallery), in tiles on the CPU or the GPU. It never holds the N^2 scores: it histograms them twice by
  their float bits (a radix select), which gives exactly the threshold that sorting all scores would.

Score conventions: a similarity is a cosine (higher = more alike); a pair is accepted when its score is
strictly above the threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trainer.eval.common import FARS, narrow_ints, resolve_device
from trainer.eval.kfold import FoldScores
from trainer.eval.rowfile import take_rows

# The radix split of a score's 32-bit key: pass 1 histograms the top 20 bits (sign, exponent, 11 mantissa
# bits: steps of 1/2048 relative, fine enough for the ROC and the k-fold thresholds), pass 2 the low 12.
_LOW_BITS = 12
_BINS = 1 << (32 - _LOW_BITS)
_LOW = 1 << _LOW_BITS


@dataclass
class TarAtFar:
    far: float  # the target
    tar: Optional[float]  # None when the impostors are too few to measure this FAR
    threshold: Optional[float]  # accept scores strictly above it
    measured_far: Optional[float]  # the FAR at that threshold (<= far)

    @property
    def resolvable(self) -> bool:
        return self.tar is not None


def _allowed_false_accepts(far: float, n_impostor: int) -> int:
    # The small epsilon keeps 0.29 * 100 = 28.999999999999996 from losing an impostor.
    return int(math.floor(far * n_impostor * (1 + 1e-9)))


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray,
               fars: Sequence[float] = FARS) -> dict[float, TarAtFar]:
    """The highest TAR whose threshold accepts at most floor(far * n_impostor) impostors.

    The threshold is the (k+1)-th highest impostor score for k = floor(far * n_impostor); TAR is the
    share of genuine scores strictly above it. A FAR below 1 / n_impostor cannot be measured on the set
    (the result would be 'no impostor accepted', not that FAR): its TAR is None.
    """
    genuine = np.asarray(genuine, dtype=np.float64).ravel()
    impostor = np.asarray(impostor, dtype=np.float64).ravel()
    imp_desc = np.sort(impostor)[::-1]
    out = {}
    for far in fars:
        k = _allowed_false_accepts(far, len(impostor))
        if len(genuine) == 0 or len(impostor) == 0 or k < 1:
            out[far] = TarAtFar(far, None, None, None)
            continue
        if k >= len(impostor):
            out[far] = TarAtFar(far, 1.0, -math.inf, 1.0)
            continue
        thr = imp_desc[k]
        out[far] = TarAtFar(far, float(np.mean(genuine > thr)), float(thr), float(np.mean(impostor > thr)))
    return out


def roc_points(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score, for plotting."""
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)])
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(same[order])
    fp = np.cumsum(~same[order])
    last = np.r_[np.diff(scores[order]) != 0, True]  # one point per distinct threshold
    return (np.r_[0.0, fp[last] / max(len(impostor), 1)], np.r_[0.0, tp[last] / max(len(genuine), 1)])


# ----------------------------------------------------------------------------------------------------------
# All-to-all 1:1 verification in tiles (MFR challenge protocol)


def _sortable_key_(scores: torch.Tensor) -> torch.Tensor:
    """In place: float32 scores -> int32 keys that sort as the floats do (-0.0 is folded into +0.0).

    Negative floats keep their sign bit and get the other 31 bits flipped, so that as signed integers
    they run the other way. Returns the int32 view of the same storage.
    """
    scores.add_(0.0)
    bits = scores.view(torch.int32)
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip
    return bits


def _key_to_float(key: int) -> float:
    """Inverse of `_sortable_key_` for one signed key."""
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


@dataclass
class AllPairsResult(FoldScores):
    n_genuine: int
    n_impostor: int
    tar_at_far: dict[float, TarAtFar]
    accuracies: np.ndarray  # 10-fold accuracy (folds by probe row), thresholds on the top-20-bit bins
    roc_fpr: np.ndarray
    roc_tpr: np.ndarray
    fold_thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    balanced_accuracies: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (TPR + TNR) / 2 per fold

    @property
    def pairs(self) -> int:
        return self.n_genuine + self.n_impostor


@dataclass
class _Tile:
    keys: torch.Tensor  # int32 [R, C] sortable keys of the scores
    rows: torch.Tensor  # probe positions (in label order) of the tile's rows
    genuine: Optional[torch.Tensor]  # bool [R, C], or None when the tile holds no genuine pair
    invalid: Optional[torch.Tensor]  # bool [R, C] pairs outside the protocol, or None when there are none

    def not_impostor(self) -> Optional[torch.Tensor]:
        """bool [R, C] of the pairs that are genuine or outside the protocol, or None when none is."""
        if self.invalid is None:
            return self.genuine
        return self.invalid if self.genuine is None else self.genuine | self.invalid


class _PairTiles:
    """Tile by tile, the score keys of every pair of the protocol.

    Symmetric (no gallery): pairs i < j of one set. Otherwise every (probe, gallery) pair. A genuine pair
    whose probe and gallery share a non-negative `group` (the same photo: a masked copy and its source)
    is left out. Both sets are taken in label order, so that genuine pairs gather in few tiles and every
    other tile needs no per-pair label test. The embeddings (numpy, a file-backed memmap, or a tensor) are
    read a tile of rows at a time (trainer/eval/rowfile.py): never copied whole, and a memmap's pages are
    let go after each read. `*_rows` pick the rows of the arrays that take part (labels and groups are
    given for those rows only).
    """

    def __init__(self, probe, probe_labels, gallery, gallery_labels, probe_groups, gallery_groups,
                 tile: int, device: torch.device, probe_rows=None, gallery_rows=None) -> None:
        self.device = device
        self.symmetric = gallery is None
        probe = probe if isinstance(probe, (np.ndarray, torch.Tensor)) else np.asarray(probe, np.float32)
        if not self.symmetric and not isinstance(gallery, (np.ndarray, torch.Tensor)):
            gallery = np.asarray(gallery, np.float32)
        if self.symmetric and gallery_rows is not None:
            raise ValueError("gallery_rows needs a gallery")
        g = probe if self.symmetric else gallery
        if len(probe.shape) != 2 or len(g.shape) != 2 or probe.shape[1] != g.shape[1]:
            raise ValueError(f"embeddings must be [N, D] with one D; got {tuple(probe.shape)} and "
                             f"{tuple(g.shape)}")
        pl = narrow_ints(probe_labels)
        gl = pl if self.symmetric else narrow_ints(gallery_labels)
        p_rows = None if probe_rows is None else narrow_ints(probe_rows)
        g_rows = p_rows if self.symmetric else None if gallery_rows is None else narrow_ints(gallery_rows)
        if len(pl) != (len(probe) if p_rows is None else len(p_rows)) or \
                len(gl) != (len(g) if g_rows is None else len(g_rows)):
            raise ValueError("one label per embedding is needed")
        pg = None if probe_groups is None else narrow_ints(probe_groups)
        gg = pg
        if not self.symmetric:
            gg = None if gallery_groups is None else narrow_ints(gallery_groups)
        if (pg is None) != (gg is None):
            raise ValueError("give groups for both probe and gallery, or for neither")

        def ordered(labels, groups, rows):
            order = narrow_ints(np.argsort(labels, kind="stable"))
            return (torch.as_tensor(labels[order], device=device),
                    None if groups is None else torch.as_tensor(groups[order], device=device),
                    order if rows is None else rows[order])

        self.p_src, self.g_src = probe, g
        self.pl, self.pg, self.p_rows = ordered(pl, pg, p_rows)
        if self.symmetric:
            self.gl, self.gg, self.g_rows = self.pl, self.pg, self.p_rows
        else:
            self.gl, self.gg, self.g_rows = ordered(gl, gg, g_rows)
        self.tile = tile

    def __len__(self) -> int:
        rows = math.ceil(len(self.pl) / self.tile)
        cols = math.ceil(len(self.gl) / self.tile)
        return rows * (rows + 1) // 2 if self.symmetric else rows * cols

    def _read(self, src, rows: np.ndarray) -> torch.Tensor:
        x = take_rows(src, rows, self.device)
        if not torch.isfinite(x).all():
            raise ValueError("embeddings hold NaN or inf")
        return x

    def __iter__(self) -> Iterator[_Tile]:
        t = self.tile
        n_p, n_g = len(self.pl), len(self.gl)
        buf = torch.empty(t * t, dtype=torch.float32, device=self.device)
        for a in range(0, n_p, t):
            b = min(a + t, n_p)
            p = self._read(self.p_src, self.p_rows[a:b])
            rows = torch.arange(a, b, device=self.device)
            row_lo, row_hi = int(self.pl[a]), int(self.pl[b - 1])
            for c in range(a if self.symmetric else 0, n_g, t):
                d = min(c + t, n_g)
                g = p if self.symmetric and c == a else self._read(self.g_src, self.g_rows[c:d])
                scores = buf[: (b - a) * (d - c)].view(b - a, d - c)
                torch.matmul(p, g.T, out=scores)
                keys = _sortable_key_(scores)
                genuine = invalid = None
                if int(self.gl[c]) <= row_hi and int(self.gl[d - 1]) >= row_lo:  # label ranges overlap
                    genuine = self.pl[a:b, None] == self.gl[None, c:d]
                    if self.pg is not None:
                        pg, gg = self.pg[a:b, None], self.gg[None, c:d]
                        invalid = genuine & (pg == gg) & (pg >= 0)
                if self.symmetric and c < b:  # a tile on the diagonal: keep j > i only
                    below = torch.arange(c, d, device=self.device)[None, :] <= rows[:, None]
                    invalid = below if invalid is None else invalid | below
                yield _Tile(keys, rows, genuine, invalid)

    def genuine_bound(self) -> int:
        """At least the number of genuine pairs (same label; before groups leave some out)."""
        labels, p_counts = torch.unique_consecutive(self.pl, return_counts=True)
        if self.symmetric:
            return int((p_counts * (p_counts - 1) // 2).sum())
        g_labels, g_counts = torch.unique_consecutive(self.gl, return_counts=True)
        if len(g_labels) == 0 or len(labels) == 0:
            return 0
        at = torch.searchsorted(g_labels, labels).clamp_(max=len(g_labels) - 1)
        both = g_labels[at] == labels
        return int((p_counts[both] * g_counts[at][both]).sum())


def _count_into(hist: torch.Tensor, idx: torch.Tensor) -> None:
    """hist[i] += number of times i occurs in idx. (bincount would allocate and add a whole histogram per
    tile, which costs more than the tile itself for small tiles.)"""
    flat = idx.reshape(-1)
    hist.index_add_(0, flat, torch.ones(1, dtype=hist.dtype, device=hist.device).expand(len(flat)))


# A pass-1 count in int32 cannot wrap while fewer pairs than this went in since the last flush.
_FLUSH_AT = (1 << 31) - 1
# The top bins counted densely: -W..W of the signed top key, every score of magnitude up to 2 (a cosine of
# unit vectors, rounding included); the rare scores past it (embeddings not normalised) go to the sparse
# total a tile at a time.
_WINDOW = 1 << 18


class _FoldHistogram:
    """Per-fold impostor counts by top bin, for every pair of pass 1, in a quarter of the memory of int64
    counts over all 2^20 top bins (n_folds x (2^19 + 1) int32 bins: 20 MB at 10 folds, not 80): tiles are
    counted into an int32 histogram of the bins a cosine can fall in, on the device, which is emptied into
    a sparse int64 total (the bins some pair fell in) before it could wrap."""

    def __init__(self, n_folds: int, device: torch.device) -> None:
        self.width = 2 * _WINDOW + 1
        self.trash = n_folds * self.width  # takes the pairs that are not impostors; never read
        self.dense = torch.zeros(self.trash + 1, dtype=torch.int32, device=device)
        self.since = 0  # pairs counted into `dense` since it was last emptied
        self.index = np.zeros(0, np.int64)  # sorted flat (fold * 2^20 + bin) indices of the total
        self.count = np.zeros(0, np.int64)

    def add(self, top: torch.Tensor, fold: torch.Tensor, drop: Optional[torch.Tensor]) -> None:
        """Count the pairs of a tile: `top` the signed top keys [R, C] (int32, taken over and changed),
        `fold` the fold of each row, `drop` the pairs that are not impostors (or None)."""
        outside = (top > _WINDOW) | (top < -_WINDOW)
        if bool(outside.any()):
            far = outside if drop is None else outside & ~drop
            flat = fold[:, None].expand_as(top)[far].long() * _BINS + top[far].long() + _BINS // 2
            index, count = torch.unique(flat, return_counts=True)
            self._merge(index.cpu().numpy(), count.cpu().numpy())
            drop = outside if drop is None else drop | outside
        top += (fold * self.width + _WINDOW)[:, None]
        if drop is not None:
            top.masked_fill_(drop, self.trash)
        if self.since + top.numel() > _FLUSH_AT:
            self.flush()
        _count_into(self.dense, top)
        self.since += top.numel()

    def _merge(self, index: np.ndarray, count: np.ndarray) -> None:
        self.index, where = np.unique(np.concatenate([self.index, index]), return_inverse=True)
        total = np.zeros(len(self.index), np.int64)
        np.add.at(total, where, np.concatenate([self.count, count.astype(np.int64)]))
        self.count = total

    def flush(self) -> None:
        dense = self.dense[:self.trash]
        at = torch.nonzero(dense).reshape(-1)
        count = dense[at].cpu().numpy()
        at = at.cpu().numpy()
        self.dense.zero_()
        self.since = 0
        self._merge((at // self.width) * _BINS + at % self.width - _WINDOW + _BINS // 2, count)

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fold, top bin, count) of every non-empty (fold, bin); the device histogram is let go."""
        self.flush()
        self.dense = torch.zeros(0, dtype=torch.int32)
        return self.index // _BINS, self.index % _BINS, self.count


GENUINE_SLICE = 1 << 18  # genuine pairs binned at once after pass 1


def all_pairs_verification(
    probe,
    probe_labels,
    gallery=None,
    gallery_labels=None,
    *,
    fars: Sequence[float] = FARS,
    probe_groups=None,
    gallery_groups=None,
    probe_rows=None,
    gallery_rows=None,
    n_folds: int = 10,
    tile: int = 2048,
    device=None,
    progress: bool = True,
) -> AllPairsResult:
    """TAR@FAR over every genuine and every impostor pair, exact, in memory O(tile^2 + genuine pairs).

    Give L2-normalised embeddings (scores are dot products). Without a gallery, every pair i < j of the
    probe set counts once; with one, every (probe, gallery) pair. `*_groups` leave out genuine pairs that
    share a non-negative group id. Pass 1 keeps every genuine score and histograms the impostor scores by
    the top 20 bits of their sortable key (per fold); pass 2 histograms the low 12 bits inside the few bins
    where the wanted impostor ranks fall, which pins each threshold to the exact float that sorting all
    scores would give. Folds for the accuracy: a pair belongs to fold (probe position in label order) mod
    n_folds. `probe_rows` / `gallery_rows`: the rows of `probe` / `gallery` that take part (default all;
    labels and groups are given per row taken part), so that a subset needs no copy of the embeddings,
    which may be a file-backed memmap of any size (read a tile at a time).
    """
    device = resolve_device(device)
    tiles = _PairTiles(probe, probe_labels, gallery, gallery_labels, probe_groups, gallery_groups, tile,
                       device, probe_rows, gallery_rows)
    imp_hist = _FoldHistogram(n_folds, device)
    # Every genuine score is kept (as its int32 key, and its fold): 5 bytes a pair, in arrays sized once.
    bound = tiles.genuine_bound()
    gen_keys_np, gen_folds_np = np.empty(bound, np.int32), np.empty(bound, np.int8)
    n_gen = 0
    for t in tqdm(tiles, desc="pairs, pass 1/2", disable=not progress, unit="tile", leave=False):
        fold = (t.rows % n_folds).to(torch.int32)
        if t.genuine is not None:
            take = t.genuine if t.invalid is None else t.genuine & ~t.invalid
            k = t.keys[take]
            gen_keys_np[n_gen:n_gen + len(k)] = k.cpu().numpy()
            gen_folds_np[n_gen:n_gen + len(k)] = fold[:, None].expand_as(take)[take].cpu().numpy()
            n_gen += len(k)
        imp_hist.add(t.keys >> _LOW_BITS, fold, t.not_impostor())
    imp_folds, imp_bins, imp_counts = imp_hist.totals()
    del imp_hist
    gen_keys_np, gen_folds_np = gen_keys_np[:n_gen], gen_folds_np[:n_gen]
    # From here on every per-bin array holds only the top bins some pair falls in (about 10^5 of the
    # 2^20), in increasing order: `used`. The genuine pairs are binned a slice at a time.
    # A slice's temporaries are ~28 bytes a pair (bins, columns, flat indices in int64): slices of 2^18 pairs
    # keep them at ~7 MB, where 2^22 made them grow with the set up to 110 MB (~270 bytes an image at 10
    # genuine pairs an image, issue N).
    step = GENUINE_SLICE
    used = imp_bins.astype(np.int64)
    for a in range(0, n_gen, step):
        used = np.union1d(used, (gen_keys_np[a:a + step] >> _LOW_BITS).astype(np.int64) + _BINS // 2)
    hist = np.zeros((n_folds, 2, len(used)), dtype=np.int64)  # [fold, impostor/genuine, used bin]
    imp_used, gen_used = hist[:, 0], hist[:, 1]
    imp_used[imp_folds, np.searchsorted(used, imp_bins)] = imp_counts
    del imp_folds, imp_bins, imp_counts
    for a in range(0, n_gen, step):
        col = np.searchsorted(used, (gen_keys_np[a:a + step] >> _LOW_BITS) + _BINS // 2)
        flat = gen_folds_np[a:a + step].astype(np.int64) * len(used) + col
        gen_used += np.bincount(flat, minlength=n_folds * len(used)).reshape(n_folds, len(used))
    del gen_folds_np
    gen_keys_np.sort()
    gen_keys_sorted = gen_keys_np
    imp_top = imp_used.sum(0)
    n_imp = int(imp_top.sum())
    imp_ge = np.r_[np.cumsum(imp_top[::-1])[::-1], 0]  # imp_ge[j]: impostors in top bins >= used[j]

    # Where the (k+1)-th highest impostor lies: its top bin, its rank inside that bin, and the impostors
    # in the bins above.
    wanted: dict[float, tuple[int, int, int]] = {}
    for far in fars:
        k = _allowed_false_accepts(far, n_imp)
        if n_gen and 1 <= k < n_imp:
            j = int(np.nonzero(imp_ge >= k + 1)[0][-1])
            wanted[far] = (int(used[j]), k + 1 - int(imp_ge[j + 1]), int(imp_ge[j + 1]))
    slots = sorted({b for b, _, _ in wanted.values()})
    low_hist = torch.zeros(len(slots) * _LOW, dtype=torch.int64, device=device)
    if slots:
        lut = torch.full((_BINS,), -1, dtype=torch.int64, device=device)
        lut[torch.as_tensor(slots, device=device)] = torch.arange(len(slots), device=device)
        lowest_key = (slots[0] - _BINS // 2) << _LOW_BITS
        for t in tqdm(tiles, desc="pairs, pass 2/2", disable=not progress, unit="tile", leave=False):
            # Only scores from the lowest wanted bin up matter (a share of about the largest FAR).
            hit = t.keys >= lowest_key
            drop = t.not_impostor()
            if drop is not None:
                hit &= ~drop
            sel = t.keys[hit].long()
            slot = lut[(sel >> _LOW_BITS) + _BINS // 2]
            keep = slot >= 0
            _count_into(low_hist, (sel[keep] & (_LOW - 1)) + _LOW * slot[keep])
        del lut
        low_hist = low_hist.view(len(slots), _LOW)
        low_hist_np = low_hist.cpu().numpy()
        for i, b in enumerate(slots):
            if low_hist_np[i].sum() != imp_top[np.searchsorted(used, b)]:
                raise RuntimeError("the second pass scored pairs differently from the first (a "
                                   "non-deterministic matmul on this device); the threshold cannot be exact")

    result: dict[float, TarAtFar] = {}
    for far in fars:
        k = _allowed_false_accepts(far, n_imp)
        if n_gen == 0 or n_imp == 0 or k < 1:
            result[far] = TarAtFar(far, None, None, None)
            continue
        if k >= n_imp:
            result[far] = TarAtFar(far, 1.0, -math.inf, 1.0)
            continue
        top_bin, rank_in_bin, above = wanted[far]
        low = low_hist_np[slots.index(top_bin)]
        low_ge = np.r_[np.cumsum(low[::-1])[::-1], 0]
        low_bin = int(np.nonzero(low_ge >= rank_in_bin)[0][-1])
        thr_key = ((top_bin - _BINS // 2) << _LOW_BITS) | low_bin
        accepted_gen = n_gen - int(np.searchsorted(gen_keys_sorted, thr_key, side="right"))
        accepted_imp = above + int(low_ge[low_bin + 1])
        result[far] = TarAtFar(far, accepted_gen / n_gen, _key_to_float(thr_key), accepted_imp / n_imp)

    accuracies, fold_thr = kfold_accuracy_from_histograms(hist, used)
    # ROC at the top-bin resolution, from the strictest threshold down: a point per used bin (the bins
    # between them change neither rate).
    fpr = np.r_[0, np.cumsum(imp_top[::-1])] / max(n_imp, 1)
    tpr = np.r_[0, np.cumsum(gen_used.sum(0)[::-1])] / max(n_gen, 1)
    keep = np.r_[True, (np.diff(fpr) != 0) | (np.diff(tpr) != 0)]
    return AllPairsResult(n_gen, n_imp, result, accuracies, fpr[keep], tpr[keep], fold_thr,
                          kfold_balanced_from_histograms(hist))


def _used_columns(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For per-fold histograms [fold, impostor/genuine, bin]: the non-empty bins (thresholds between empty
    bins change nothing) and the histograms over those only (no copy when every bin is used)."""
    used = np.flatnonzero(hist.sum(axis=(0, 1)))
    return used, hist if len(used) == hist.shape[2] else hist[:, :, used]


def _threshold_counts(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one impostor/genuine histogram [2, bin]: per threshold index t = 0 .. bins (accepting the bins
    >= t) the genuine pairs accepted and the impostor pairs rejected. Taken a fold at a time (and once for
    all folds together), so that no [fold, bin] array is made beyond the histograms."""
    return np.r_[np.cumsum(h[1, ::-1])[::-1], 0], np.r_[0, np.cumsum(h[0])]


def kfold_accuracy_from_histograms(hist: np.ndarray,
                                   bins: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """k-fold accuracy on per-fold score histograms [fold, impostor/genuine, bin]. Threshold index t
    accepts the bins >= t; each fold takes the strictest threshold with the best accuracy on the others.
    Returns the accuracies and each fold's threshold (the lowest score its bin holds). `bins`: the top
    bin (of the 2^20) of each column when the histograms keep only some, in increasing order."""
    n_folds, _, n_bins = hist.shape
    if bins is None:
        bins = np.arange(n_bins)
    else:
        n_bins = _BINS
    used, h = _used_columns(hist)
    correct_all = sum(_threshold_counts(h.sum(0)))
    totals = hist.sum(axis=(1, 2))
    accs, thresholds = [], []
    for f in range(n_folds):
        if totals[f] == 0:
            continue
        correct = sum(_threshold_counts(h[f]))
        train = correct_all - correct
        t = len(train) - 1 - int(np.argmax(train[::-1]))  # the last (strictest) of the best
        accs.append(correct[t] / totals[f])
        bin_ = int(bins[used[t]]) if t < len(used) else n_bins
        thresholds.append(_key_to_float((bin_ - n_bins // 2) << _LOW_BITS) if bin_ < n_bins else math.inf)
    return np.asarray(accs), np.asarray(thresholds)


def kfold_balanced_from_histograms(hist: np.ndarray) -> np.ndarray:
    """k-fold balanced accuracy, (TPR + TNR) / 2, on the same histograms: each fold that holds both kinds
    of pair takes the strictest threshold with the best balanced accuracy on the other folds."""
    _, h = _used_columns(hist)
    gen_ge_all, imp_lt_all = _threshold_counts(h.sum(0))
    n_imp, n_gen = hist[:, 0].sum(axis=1), hist[:, 1].sum(axis=1)
    out = []
    for f in range(hist.shape[0]):
        if n_gen[f] == 0 or n_imp[f] == 0:
            continue
        gen_ge, imp_lt = _threshold_counts(h[f])
        g, i = n_gen.sum() - n_gen[f], n_imp.sum() - n_imp[f]
        train = ((gen_ge_all - gen_ge) / max(g, 1) + (imp_lt_all - imp_lt) / max(i, 1)) / 2
        t = len(train) - 1 - int(np.argmax(train[::-1]))
        out.append((gen_ge[t] / n_gen[f] + imp_lt[t] / n_imp[f]) / 2)
    return np.asarray(out)
