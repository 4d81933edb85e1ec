"""Identification (rank-K, CMC) against a distractor gallery of any size: `chunked_topk` and
`megaface_cmc`, the MegaFace protocol as FaceX-Zoo implements it (and its masked variant).
Pure numbers in, numbers out: no models, no files. Scores are cosines (higher = more alike).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from trainer.eval.common import as_tensor, resolve_device


def _gallery_chunks(gallery, chunk: int) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
    for start in range(0, len(gallery), chunk):
        yield start, gallery[start:start + chunk]


def chunked_topk(
    query,
    gallery,
    k: int,
    *,
    query_labels=None,
    gallery_labels=None,
    chunk: int = 65536,
    query_chunk: int = 4096,
    device=None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest scores of each query against the gallery, and their gallery indices (-1 past the
    gallery's end), best first. The gallery may be a numpy memmap of any length: it is read `chunk` rows
    at a time. With labels, gallery entries that share the query's label are left out (so a set can
    serve as its own distractors)."""
    device = resolve_device(device)
    q_all = as_tensor(query, torch.float32, device)
    ql_all = None if query_labels is None else as_tensor(query_labels, torch.int64, device)
    if (query_labels is None) != (gallery_labels is None):
        raise ValueError("give labels for both query and gallery, or for neither")
    best_s = torch.full((len(q_all), k), -math.inf, device=device)
    best_i = torch.full((len(q_all), k), -1, dtype=torch.int64, device=device)
    n_chunks = math.ceil(len(gallery) / chunk)
    for start, g in tqdm(_gallery_chunks(gallery, chunk), total=n_chunks, desc="gallery", unit="chunk",
                         disable=not progress, leave=False):
        g = as_tensor(g, torch.float32, device)
        if not torch.isfinite(g).all():
            raise ValueError(f"gallery rows {start}..{start + len(g) - 1} hold NaN or inf")
        gl = None
        if gallery_labels is not None:
            gl = as_tensor(gallery_labels[start:start + len(g)], torch.int64, device)
        idx = torch.arange(start, start + len(g), device=device)
        for a in range(0, len(q_all), query_chunk):
            b = min(a + query_chunk, len(q_all))
            scores = q_all[a:b] @ g.T
            if gl is not None:
                scores.masked_fill_(ql_all[a:b, None] == gl[None, :], -math.inf)
            # The chunk's own top k first, then a merge with the best so far: no [Q, k + chunk] copies.
            chunk_s, chunk_pos = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            s = torch.cat([best_s[a:b], chunk_s], dim=1)
            i = torch.cat([best_i[a:b], idx[chunk_pos]], dim=1)
            top_s, pos = torch.topk(s, k, dim=1)
            top_i = torch.gather(i, 1, pos)
            best_s[a:b] = top_s
            best_i[a:b] = torch.where(torch.isinf(top_s), -1, top_i)
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
    chunk: int = 65536,
    device=None,
    progress: bool = True,
) -> CMCResult:
    """MegaFace identification: for every probe p and every mate g of p's identity, the gallery is g plus
    all distractors, and p is identified within rank r when fewer than r distractors score above s(p, g).

    Without `mates` the probe set is its own mate set and a probe is never its own mate (FaceX-Zoo's
    common protocol). The masked protocol gives masked probes, the unmasked images as mates, and
    groups (source photo ids) so that a masked copy is not matched to its own source photo.
    `distractor_labels` (with a probe-set label space) leave a probe's own identity out of its
    distractors, for a set that serves as its own distractors.
    """
    device = resolve_device(device)
    probe_t = as_tensor(probe, torch.float32, device)
    pl = np.asarray(probe_labels, dtype=np.int64)
    same_set = mates is None
    mates_t = probe_t if same_set else as_tensor(mates, torch.float32, device)
    ml = pl if same_set else np.asarray(mate_labels, dtype=np.int64)
    if same_set:
        probe_groups = mate_groups = np.arange(len(pl))
    p_idx, m_idx = mate_pairs(pl, ml, probe_groups, mate_groups)
    genuine = torch.empty(len(p_idx), dtype=torch.float32, device=device)
    step = 1 << 20
    for a in range(0, len(p_idx), step):
        pi = torch.as_tensor(p_idx[a:a + step], device=device)
        mi = torch.as_tensor(m_idx[a:a + step], device=device)
        genuine[a:a + step] = (probe_t[pi] * mates_t[mi]).sum(1)
    top_scores, _ = chunked_topk(probe_t, distractors, max_rank, chunk=chunk, device=device,
                                 progress=progress, query_labels=None if distractor_labels is None else pl,
                                 gallery_labels=distractor_labels)
    rates = cmc_from_topk(genuine.cpu().numpy(), p_idx, top_scores.cpu().numpy())
    return CMCResult(rates, len(p_idx), len(distractors))
