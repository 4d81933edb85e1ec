"""trainer/cuda_flags.py: the config's `cudnn_benchmark` and `tf32` reach torch's switches on CUDA only, and
the benches set them through it alone, so that a bench figure is measured under the trainer's switches."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from trainer.config import apply_overrides, base_config
from trainer.cuda_flags import apply_cuda_flags, cuda_flags_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def switches():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield lambda: (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                   torch.backends.cudnn.allow_tf32)
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved


def test_defaults_turn_both_on_for_cuda(switches):
    cfg = base_config()
    assert cfg.cudnn_benchmark is True and cfg.tf32 is True
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert apply_cuda_flags(cfg, torch.device("cuda", 0)) == {"cudnn_benchmark": True, "tf32": True}
    assert switches() == (True, True, True)
    assert cuda_flags_text({"cudnn_benchmark": True, "tf32": True}) == "cudnn.benchmark on, TF32 on"


def test_keys_turn_them_off(switches):
    cfg = apply_overrides(base_config(), ["tf32=false"])
    assert apply_cuda_flags(cfg, "cuda") == {"cudnn_benchmark": True, "tf32": False}
    assert switches() == (True, False, False)
    cfg = apply_overrides(base_config(), ["deterministic=true"])  # benchmark picks algorithms per run
    assert apply_cuda_flags(cfg, "cuda")["cudnn_benchmark"] is False and switches()[0] is False


def test_cpu_touches_nothing(switches):
    before = switches()
    assert apply_cuda_flags(apply_overrides(base_config(), ["tf32=false"]), "cpu") == {}
    assert switches() == before and cuda_flags_text({}) == ""


@pytest.mark.parametrize("bench", ["train.py", "gpu_check.py"])
def test_benches_set_the_switches_through_the_helper_only(bench):
    source = (REPO / "bench" / bench).read_text()
    assert "apply_cuda_flags(cfg, device)" in source
    assert not re.search(r"torch\.backends\.[\w.]+\s*=", source)
