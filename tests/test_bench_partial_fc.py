"""bench/partial_fc.py reduces its timings and memory peaks on the process group's device: NCCL takes CUDA
tensors only (a CPU tensor raises "No backend type associated with device type cpu" at the first CUDA step),
gloo CPU ones."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bench import partial_fc as bench_pfc


def test_reduce_device_follows_the_backend():
    cuda1 = torch.device("cuda", 1)
    assert bench_pfc.reduce_device("nccl", cuda1) == cuda1
    assert bench_pfc.reduce_device("gloo", cuda1) == torch.device("cpu")
    assert bench_pfc.reduce_device("gloo", torch.device("cpu")) == torch.device("cpu")


class _Reached(Exception):
    pass


def test_max_over_ranks_hands_nccl_a_tensor_on_the_device(monkeypatch):
    seen = []

    def fake_nccl_all_reduce(tensor, op=None):
        if tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")
        seen.append((tensor.device, tensor.dtype, op))
        raise _Reached  # a meta tensor has no value to read back: stop here

    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist, "all_reduce", fake_nccl_all_reduce)
    with pytest.raises(_Reached):
        bench_pfc.max_over_ranks(1.5, torch.device("meta"))  # stands in for cuda:N on a CPU machine
    assert seen == [(torch.device("meta"), torch.float64, dist.ReduceOp.MAX)]


def test_max_over_ranks_on_a_gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        assert bench_pfc.max_over_ranks(2.5, torch.device("cpu")) == 2.5
    finally:
        dist.destroy_process_group()
