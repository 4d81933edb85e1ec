"""Shared fixtures: the real face data beside the checkout, packed datasets, the mxnet peer venv."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FACE_DATA", REPO.parent / "shared" / "data"))


def run_cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repo root with this interpreter."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one torch thread beats several contending for 2 shared cores (30x, measured).
    Modules of tiny-tensor tests opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "glint24").is_dir():
        pytest.fail(f"the real face data is missing: {SHARED_DATA} (set FACE_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def glint24(shared_data) -> Path:
    return shared_data / "glint24"


@pytest.fixture(scope="session")
def packed_glint(glint24, tmp_path_factory) -> Path:
    """glint24 packed into several shards, 5 images per identity held out."""
    out = tmp_path_factory.mktemp("packed") / "glint24"
    run_cli("pipeline", "pack", str(glint24), "--out", str(out), "--holdout", "5", "--shard-size", "1",
            "--workers", "2", "--no-progress")
    return out


@pytest.fixture(scope="session")
def unique_label_data(glint24, tmp_path_factory) -> Path:
    """101 real faces, each its own identity (the label names the record), in 3 shards."""
    root = tmp_path_factory.mktemp("unique")
    files = sorted(p for p in glint24.rglob("*.png"))[:101]
    lst = root / "list.tsv"
    lst.write_text("".join(f"{p}\t{i}\n" for i, p in enumerate(files)))
    out = root / "data"
    run_cli("pipeline", "pack", str(lst), "--out", str(out), "--keep-labels", "--shard-size", "0.2",
            "--workers", "1", "--no-progress")
    return out


@pytest.fixture(scope="session")
def mxnet_python() -> Path:
    """A throwaway venv with the retired mxnet 1.9.1 (numpy<1.24), as the compatibility peer.

    Built once in .venv-mxnet/ (git-ignored); never a dependency of the project itself.
    """
    venv = REPO / ".venv-mxnet"
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import mxnet"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "mxnet==1.9.1", "numpy<1.24"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"could not install the mxnet peer: {proc.stderr[-2000:]}")
    return py


@pytest.fixture(scope="session")
def glint_crops(glint24) -> list:
    """One aligned 112x112 RGB crop per glint24 identity (24 real faces, frontal to half-profile)."""
    import cv2

    crops = []
    for person in sorted(p for p in Path(glint24).iterdir() if p.is_dir()):
        first = sorted(person.glob("*.png"), key=lambda p: int(p.stem))[0]
        crops.append(cv2.cvtColor(cv2.imread(str(first)), cv2.COLOR_BGR2RGB))
    return crops


@pytest.fixture(scope="session")
def masker():
    """One Masker for the session (FaceMesh's graph starts once)."""
    from maskgen.masker import Masker

    m = Masker()
    yield m
    m.close()
