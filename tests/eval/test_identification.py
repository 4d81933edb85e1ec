"""trainer.eval.identification (rank-K CMC, MegaFace) against hand-computed cases and full top-k."""
from __future__ import annotations

import math

import numpy as np
import torch

from trainer.eval import identification as ident

# -------------------------------------------------------------------------------------- identification

def test_chunked_topk_equals_full_topk_on_a_memmap(tmp_path):
    rng = np.random.default_rng(5)
    query = rng.normal(size=(13, 8)).astype(np.float32)
    gallery = rng.normal(size=(101, 8)).astype(np.float32)
    np.save(tmp_path / "g.npy", gallery)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    ql, gl = rng.integers(0, 4, 13), rng.integers(0, 4, 101)
    s, i = ident.chunked_topk(query, mm, 6, query_labels=ql, gallery_labels=gl, chunk=7, query_chunk=5,
                          device="cpu", progress=False)
    full = torch.from_numpy(query @ gallery.T)
    full[torch.from_numpy(ql[:, None] == gl[None, :])] = -math.inf
    ref_s, ref_i = torch.topk(full, 6, dim=1)
    assert torch.allclose(s, ref_s)
    assert torch.equal(i, ref_i)


def test_chunked_topk_pads_a_small_gallery():
    eye = np.eye(2, dtype=np.float32)
    s, i = ident.chunked_topk(eye, eye, 3, device="cpu", progress=False)
    assert s[:, 2].tolist() == [-math.inf, -math.inf]
    assert i[:, 2].tolist() == [-1, -1]
    assert i[:, 0].tolist() == [0, 1]


_PROBES = np.array([[1, 0], [0.5, 0.5], [0, 1], [0.25, 0.75]], np.float32)
_PROBE_IDS = np.array([0, 0, 1, 1])
_DISTRACTORS = np.array([[0.75, 0], [0, 0.5], [0.25, 0.25]], np.float32)


def test_megaface_cmc_hand_computed():
    # Ordered mate pairs (probe, mate): (0,1) 0.5, (1,0) 0.5, (2,3) 0.75, (3,2) 0.75.
    # Distractor scores: probe 0 [.75, .25, 0], 1 [.375, .25, .25], 2 [.5, .25, 0], 3 [.375, .25, .1875].
    # Only (0,1) has a distractor above it (0.75): rank 2; the others are rank 1.
    r = ident.megaface_cmc(_PROBES, _PROBE_IDS, _DISTRACTORS, max_rank=3, chunk=2, device="cpu",
                           progress=False)
    assert r.n_pairs == 4 and r.n_distractors == 3
    assert np.allclose(r.rates, [0.75, 1.0, 1.0])
    assert r.rank(1) == 0.75


def test_megaface_cmc_ties_go_to_the_mate():
    # A distractor scoring exactly the mate's 0.5 for probe 1 (and probe 0) does not push either down.
    distractors = np.vstack([_DISTRACTORS, [[0.5, 0.5]]]).astype(np.float32)
    r = ident.megaface_cmc(_PROBES, _PROBE_IDS, distractors, max_rank=2, device="cpu", progress=False)
    assert np.allclose(r.rates, [0.75, 1.0])


def test_megaface_cmc_masked_probes_skip_their_own_source():
    masked = np.array([[1, 0], [0, 1]], np.float32)  # copies of gallery photos 10 and 20
    masked_ids, masked_src = np.array([0, 1]), np.array([10, 20])
    gallery = np.array([[1, 0], [0.6, 0.8], [0, 1], [0.8, 0.6]], np.float32)
    gallery_ids, gallery_photo = np.array([0, 0, 1, 1]), np.array([10, 11, 20, 21])
    distractors = np.array([[0.7, 0.0], [0.0, 0.7]], np.float32)
    # Mate pairs: (masked 0, photo 11) 0.6 and (masked 1, photo 21) 0.6: the identical photos 10 and 20
    # (score 1.0) are left out. Distractors: masked 0 scores 0.7 and 0, masked 1 scores 0 and 0.7: one
    # distractor above each mate.
    r = ident.megaface_cmc(masked, masked_ids, distractors, mates=gallery, mate_labels=gallery_ids,
                       probe_groups=masked_src, mate_groups=gallery_photo, max_rank=2, device="cpu",
                       progress=False)
    assert r.n_pairs == 2
    assert np.allclose(r.rates, [0.0, 1.0])


def test_megaface_cmc_set_as_its_own_distractors():
    # With distractor labels, a probe's own identity is not among its distractors: a perfectly clustered
    # set is then identified at rank 1.
    emb = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    ids = np.array([0, 0, 1, 1])
    r = ident.megaface_cmc(emb, ids, emb, distractor_labels=ids, max_rank=1, device="cpu", progress=False)
    assert r.rates.tolist() == [1.0]


def test_mate_pairs():
    p, m = ident.mate_pairs(np.array([0, 1, 0]), np.array([1, 0, 0, 2]))
    assert sorted(zip(p.tolist(), m.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 1), (2, 2)]
