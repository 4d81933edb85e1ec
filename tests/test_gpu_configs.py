"""The GPU recipes turn on the CUDA speed switches (issue I item 11): NHWC convolutions, cuDNN's autotuner
and TF32, which trainer/main.py applies (trainer/cuda_flags.py) and bench/ measures."""
import pytest

from trainer.config import load_config
from trainer.cuda_flags import apply_cuda_flags


@pytest.mark.parametrize("name", ["ms1mv3_r50", "ms1mv3_r100", "glint360k_r100"])
def test_gpu_recipes_run_channels_last_with_cudnn_benchmark_and_tf32(name):
    cfg = load_config(name)
    assert cfg.channels_last is True
    assert cfg.cudnn_benchmark is True and cfg.tf32 is True and not cfg.deterministic
    assert apply_cuda_flags(cfg, "cpu") == {}  # nothing global is touched off CUDA
