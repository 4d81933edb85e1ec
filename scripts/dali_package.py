#!/usr/bin/env python
"""Which DALI wheel scripts/setup.sh installs, and a loud word when a GPU is here but torch cannot use it.

Run by the venv's python: prints the pip requirement for the DALI build of the installed torch's CUDA major
(`nvidia-dali-cuda120` for CUDA 12, `nvidia-dali-cuda130` for CUDA 13; DALI's wheels exist for no other
major), at the version the `dali` extra of setup.cfg pins. A CPU torch gets the CUDA 12 build, whose CPU
pipelines the tests run. On stderr it warns when an NVIDIA GPU is present (`nvidia-smi` answers or
/dev/nvidia0 exists) but torch has no CUDA build or sees no device, which would otherwise train on
gloo/CPU without a word; `--base-python` also names the case of a CPU `.venv` beside a base interpreter
whose torch has CUDA (setup keeps a CUDA torch only when it creates `.venv`).

    .venv/bin/python scripts/dali_package.py [--base-python python3]
The `--torch-cuda`, `--cuda-available`, `--gpu` and `--base-torch-cuda` options replace what is detected
(tests, dry runs).
"""
from __future__ import annotations

import argparse
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
DALI_CUDA_MAJORS = (12, 13)
FALLBACK_MAJOR = 12  # no CUDA torch: DALI's CPU pipelines run from any build


class NoDaliBuild(ValueError):
    """The torch's CUDA major has no DALI wheel."""


def pinned_dali_version(setup_cfg: Path = SETUP_CFG) -> str:
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    spec = cfg["options.extras_require"]["dali"].strip()
    match = re.fullmatch(r"nvidia-dali-cuda\d+0==([\w.]+)", spec)
    if not match:
        raise ValueError(f"{setup_cfg}: the dali extra {spec!r} is not nvidia-dali-cudaXY0==VERSION")
    return match.group(1)


def dali_package(torch_cuda: Optional[str], version: str) -> str:
    """The requirement for torch's CUDA version string (`torch.version.cuda`, None for a CPU build)."""
    major = FALLBACK_MAJOR if not torch_cuda else int(torch_cuda.split(".")[0])
    if major not in DALI_CUDA_MAJORS:
        raise NoDaliBuild(f"torch is built for CUDA {torch_cuda}, and DALI has wheels for CUDA "
                          f"{' and '.join(map(str, DALI_CUDA_MAJORS))} only: install a CUDA 12 or 13 torch, "
                          f"or set DALI_PACKAGE, or train with loader_backend=nvjpeg or torch")
    return f"nvidia-dali-cuda{major}0=={version}"


def gpu_present() -> bool:
    if Path("/dev/nvidia0").exists():
        return True
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def base_torch_cuda(python: str) -> Optional[str]:
    """`torch.version.cuda` of another interpreter ('' when it has no torch or a CPU one)."""
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.version.cuda or '')"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def gpu_warning(gpu: bool, torch_cuda: Optional[str], cuda_available: bool,
                base_cuda: Optional[str] = None) -> Optional[str]:
    """The warning for a GPU that torch will not use; None when there is nothing to say."""
    if not gpu or (torch_cuda and cuda_available):
        return None
    if not torch_cuda:
        lines = ["an NVIDIA GPU is present, but the torch of .venv is a CPU build: training will run on",
                 "gloo/CPU and DALI will decode on the CPU."]
        if base_cuda:
            lines += [f"The base python has a CUDA {base_cuda} torch, which setup keeps only when it creates",
                      ".venv: rm -rf .venv && bash scripts/setup.sh"]
        else:
            lines += ["Install a CUDA build of torch for python3 (or use the Docker image), then",
                      "rm -rf .venv && bash scripts/setup.sh"]
    else:
        lines = [f"an NVIDIA GPU is present and torch is built for CUDA {torch_cuda}, but",
                 "torch.cuda.is_available() is False: check the driver (nvidia-smi shows the highest CUDA",
                 "version it supports) and CUDA_VISIBLE_DEVICES. Training would run on gloo/CPU."]
    bar = "!" * 100
    return "\n".join([bar, *(f"!! setup: {line}" for line in lines), bar])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-python", help="the interpreter setup.sh makes .venv from (has it a CUDA torch?)")
    p.add_argument("--torch-cuda", help="torch.version.cuda to assume ('none': a CPU build)")
    p.add_argument("--cuda-available", choices=["yes", "no"], help="torch.cuda.is_available() to assume")
    p.add_argument("--gpu", choices=["yes", "no"], help="whether an NVIDIA GPU is present")
    p.add_argument("--base-torch-cuda", help="the base python's torch.version.cuda to assume ('none')")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_cuda is None or args.cuda_available is None:
        import torch
    torch_cuda = (torch.version.cuda if args.torch_cuda is None
                  else None if args.torch_cuda == "none" else args.torch_cuda)
    available = torch.cuda.is_available() if args.cuda_available is None else args.cuda_available == "yes"
    gpu = gpu_present() if args.gpu is None else args.gpu == "yes"
    base_cuda = None
    if args.base_torch_cuda is not None:
        base_cuda = None if args.base_torch_cuda == "none" else args.base_torch_cuda
    elif gpu and not torch_cuda and args.base_python:
        base_cuda = base_torch_cuda(args.base_python) or None
    warning = gpu_warning(gpu, torch_cuda, available, base_cuda)
    if warning:
        print(warning, file=sys.stderr)
    try:
        print(dali_package(torch_cuda, pinned_dali_version()))
    except NoDaliBuild as e:
        print(f"setup: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
