"""Issue N: embedding and scoring a packed set of any size in memory that does not grow by 2 KB an image.
The rows go to a file-backed array and are read back a tile at a time; the results are those of the same
computation on an array in RAM. tracemalloc sees numpy's allocations (not a memmap's file pages)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from trainer.eval.embedding import embed_dataset, embed_images
from trainer.eval.packed import PackedSetInfo, evaluate_packed
from trainer.eval.rowfile import release, row_file
from trainer.eval.tar_far import _PairTiles, all_pairs_verification

DIM = 512
N = 4000
ROW_BYTES = DIM * 4


class _MeanColour(nn.Module):
    """A tiny model with 512-d outputs: the image's mean colour through a fixed linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, DIM)
        torch.manual_seed(0)
        nn.init.normal_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class _Items(Dataset):
    """(crop, identity, ok) per index: every 7th item did not decode."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        crop = np.empty((112, 112, 3), np.uint8)
        crop[...] = (i % 251, (7 * i) % 253, (13 * i) % 255)
        return crop, i // 5, i % 7 != 3


def _peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_embed_dataset_writes_rows_to_a_file_and_keeps_only_the_decoded_ones():
    model = _MeanColour()
    (emb, (identity, ok)), peak = _peak(lambda: embed_dataset(model, _Items(), "cpu", batch_size=16,
                                                              workers=0, progress=False,
                                                              keep=lambda c: c[-1]))
    # In RAM before: every row twice (np.concatenate, l2_normalize), 14 MB here; now a batch and the
    # loader's own (about 2 MB, whatever N).
    assert peak < N * ROW_BYTES / 2, peak
    assert isinstance(emb, np.memmap) and emb.dtype == np.float32
    assert identity.tolist() == [i // 5 for i in range(N)] and ok.sum() == len(emb) < N
    items = _Items()
    kept = np.stack([items[i][0] for i in range(N) if ok[i]])
    ref = embed_images(model, kept, "cpu", batch_size=16).embeddings
    assert np.allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)


def _set(n: int, per_id: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) // per_id)
    centres = rng.standard_normal((n // per_id + 1, DIM)).astype(np.float32)
    x = centres[labels] + 1.2 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def _mapped_row_file_bytes() -> int:
    """Resident bytes of this process's mappings of row files (file pages count in RSS and PSS)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line
                inside = "/embeddings." in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_pair_tiles_read_a_file_backed_array_a_tile_at_a_time():
    x, labels = _set(N)
    rows = row_file(N, DIM)
    rows[:] = x
    del x
    release(rows)
    assert _mapped_row_file_bytes() == 0
    tiles = _PairTiles(rows, labels, None, None, None, None, 256, torch.device("cpu"))
    _, peak = _peak(lambda: sum(1 for _ in tiles))
    # The embeddings whole (8 MB) are never in RAM, nor left mapped: a tile of rows is 0.5 MB.
    assert peak < N * ROW_BYTES / 4, peak
    assert _mapped_row_file_bytes() < 256 * ROW_BYTES, _mapped_row_file_bytes()


def _same(a, b) -> None:
    assert (a.n_genuine, a.n_impostor) == (b.n_genuine, b.n_impostor)
    assert {f: (r.tar, r.threshold) for f, r in a.tar_at_far.items()} == \
        {f: (r.tar, r.threshold) for f, r in b.tar_at_far.items()}
    assert np.array_equal(a.accuracies, b.accuracies) and np.array_equal(a.roc_tpr, b.roc_tpr)
    assert np.array_equal(a.balanced_accuracies, b.balanced_accuracies)


def test_scores_from_a_file_and_from_picked_rows_equal_those_in_ram():
    n = 1500
    x, labels = _set(n, seed=1)
    rows = row_file(n, DIM)
    rows[:] = x
    kw = dict(fars=(1e-4, 1e-3, 1e-2), tile=256, device="cpu", progress=False)
    _same(all_pairs_verification(rows, labels, **kw), all_pairs_verification(torch.from_numpy(x), labels, **kw))
    pick = np.flatnonzero(np.arange(n) % 3 != 0)
    probe = np.flatnonzero(np.arange(n) % 3 == 0)
    groups = np.arange(n) // 2
    _same(all_pairs_verification(rows, labels[pick], probe_rows=pick, **kw),
          all_pairs_verification(x[pick], labels[pick], **kw))
    _same(all_pairs_verification(rows, labels[probe], rows, labels[pick], probe_rows=probe, gallery_rows=pick,
                                 probe_groups=groups[probe], gallery_groups=groups[pick], **kw),
          all_pairs_verification(x[probe], labels[probe], x[pick], labels[pick], probe_groups=groups[probe],
                                 gallery_groups=groups[pick], **kw))


def test_evaluate_packed_on_a_file_equals_in_ram():
    n = 900
    x, labels = _set(n, seed=2)
    rows = row_file(n, DIM)
    rows[:] = x
    masked = np.arange(n) % 4 == 0
    info = PackedSetInfo(labels, masked, np.where(masked, 1 + (np.arange(n) // 4) % 2, 0), np.arange(n),
                         np.where(masked, np.arange(n) - 1, 0), 0, {1: "surgical"})
    args = ((1e-3, 1e-2), 128, torch.device("cpu"), True, 5, None, False)  # with --cmc
    on_file, _ = evaluate_packed(rows, info, True, *args)
    in_ram, _ = evaluate_packed(np.array(x), info, True, *args)
    assert on_file == in_ram and set(on_file) == {"unmasked", "masked", "masked/surgical", "masked/mask_type=2"}


def test_pass_one_counts_in_int32_and_empties_them_before_they_could_wrap(monkeypatch):
    from trainer.eval import tar_far

    hist = tar_far._FoldHistogram(10, torch.device("cpu"))
    # The bins a cosine can fall in (|score| <= 2), in int32: 20 MB at 10 folds, not 80.
    assert hist.dense.dtype == torch.int32 and hist.dense.numel() == 10 * ((1 << 19) + 1) + 1
    x, labels = _set(600, seed=3)
    kw = dict(fars=(1e-3, 1e-2, 1e-1), tile=64, device="cpu", progress=False)
    ref = all_pairs_verification(x, labels, **kw)
    flushes = []
    flush = tar_far._FoldHistogram.flush
    monkeypatch.setattr(tar_far._FoldHistogram, "flush", lambda self: (flushes.append(self.since), flush(self)))
    monkeypatch.setattr(tar_far, "_FLUSH_AT", 64 * 64 * 3)  # emptied every third tile
    res = all_pairs_verification(x, labels, **kw)
    assert len(flushes) > 10 and max(flushes) <= 64 * 64 * 3
    _same(res, ref)
    assert np.array_equal(res.fold_thresholds, ref.fold_thresholds) and np.array_equal(res.roc_fpr, ref.roc_fpr)


def test_scoring_keeps_no_array_over_every_top_bin():
    x, labels = _set(400, seed=4)
    _, peak = _peak(lambda: all_pairs_verification(x, labels, tile=128, device="cpu", progress=False))
    # Before (67 MB here): the folds' sum, the ROC's cumulative counts and rates, each over all 2^20 top
    # bins (8 MB apiece), the k-fold histograms twice and their [fold, bin] cumulative counts; now (7 MB)
    # the histograms over the bins some pair falls in, and a fold's counts at a time.
    assert peak < 12 << 20, peak


def test_per_image_columns_are_int32_where_they_fit():
    from trainer.eval.common import narrow_ints
    from trainer.eval.embedding import _store

    big = np.array([1, 1 << 40])
    assert narrow_ints(np.array([-3, 5])).dtype == np.int32 and narrow_ints(big).dtype == np.int64
    assert np.array_equal(narrow_ints(big), big)
    # embed_dataset's columns: int32 until a batch brings a value past 2^31, then int64 (values kept).
    cols = _store([], [np.array([1, 2]), np.array([True, False])], 0, 4)
    assert cols[0].dtype == np.int32 and cols[1].dtype == bool
    cols = _store(cols, [big, np.array([True, True])], 2, 4)
    assert cols[0].dtype == np.int64 and cols[0].tolist() == [1, 2, 1, 1 << 40]
    # Labels, groups and row orders are not widened to int64 on their way into the tiles.
    x, labels = _set(300, seed=5)
    tiles = _PairTiles(x, labels.astype(np.int32), None, None, np.arange(300, dtype=np.int32), None, 64,
                       torch.device("cpu"), probe_rows=np.arange(300, dtype=np.int32))
    assert tiles.pl.dtype == tiles.pg.dtype == torch.int32 and tiles.p_rows.dtype == np.int32
    tiles = _PairTiles(x, labels, None, None, None, None, 64, torch.device("cpu"))
    assert tiles.pl.dtype == torch.int32 and tiles.p_rows.dtype == np.int32


def test_evaluate_packed_with_int32_columns_equals_int64():
    n = 600
    x, labels = _set(n, seed=6)
    masked = np.arange(n) % 3 == 0

    def info(dtype):
        return PackedSetInfo(labels.astype(dtype), masked, np.where(masked, 1, 0).astype(dtype),
                             np.arange(n, dtype=dtype), np.where(masked, np.arange(n) - 1, 0).astype(dtype), 0, {})
    args = ((1e-3, 1e-2), 128, torch.device("cpu"), True, 5, None, False)
    assert evaluate_packed(x, info(np.int32), True, *args)[0] == evaluate_packed(x, info(np.int64), True, *args)[0]


def test_npz_written_and_read_a_block_at_a_time(tmp_path, monkeypatch):
    from pipeline.manifest import sha256_file
    from trainer.eval import folder
    from trainer.eval.common import l2_normalize
    from trainer.eval.folder import load_npz, save_npz
    from trainer.eval.packed import load_distractors

    n = 4000
    x, labels = _set(n, seed=7)
    rows = row_file(n, DIM)
    rows[:] = 3 * x
    release(rows)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    extra = dict(paths=np.array([f"p/{i}.jpg" for i in range(n)]), labels=labels, flag=np.array(True),
                 checkpoint_sha256=np.array(sha256_file(ckpt)), normalized=np.array(False))
    out = tmp_path / "e.npz"
    monkeypatch.setattr(folder, "_WRITE_ROWS", 512, raising=False)  # 1 MB blocks here (16 MB in use)
    _, peak = _peak(lambda: save_npz(out, embeddings=rows, **extra))
    # Before: the whole file in a BytesIO and its getvalue() copy (16 MB here); now a block of rows.
    assert peak < n * ROW_BYTES / 4, peak
    with np.load(out) as z:  # what np.savez would have written
        assert np.array_equal(z["embeddings"], 3 * x) and z["paths"].tolist() == extra["paths"].tolist()
        assert np.array_equal(z["labels"], labels) and bool(z["flag"]) and z["flag"].shape == ()
    data, peak = _peak(lambda: load_npz(out, map_embeddings=True))  # (the checkpoint check reads 4 MB blocks)
    assert isinstance(data["embeddings"], np.memmap) and np.array_equal(data["embeddings"], 3 * x)
    assert peak < n * ROW_BYTES / 4, peak
    unit = load_distractors(out, None, ckpt, torch.device("cpu"))
    assert isinstance(unit, np.memmap) and np.allclose(unit, l2_normalize(3 * x), atol=1e-6)
    # A compressed file (not from save_npz) cannot be mapped: it is read whole, as before.
    np.savez_compressed(tmp_path / "c.npz", embeddings=x)
    assert not isinstance(load_npz(tmp_path / "c.npz", map_embeddings=True)["embeddings"], np.memmap)
    np.savez(tmp_path / "s.npz", embeddings=x)
    assert np.array_equal(load_npz(tmp_path / "s.npz", map_embeddings=True)["embeddings"], x)


def test_probe_and_gallery_labels_of_different_widths():
    x, labels = _set(500, seed=8)
    big = labels.astype(np.int64) + (1 << 40)  # past int32: stays int64
    kw = dict(fars=(1e-2, 1e-1), tile=64, device="cpu", progress=False)
    _same(all_pairs_verification(x[:200], (labels[:200] + (1 << 40)).astype(np.int64), x[200:], big[200:], **kw),
          all_pairs_verification(x[:200], labels[:200].astype(np.int16), x[200:], labels[200:], **kw))


def test_scores_past_the_dense_window_are_counted_too(monkeypatch):
    from trainer.eval import tar_far

    x, labels = _set(400, seed=9)
    kw = dict(fars=(1e-3, 1e-2, 1e-1), tile=64, device="cpu", progress=False)
    for emb in (x, 3 * x):  # cosines, and raw scores up to 9 (past the window of |score| <= 2)
        monkeypatch.setattr(tar_far, "_WINDOW", 1 << 19)  # every top bin dense
        ref = all_pairs_verification(emb, labels, **kw)
        for window in (1 << 18, 1 << 8):  # the default; and one where most scores fall outside
            monkeypatch.setattr(tar_far, "_WINDOW", window)
            res = all_pairs_verification(emb, labels, **kw)
            _same(res, ref)
            assert np.array_equal(res.fold_thresholds, ref.fold_thresholds)
            assert np.array_equal(res.roc_fpr, ref.roc_fpr)


def test_scattered_rows_never_map_much_of_the_file_at_once(monkeypatch):
    """Issue N: each scattered row read through the map maps the page cache's folio around it (up to 2 MB,
    64 KB with small pages): a tile of 2048 rows gathered at once mapped most of a 200 MB file."""
    import trainer.eval.rowfile as rowfile

    n, dim = 20_000, 512  # 40 MB
    rows = row_file(n, dim)
    for a in range(0, n, 2000):
        rows[a:a + 2000] = 1.0
        release(rows)
    seen, real = [], rowfile.release

    def watched(x):
        seen.append(_mapped_row_file_bytes())
        real(x)

    monkeypatch.setattr(rowfile, "release", watched)
    index = np.random.default_rng(0).permutation(n)[:512]
    out = rowfile.take_rows(rows, index)
    assert torch.equal(out, torch.ones(512, dim))
    assert max(seen) <= 16 * 2**20 + 8 * 64 * 1024, max(seen)


def test_eval_fixes_the_mmap_threshold_before_scoring(tmp_path, monkeypatch):
    """Issue N: score tiles of 16-32 MB made and freed thousands of times came from a heap that grew with
    the number of tiles under glibc's sliding mmap threshold (235 MiB of heap at 10^5 images, 104 after)."""
    import trainer.eval.__main__ as cli

    calls = []
    monkeypatch.setattr(cli, "fix_mmap_threshold", lambda *a: calls.append(a) or True, raising=False)
    code = cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--pairs", str(tmp_path / "none.bin"),
                     "--no-progress"])
    assert code == 2 and calls == [()]


def test_genuine_pairs_are_binned_a_slice_at_a_time(monkeypatch):
    """Issue N: after pass 1 the genuine pairs' bins, columns and flat indices (~28 bytes a pair) were made
    for up to 2^22 pairs at once: 50 MB here, ~270 bytes an image at 10 genuine pairs an image."""
    import trainer.eval.tar_far as tar_far

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), 300)  # 1.8M genuine pairs
    x = rng.standard_normal((len(labels), 16)).astype(np.float32) + labels[:, None] * 0.05
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    whole = all_pairs_verification(x, labels, progress=False)
    tracemalloc.start()
    try:
        sliced = all_pairs_verification(x, labels, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, peak  # 61 MB before: the genuine keys, the [fold, kind, bin] counts, and a slice
    monkeypatch.setattr(tar_far, "GENUINE_SLICE", 1000, raising=False)
    small = all_pairs_verification(x, labels, progress=False)
    for res in (sliced, small):
        assert res.accuracies.tolist() == whole.accuracies.tolist()
        assert {f: r.tar for f, r in res.tar_at_far.items()} == {f: r.tar for f, r in whole.tar_at_far.items()}
