"""A worker killed in a two-node job (two torchrun agents on loopback, c10d, --max_restarts=1, torchrun's
defaults otherwise, so the agents share their TCP store with the workers) is restarted by both agents; the
job resumes from the last checkpoint and finishes (issue I item 3: the trainer used to refuse a restart
across several agents)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests._trainer_helpers import REPO, child_pids, free_port, pack_glint24, torchrun_cmd, train_records, trainer_env
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow

FAST = ["batch_size=16", "frequent=1", "progress_bar=false", "warmup_epoch=0", "num_threads=1",
        "val_targets=[]"]


@pytest.mark.timeout(600)
def test_killed_worker_of_a_two_node_job_resumes(tmp_path):
    data = pack_glint24(tmp_path / "glint24", holdout=2)
    out = tmp_path / "out"
    total, port = 8, free_port()
    args = ["--config", "cpu_demo", "--data", str(data), "--output", str(out), *FAST, f"max_steps={total}",
            "save_every=3"]
    env = trainer_env()
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # torchrun's default: the agents' store is shared
    agents = [subprocess.Popen(torchrun_cmd(1, args, nnodes=2, node_rank=n, port=port, max_restarts=1,
                                            rdzv_id="restart"),
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for n in range(2)]
    try:
        deadline = time.time() + 300
        while ckpt.find_checkpoint(out) is None:
            assert all(a.poll() is None for a in agents), "an agent ended before the first checkpoint"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.5)
        workers = [p for p in child_pids(agents[1].pid)
                   if b"main.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        logs = [a.communicate(timeout=400)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-4000:] for log in logs)
    steps = [r["step"] for r in train_records(out)]
    assert steps == list(range(1, total + 1)), steps  # continues, every redone step logged once
    assert "resumed from" in (out / "training.log").read_text()
    assert ckpt.find_checkpoint(out).name == ckpt.step_dir_name(total)
