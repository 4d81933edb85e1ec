"""The documented multi-process launches run their workers in the project's virtual environment.

Where setup keeps a system CUDA torch (the Docker image, any GPU host), `.venv` sees it through its system
site-packages and has no `torchrun` of its own: a bare `torchrun` is then the base interpreter's, and its
workers have no DALI. The launch lines of scripts/demo.sh and docker/README.md are taken from the files
as written, the training script swapped for a probe, and run with 2 CPU workers (gloo) while the first
`torchrun` on PATH is a stand-in for that foreign one: every worker must report the venv's interpreter.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
PROBE = '''
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")
me = {"rank": dist.get_rank(), "executable": sys.executable, "prefix": sys.prefix,
      "base_prefix": sys.base_prefix}
every = [None] * dist.get_world_size()
dist.all_gather_object(every, me)
if dist.get_rank() == 0:
    open(sys.argv[1], "w").write(json.dumps(every))
dist.destroy_process_group()
'''
FOREIGN_TORCHRUN = "#!/bin/sh\necho \"$0 $*\" > \"$FOREIGN_MARK\"\nexit 97\n"


def joined_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def demo_launch() -> str:
    """The line of scripts/demo.sh that launches trainer/main.py (continuations joined)."""
    lines = [ln.strip() for ln in joined_lines((REPO / "scripts" / "demo.sh").read_text())
             if "trainer/main.py" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return lines[0]


def docker_launches() -> list[str]:
    """The in-container commands of docker/README.md that launch trainer/main.py."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "docker" / "README.md").read_text(), flags=re.S):
        for line in joined_lines(block):
            if "trainer/main.py" in line:
                words = shlex.split(line)
                image = next(i for i, w in enumerate(words) if w.startswith("facetrain:"))
                out.append(shlex.join(words[image + 1:]))
    assert out, "docker/README.md launches no training"
    return out


def as_probe_run(command: str, probe: Path, result: Path) -> str:
    """The launch with 2 local workers running `probe` instead of trainer/main.py (and its options)."""
    head = command[: command.index("trainer/main.py")]
    head = re.sub(r"--nproc_per_node=\S+", "--nproc_per_node=2", head)
    return f"{head}{shlex.quote(str(probe))} {shlex.quote(str(result))}"


def run_launch(command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `command` (bash, in the repository root, `$root` set as demo.sh sets it) with PATH holding a
    foreign `torchrun` first and no `.venv/bin`: what a shell looks like on a host whose base Python has
    the CUDA torch."""
    foreign = tmp_path / "foreign-bin"
    foreign.mkdir()
    (foreign / "torchrun").write_text(FOREIGN_TORCHRUN)
    (foreign / "torchrun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=f"{foreign}:/usr/local/bin:/usr/bin:/bin", root=str(REPO), CUDA_VISIBLE_DEVICES="",
               FOREIGN_MARK=str(tmp_path / "foreign-torchrun-ran"), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)


def workers_of(command: str, tmp_path: Path) -> list[dict]:
    probe, result = tmp_path / "probe.py", tmp_path / "workers.json"
    probe.write_text(PROBE)
    proc = run_launch(as_probe_run(command, probe, result), tmp_path)
    assert not (tmp_path / "foreign-torchrun-ran").exists(), "the launch ran the torchrun found on PATH"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(result.read_text())


def assert_in_venv(workers: list[dict]) -> None:
    assert sorted(w["rank"] for w in workers) == [0, 1]
    for w in workers:
        assert Path(w["prefix"]).resolve() == VENV.resolve(), w
        assert w["prefix"] != w["base_prefix"], w  # a virtual environment, not the base interpreter
        assert Path(w["executable"]).parent.resolve() == (VENV / "bin").resolve(), w


needs_venv = pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="no .venv (scripts/setup.sh)")


@needs_venv
def test_demo_sh_workers_run_in_the_venv(tmp_path):
    assert_in_venv(workers_of(demo_launch(), tmp_path))


@needs_venv
def test_docker_readme_workers_run_in_the_venv(tmp_path):
    launches = docker_launches()
    for command in launches:  # the multi-node one needs several hosts: its launcher is checked, not run
        assert shlex.split(command)[:3] == [".venv/bin/python", "-m", "torch.distributed.run"], command
    standalone = [c for c in launches if "--standalone" in c]
    assert len(standalone) == 1
    assert_in_venv(workers_of(standalone[0], tmp_path))


@needs_venv
def test_a_bare_torchrun_is_caught(tmp_path):
    """The form these files had: the test's stand-in for the base interpreter's torchrun runs instead."""
    probe, result = tmp_path / "probe.py", tmp_path / "workers.json"
    probe.write_text(PROBE)
    proc = run_launch(f"torchrun --standalone --nproc_per_node=2 {probe} {result}", tmp_path)
    assert proc.returncode == 97 and (tmp_path / "foreign-torchrun-ran").exists()
    assert not result.exists()
