"""Identification (rank-K, CMC) against a distractor gallery of any size: `chunked_topk` and
`megaface_cmc`, the MegaFace protocol as FaceX-Zoo implements it (and its masked variant).
Pure numbers in, numbers out: no models, no files. Scores are cosines (higher = more alike).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from trainer.eval.common import narrow_ints, resolve_device
from trainer.eval.rowfile import take_rows


def _labels(x) -> Optional[np.ndarray]:
    if x is None:
        return None
    return narrow_ints(x)


def _read(src, rows: Optional[np.ndarray], a: int, b: int, device: torch.device) -> torch.Tensor:
    return take_rows(src, np.arange(a, b) if rows is None else rows[a:b], device)


def chunked_topk(
    query,
    gallery,
    k: int,
    *,
    query_labels=None,
    gallery_labels=None,
    chunk: int = 16384,
    query_chunk: int = 4096,
    device=None,
    progress: bool = True,
    query_rows=None,
    gallery_rows=None,
    indices: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The k highest scores of each query against the gallery, and their gallery indices (-1 past the
    gallery's end; None without `indices`), best first. Query and gallery may be numpy memmaps of any
    length: they are read `query_chunk` and `chunk` rows at a time, and a memmap's pages let go after
    each read (trainer/eval/rowfile.py). `*_rows`: the rows that take part (labels per row taken, indices
    into them). With labels, gallery entries that share the query's label are left out (so a set can
    serve as its own distractors)."""
    device = resolve_device(device)
    if (query_labels is None) != (gallery_labels is None):
        raise ValueError("give labels for both query and gallery, or for neither")
    query_rows, gallery_rows = _labels(query_rows), _labels(gallery_rows)
    nq = len(query) if query_rows is None else len(query_rows)
    ng = len(gallery) if gallery_rows is None else len(gallery_rows)
    ql_all = None if query_labels is None else torch.as_tensor(_labels(query_labels), device=device)
    gl_all = None if gallery_labels is None else _labels(gallery_labels)
    best_s = torch.full((nq, k), -math.inf, device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.int64, device=device) if indices else None
    n_chunks = math.ceil(nq / query_chunk) * math.ceil(ng / chunk)
    bar = tqdm(total=n_chunks, desc="gallery", unit="chunk", disable=not progress, leave=False)
    for a in range(0, nq, query_chunk):
        b = min(a + query_chunk, nq)
        q = _read(query, query_rows, a, b, device)
        for start in range(0, ng, chunk):
            g = _read(gallery, gallery_rows, start, min(start + chunk, ng), device)
            if not torch.isfinite(g).all():
                raise ValueError(f"gallery rows {start}..{start + len(g) - 1} hold NaN or inf")
            scores = q @ g.T
            if gl_all is not None:
                gl = torch.as_tensor(gl_all[start:start + len(g)], device=device)
                scores.masked_fill_(ql_all[a:b, None] == gl[None, :], -math.inf)
            # The chunk's own top k first, then a merge with the best so far: no [Q, k + chunk] copies.
            chunk_s, chunk_pos = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            top_s, pos = torch.topk(torch.cat([best_s[a:b], chunk_s], dim=1), k, dim=1)
            best_s[a:b] = top_s
            if indices:
                idx = torch.arange(start, start + len(g), device=device)
                top_i = torch.gather(torch.cat([best_i[a:b], idx[chunk_pos]], dim=1), 1, pos)
                best_i[a:b] = torch.where(torch.isinf(top_s), -1, top_i)
            bar.update()
    bar.close()
    return best_s, best_i


@dataclass
class CMCResult:
    rates: np.ndarray  # rates[r - 1] = share of genuine (probe, mate) pairs found within rank r
    n_pairs: int
    n_distractors: int

    def rank(self, r: int) -> float:
        return float(self.rates[r - 1])


def mate_pairs(probe_labels: np.ndarray, mate_labels: np.ndarray, probe_groups: Optional[np.ndarray] = None,
               mate_groups: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Every (probe index, mate index) with the same label and not the same group (a photo is never its
    own mate)."""
    probe_labels = np.asarray(probe_labels)
    mate_labels = np.asarray(mate_labels)
    order = np.argsort(mate_labels, kind="stable")
    sorted_labels = mate_labels[order]
    lo = np.searchsorted(sorted_labels, probe_labels, side="left")
    hi = np.searchsorted(sorted_labels, probe_labels, side="right")
    counts = hi - lo
    p = np.repeat(np.arange(len(probe_labels)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    m = order[np.repeat(lo, counts) + offsets]
    if probe_groups is not None:
        pg, mg = np.asarray(probe_groups)[p], np.asarray(mate_groups)[m]
        keep = ~((pg == mg) & (pg >= 0))
        p, m = p[keep], m[keep]
    return p, m


def cmc_from_topk(genuine_scores: np.ndarray, probe_index: np.ndarray, top_scores: np.ndarray) -> np.ndarray:
    """CMC rates 1..k: a pair is found at rank r when its genuine score is at least the probe's r-th best
    distractor score (ties go to the genuine, as FaceX-Zoo's MegaFace evaluator)."""
    k = top_scores.shape[1]
    if len(genuine_scores) == 0:
        return np.full(k, np.nan)
    tops = top_scores[probe_index]  # [pairs, k], descending
    beaten_by = np.sum(tops > genuine_scores[:, None], axis=1)  # distractors strictly above
    rank = beaten_by + 1  # rank k+1 means "beyond k"
    return np.array([np.mean(rank <= r) for r in range(1, k + 1)])


def _genuine_rank_counts(probe, pl, p_rows, mates, ml, m_rows, pg, mg, top: np.ndarray,
                         device: torch.device, budget: int = 8192) -> np.ndarray:
    """counts[b]: genuine (probe, mate) pairs (same label, not the same non-negative group) with b
    distractors of the probe's top k strictly above them (b = k: beyond rank k). Probes and mates are
    taken in label order, a block of probes with at most about `budget` mates at a time: no per-pair
    arrays."""
    k = top.shape[1]
    ps, ms = narrow_ints(np.argsort(pl, kind="stable")), narrow_ints(np.argsort(ml, kind="stable"))
    mls, pls = ml[ms], pl[ps]
    lo, hi = narrow_ints(np.searchsorted(mls, pls, "left")), narrow_ints(np.searchsorted(mls, pls, "right"))
    del mls, pls
    counts = np.zeros(k + 1, np.int64)
    a = 0
    while a < len(ps):
        b = int(np.clip(np.searchsorted(hi, lo[a] + budget, "right"), a + 1, a + 4096))
        c, d = int(lo[a]), int(hi[b - 1])
        a_pos, m_pos = ps[a:b], ms[c:d]
        if d > c:
            scores = (_rows(probe, p_rows, a_pos, device) @ _rows(mates, m_rows, m_pos, device).T).cpu().numpy()
            pair = pl[a_pos][:, None] == ml[m_pos][None, :]
            if pg is not None:
                same = pg[a_pos][:, None] == mg[m_pos][None, :]
                pair &= ~(same & (pg[a_pos] >= 0)[:, None])
            row, col = np.nonzero(pair)
            beaten = np.sum(top[a_pos][row] > scores[row, col][:, None], axis=1)
            counts += np.bincount(beaten, minlength=k + 1)
        a = b
    return counts


def _rows(src, rows: Optional[np.ndarray], pos: np.ndarray, device: torch.device) -> torch.Tensor:
    return take_rows(src, pos if rows is None else rows[pos], device)


def megaface_cmc(
    probe,
    probe_labels,
    distractors,
    *,
    mates=None,
    mate_labels=None,
    probe_groups=None,
    mate_groups=None,
    max_rank: int = 10,
    distractor_labels=None,
    chunk: int = 16384,
    device=None,
    progress: bool = True,
    probe_rows=None,
    mate_rows=None,
    distractor_rows=None,
) -> CMCResult:
    """MegaFace identification: for every probe p and every mate g of p's identity, the gallery is g plus
    all distractors, and p is identified within rank r when fewer than r distractors score above s(p, g).

    Without `mates` the probe set is its own mate set and a probe is never its own mate (FaceX-Zoo's
    common protocol). The masked protocol gives masked probes, the unmasked images as mates, and
    groups (source photo ids) so that a masked copy is not matched to its own source photo.
    `distractor_labels` (with a probe-set label space) leave a probe's own identity out of its
    distractors, for a set that serves as its own distractors. `*_rows` pick the rows of the arrays that
    take part (labels and groups per row taken); the arrays may be file-backed memmaps of any size: in
    RAM are the top `max_rank` distractor scores of each probe and a block of rows at a time.
    """
    device = resolve_device(device)
    pl = _labels(probe_labels)
    same_set = mates is None
    if same_set:
        mates, ml, m_rows = probe, pl, _labels(probe_rows)
        probe_groups = mate_groups = np.arange(len(pl))
    else:
        ml, m_rows = _labels(mate_labels), _labels(mate_rows)
    top, _ = chunked_topk(probe, distractors, max_rank, chunk=chunk, device=device, progress=progress,
                          query_labels=None if distractor_labels is None else pl,
                          gallery_labels=distractor_labels, query_rows=probe_rows,
                          gallery_rows=distractor_rows, indices=False)
    counts = _genuine_rank_counts(probe, pl, _labels(probe_rows), mates, ml, m_rows, _labels(probe_groups),
                                  _labels(mate_groups), top.cpu().numpy(), device)
    n_pairs = int(counts.sum())
    rates = np.cumsum(counts)[:max_rank] / n_pairs if n_pairs else np.full(max_rank, np.nan)
    n_distractors = len(distractors) if distractor_rows is None else len(distractor_rows)
    return CMCResult(rates, n_pairs, n_distractors)
