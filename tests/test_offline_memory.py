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

    with workers.batched_map(lambda batch: [x * 2 for x in batch], items(), 1, lambda: None, ()) as results:
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
