"""The DALI reader's options from the config reach its pipeline (built on the CPU here): its thread count,
the hardware-decoder share, plain reads instead of mmap; and on the GPU a batch is run on torch's current
CUDA stream instead of synchronising with the host."""
from __future__ import annotations

import pytest
import torch

from pipeline.loader import build_train_loader, dali_available
from trainer.config import base_config

pytestmark = pytest.mark.skipif(not dali_available(), reason="no DALI")
MMAP_OFF = b"\rdont_use_mmap\x12\x04bool0\x01"  # the reader's argument, True, in the serialised graph


def test_options_reach_the_pipeline(packed_glint):
    tuned = build_train_loader(packed_glint, batch_size=8, backend="dali", num_threads=1, seed=4,
                               dali_threads=3, dali_hw_decoder_load=0.9, dali_dont_use_mmap=True)
    assert tuned._pipe.num_threads == 3 and tuned.hw_decoder_load == 0.9
    assert MMAP_OFF in tuned._pipe.serialize()
    plain = build_train_loader(packed_glint, batch_size=8, backend="dali", num_threads=1, seed=4)
    assert plain._pipe.num_threads == 1 and MMAP_OFF not in plain._pipe.serialize()  # 0: num_threads
    for (ti, tl), (pi, pl) in zip(list(tuned)[:3], list(plain)[:3]):  # reads, not maps: the same batches
        assert torch.equal(tl, pl) and torch.equal(ti, pi)


def test_gpu_batches_run_on_torchs_current_stream(packed_glint, monkeypatch):
    loader = build_train_loader(packed_glint, batch_size=8, backend="dali", num_threads=1)
    calls = []

    class Pipe:
        def run(self, *args):
            calls.append(args)
            return "images", "labels"

    loader._pipe = Pipe()
    assert loader._run() == ("images", "labels") and calls == [()]  # CPU: no stream
    stream = object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    loader.device = torch.device("cuda", 0)
    loader._run()
    assert calls[-1] == (stream,)


def test_config_keys():
    cfg = base_config()
    assert (cfg.dali_threads, cfg.dali_hw_decoder_load, cfg.dali_dont_use_mmap) == (4, 0.65, False)
