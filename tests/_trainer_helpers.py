"""Shared pieces of the trainer tests: packed demo data, torchrun launches, small in-process fakes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
GLINT24 = SHARED_DATA / "glint24"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack_glint24(out: Path, holdout: int = 5, holdout_pairs: int = 0) -> Path:
    """`python -m pipeline pack glint24 --out out --holdout K` (the demo's data)."""
    if not GLINT24.is_dir():
        import pytest

        pytest.fail(f"the real face data {GLINT24} is missing")
    subprocess.run([PYTHON, "-m", "pipeline", "pack", str(GLINT24), "--out", str(out),
                    "--holdout", str(holdout), "--holdout-pairs", str(holdout_pairs), "--no-progress",
                    "--workers", "2"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's workers), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # the command name may hold spaces: fields after the closing parenthesis
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == pid:
                children.append(int(entry.name))
    return sorted(children)


def trainer_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def torchrun_cmd(nproc: int, args: Sequence[str], *, port: int | None = None, nnodes: int = 1,
                 node_rank: int = 0, max_restarts: int = 0, rdzv_id: str = "trainer-test") -> list[str]:
    cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}"]
    if nnodes == 1:
        cmd += ["--standalone"]  # c10d rendezvous on a free local port
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                f"--rdzv_id={rdzv_id}", f"--node_rank={node_rank}"]
    return cmd + [str(REPO / "trainer" / "main.py"), *args]


def run_trainer(nproc: int, args: Sequence[str], timeout: float = 300, check: bool = True,
                **kw) -> subprocess.CompletedProcess:
    """torchrun (nproc >= 1) or plain python (nproc == 0) on trainer/main.py."""
    if nproc == 0:
        cmd = [PYTHON, str(REPO / "trainer" / "main.py"), *args]
    else:
        cmd = torchrun_cmd(nproc, args, **kw)
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_records(output: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(output) / "metrics.jsonl") if "loss" in r]


class TinyNet(nn.Module):
    """A backbone without BatchNorm, so that gradients do not depend on how a batch is split."""

    def __init__(self, embedding_size: int = 16, pixels: int = 3 * 8 * 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(pixels, 32)
        self.fc2 = nn.Linear(32, embedding_size)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


class FakeLoader:
    """A `pipeline.loader.TrainLoader` over fixed random tensors (for in-process unit tests), one rank."""

    rank, world_size = 0, 1

    def __init__(self, num_classes: int = 10, batch_size: int = 4, steps_per_epoch: int = 5, seed: int = 0,
                 shape=(3, 8, 8)) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.batch_size, self.steps_per_epoch = num_classes, batch_size, steps_per_epoch
        self.images = torch.randn((steps_per_epoch, batch_size) + tuple(shape), generator=g)
        self.labels = torch.randint(0, num_classes, (steps_per_epoch, batch_size), generator=g)
        self.epoch, self.step, self.skipped_records = 0, 0, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.step < self.steps_per_epoch:
            i = self.step
            self.step += 1
            yield self.images[i].clone(), self.labels[i].clone()
        self.epoch += 1
        self.step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
