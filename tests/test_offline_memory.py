"""Issue N: per-image state of the readers and of maskgen's masking is arrays or streamed, never a Python
object per image for a whole epoch or run (the memory figures themselves: bench/pack_scale.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from maskgen import workers
from pipeline.augment import normalise
from pipeline.dataset import TorchTrainLoader


def test_batched_map_reads_its_items_as_the_work_goes(monkeypatch):
    read = []

    def items():
        for k in range(100):
            read.append(k)
            yield k

    with workers.batched_map(lambda batch: [x * 2 for x in batch], items(), None) as results:
        first = next(results)
        assert first == (0, 0) and len(read) <= 2 * workers.MASK_BATCH
        rest = list(results)
    assert [first] + rest == [(k, 2 * k) for k in range(100)]


@pytest.mark.usefixtures("one_torch_thread")
def test_the_torch_reader_deals_an_epoch_from_an_array(packed_glint):
    loader = TorchTrainLoader(packed_glint, batch_size=16, num_workers=0, seed=3)
    indices = loader._rank_indices()
    assert isinstance(indices, np.ndarray) and indices.dtype == np.int64
    g = torch.Generator().manual_seed(3 * 1_000_003)
    assert indices.tolist() == torch.randperm(loader.num_samples, generator=g).tolist()[:len(indices)]
    loader._sampler.indices, loader._sampler.epoch = indices, 5
    pairs = iter(loader._sampler)
    assert not isinstance(pairs, (list, type(iter([]))))  # made as the DataLoader asks, not a list up front
    assert list(pairs) == [(int(i), 5) for i in indices]


def test_normalise_is_the_formula_and_leaves_a_float_input_alone():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(normalise(x), (x.float() - 127.5) / 127.5)
    f = x.float()
    before = f.clone()
    assert torch.equal(normalise(f), (before - 127.5) / 127.5) and torch.equal(f, before)


def test_the_mmap_threshold_is_fixed_where_the_c_library_is_glibc():
    import platform

    from pipeline.malloc_limits import fix_mmap_threshold

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert fix_mmap_threshold() is True


def _mapped_kib(path) -> int:
    """This process's resident pages of the mappings of `path` (KiB)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if not first.endswith(":"):
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def _largest_shard(data):
    from pipeline.manifest import load_manifest

    shard = max(load_manifest(data)["shards"], key=lambda s: s["bytes"])
    return data / shard["rec"], shard


def test_random_reads_leave_no_shard_mapped_whole(packed_glint, monkeypatch):
    """Issue N: pages read from a mapped shard stay in the reader's RSS (and a read maps the page cache's
    whole folio around it, up to 2 MB) until dropped; over 40 shards of 1 GB an epoch would count them all."""
    import pipeline.dataset as dataset

    monkeypatch.setattr(dataset, "RELEASE_READS", 2, raising=False)
    ds = dataset.PackedDataset(packed_glint, raw=True)
    rec, shard = _largest_shard(packed_glint)
    first = ds._starts[[s["rec"] for s in ds.shards].index(shard["rec"])]
    assert shard["bytes"] > 768 * 1024
    peak = 0
    for i in range(first, first + shard["count"]):
        ds.read_record(i)
        peak = max(peak, _mapped_kib(rec))
    assert peak <= 384, f"{peak} KiB of a {shard['bytes'] >> 10} KiB shard stayed mapped"


def test_verify_keeps_at_most_a_window_of_a_shard_mapped(packed_glint, monkeypatch):
    import pipeline.recordio as recordio
    import pipeline.verify as verify

    monkeypatch.setattr(recordio, "RELEASE_BYTES", 64 * 1024, raising=False)
    monkeypatch.setattr(verify, "RELEASE_BYTES", 64 * 1024, raising=False)
    rec, shard = _largest_shard(packed_glint)
    peak = []
    real = verify.read_frame

    def watched(buf, pos):
        if pos and len(buf) == shard["bytes"]:
            peak.append(_mapped_kib(rec))
        return real(buf, pos)

    monkeypatch.setattr(verify, "read_frame", watched)
    verify.verify(packed_glint, progress=False)
    assert peak and max(peak) <= 256, f"{max(peak)} KiB of a {shard['bytes'] >> 10} KiB shard stayed mapped"


def test_pack_starts_its_workers_before_the_plan(glint24, tmp_path, monkeypatch):
    """Issue N: workers forked after the plan inherit it and the heap the enumeration freed, and copy it page
    by page as they allocate (~40 bytes an image each, measured); forked first, they hold neither."""
    import multiprocessing as mp

    import pipeline.pack as pack
    from pipeline.pack_plan import PackOptions

    children_at_plan = []
    real = pack.plan_pack

    def watched(opts):
        children_at_plan.append(len(mp.active_children()))
        return real(opts)

    monkeypatch.setattr(pack, "plan_pack", watched)
    m = pack.pack(PackOptions(sources=[str(glint24)], out=tmp_path / "out", workers=2, progress=False))
    assert m["num_images"] > 0
    assert children_at_plan == [2]


def test_maskgen_starts_its_workers_before_the_scan(packed_glint, tmp_path, monkeypatch):
    """Issue N, as for pack: workers forked after the scan inherit its arrays and freed heap."""
    import multiprocessing as mp
    import shutil

    from maskgen import build

    data = tmp_path / "data"
    shutil.copytree(packed_glint, data)
    children_at_scan = []
    real = build.scan_sources

    def watched(*args, **kw):
        children_at_scan.append(len(mp.active_children()))
        return real(*args, **kw)

    monkeypatch.setattr(build, "scan_sources", watched)
    m = build.build(build.BuildOptions(data=data, ratio=0.02, workers=2, progress=False))
    assert any(s["kind"] == build.MASKED_KIND for s in m["shards"])
    assert children_at_scan == [2]
