"""Scratch environments for the peers the benchmarks compare against (never project dependencies)."""
from __future__ import annotations

import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "RESULTS.md"


def mxnet_python(venv: Path = REPO / ".venv-mxnet-bench") -> Path:
    """mxnet 1.9.1 + numpy<1.24 + OpenCV (im2rec) + torch (insightface's DataLoader path), built once."""
    py = venv / "bin" / "python"
    probe = "import mxnet, cv2, torch, PIL"
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"setting up the mxnet peer in {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "mxnet==1.9.1",
                    "numpy<1.24", "opencv-python-headless<4.9", "torch==2.13.0", "pillow"], check=True)
    return py


def machine() -> str:
    import os

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def record(section: str, command: str, table: str) -> None:
    """Append one measured result to bench/RESULTS.md."""
    text = (f"\n### {section} ({date.today().isoformat()})\n\n- machine: {machine()}\n- command: `{command}`\n\n"
            f"{table.rstrip()}\n")
    with open(RESULTS, "a") as f:
        f.write(text)
    print(text)
