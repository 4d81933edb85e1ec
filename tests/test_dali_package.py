"""scripts/dali_package.py, which scripts/setup.sh asks for the DALI wheel: the build follows the CUDA major
of the installed torch (CUDA 12 for a CPU torch, whose CPU pipelines the tests run), and a GPU that torch cannot
use is said out loud. Detection is replaced by the script's options (fake torch builds and GPUs)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "dali_package.py"
sys.path.insert(0, str(SCRIPT.parent))
import dali_package as dp  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("torch_cuda, package", [
    (None, "nvidia-dali-cuda120"), ("12.1", "nvidia-dali-cuda120"), ("12.6", "nvidia-dali-cuda120"),
    ("12.9", "nvidia-dali-cuda120"), ("13.0", "nvidia-dali-cuda130"), ("13.2", "nvidia-dali-cuda130")])
def test_package_follows_the_cuda_major(torch_cuda, package):
    assert dp.dali_package(torch_cuda, "2.4.0") == f"{package}==2.4.0"


def test_a_cuda_major_without_dali_wheels_is_refused():
    with pytest.raises(dp.NoDaliBuild, match="CUDA 11.8"):
        dp.dali_package("11.8", "2.4.0")
    proc = run("--torch-cuda", "11.8", "--cuda-available", "yes", "--gpu", "yes")
    assert proc.returncode == 2 and proc.stdout == "" and "DALI has wheels for CUDA 12 and 13" in proc.stderr


def test_version_is_the_dali_extras_pin():
    assert dp.pinned_dali_version() == "2.4.0"  # setup.cfg: dali = nvidia-dali-cuda120==2.4.0
    proc = run("--torch-cuda", "13.0", "--cuda-available", "yes", "--gpu", "yes")
    assert proc.returncode == 0 and proc.stdout.strip() == "nvidia-dali-cuda130==2.4.0"
    assert proc.stderr == ""  # a usable GPU: nothing to say


def test_cpu_machine_gets_cuda120_silently():
    proc = run("--torch-cuda", "none", "--cuda-available", "no", "--gpu", "no")
    assert proc.returncode == 0 and proc.stdout.strip() == "nvidia-dali-cuda120==2.4.0" and proc.stderr == ""


def test_gpu_with_a_cpu_torch_is_said_loudly():
    proc = run("--torch-cuda", "none", "--cuda-available", "no", "--gpu", "yes", "--base-torch-cuda", "12.6")
    assert proc.returncode == 0 and proc.stdout.strip() == "nvidia-dali-cuda120==2.4.0"
    assert "GPU is present, but the torch of .venv is a CPU build" in proc.stderr
    assert "CUDA 12.6 torch" in proc.stderr and "rm -rf .venv && bash scripts/setup.sh" in proc.stderr
    alone = dp.gpu_warning(True, None, False, None)
    assert "Install a CUDA build of torch" in alone


def test_gpu_that_cuda_torch_cannot_see_is_said_loudly():
    text = dp.gpu_warning(True, "12.6", False)
    assert "torch.cuda.is_available() is False" in text and "driver" in text
    assert dp.gpu_warning(True, "12.6", True) is None
    assert dp.gpu_warning(False, None, False, "12.6") is None


def test_setup_sh_asks_this_script():
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert '$(.venv/bin/python scripts/dali_package.py --base-python "$PY")' in text
    assert "nvidia-dali-cuda120" not in text  # no fixed build left in setup.sh
