"""The CUDA speed switches, set from the config in one place, so that a bench measures what the trainer runs.

`cudnn_benchmark`: cuDNN times its convolution algorithms on the first batch of each input shape and keeps
the fastest (the trainer's shapes are fixed, so this costs one slow step). `tf32`: fp32 matmuls and
convolutions on TensorFloat-32 tensor cores (Ampere and later; 10-bit mantissa inputs, fp32 accumulation),
which is what an `amp=fp32` run on an A100/H100 would otherwise leave on the table. Both act on CUDA only;
on the CPU nothing is touched. `deterministic=True` turns the benchmark off: the algorithm it picks may
differ between runs.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch


def apply_cuda_flags(cfg: Mapping[str, Any], device: torch.device | str) -> dict[str, bool]:
    """Set torch's global cuDNN/TF32 switches from `cfg` (`cudnn_benchmark`, `tf32`, `deterministic`) when
    `device` is CUDA; returns what was set ({} on the CPU), for the log and the bench tables."""
    if torch.device(device).type != "cuda":
        return {}
    benchmark = bool(cfg.get("cudnn_benchmark", True)) and not bool(cfg.get("deterministic", False))
    tf32 = bool(cfg.get("tf32", True))
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return {"cudnn_benchmark": benchmark, "tf32": tf32}


def cuda_flags_text(flags: Mapping[str, bool]) -> str:
    """One phrase for a bench row: 'cudnn.benchmark on, TF32 on' (empty on the CPU)."""
    if not flags:
        return ""
    onoff = {True: "on", False: "off"}
    return f"cudnn.benchmark {onoff[flags['cudnn_benchmark']]}, TF32 {onoff[flags['tf32']]}"
