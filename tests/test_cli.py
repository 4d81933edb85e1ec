"""The command-line surface: `facetrain COMMAND` reaches every stage, each `--help` exits 0 and shows the
defaults, setup.cfg's console scripts import, and the trainer starts under torch.distributed.run both as
`-m trainer` and as `--no-python ... facetrain train`."""
from __future__ import annotations

import configparser
import importlib
import inspect
import json
import re
import subprocess
import sys

import pytest

from facetrain import __main__ as facetrain_cli
from tests._trainer_helpers import PYTHON, REPO, pack_glint24, trainer_env

# Options whose default --help must state, per command: (option, default as printed).
DEFAULTS = {
    "pack": [("--shard-size", "1024.0"), ("--workers", None), ("--resize-mode", "crop"), ("--size", "112"),
             ("--quality", "95"), ("--seed", "0")],
    "verify": [],
    "eval": [("--batch-size", "64"), ("--workers", "2"), ("--max-rank", "10"), ("--fars", None),
             ("--headline-far", "1e-3"), ("--tile", "2048"), ("--mask-mode", "mixed"), ("--device", "auto")],
    "embed": [("--batch-size", "64"), ("--workers", "2"), ("--device", "auto")],
    "export": [("--opset", "17"), ("--atol", "0.0001"), ("--input-name", "data")],
    "flops": [("--size", "112")],
}


def _help_raw(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # facetrain renames argv[0] for the trainer's parser
    with pytest.raises(SystemExit) as stop:
        facetrain_cli.main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _help(capsys, monkeypatch, *argv: str) -> str:
    return " ".join(_help_raw(capsys, monkeypatch, *argv).split())  # argparse wraps lines: one line


def _option_entries(text: str) -> dict[str, str]:
    """{"--opt": its help entry as one line} from argparse's option list."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-\S+)", line)
        if m:
            current = m.group(1).split(",")[0]
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("command", sorted(DEFAULTS))
def test_every_command_help_exits_0_and_shows_its_defaults(command, capsys, monkeypatch):
    raw = _help_raw(capsys, monkeypatch, command)
    text = " ".join(raw.split())
    assert text.startswith(f"usage: facetrain {command} ")
    entries = _option_entries(raw)
    for option, default in DEFAULTS[command]:
        shown = re.search(r"\(default: ([^)]*)\)", entries[option])
        assert shown, f"{command} {option}: no default in --help: {entries[option]}"
        if default is not None:
            assert shown.group(1).startswith(default), (option, shown.group(1))
    assert "../shared" not in text and "DESIGN.md" not in text  # in-repo docs only (docs/design.md)


def test_pack_help_explains_src_and_cites_the_design_doc(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "pack")
    assert "SRC is one of" in text and "ImageFolder" in text and ".rec" in text
    assert "docs/design.md" in text


def test_train_help_is_the_trainers(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "train")
    assert text.startswith("usage: facetrain train ") and "--config" in text and "key=value" in text


def test_top_level_help_lists_every_command_and_unknown_ones_fail(capsys):
    assert facetrain_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in facetrain_cli.COMMANDS:
        assert re.search(rf"^  {name}\s", out, re.M), name
    assert "torch.distributed.run" in out and "docs/design.md" in out
    assert facetrain_cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and err.count("\n") == 1
    assert facetrain_cli.main([]) == 2  # the usage, then a failure status


def test_every_command_module_has_the_main_it_is_called_with():
    for name, command in facetrain_cli.COMMANDS.items():
        params = inspect.signature(importlib.import_module(command.module).main).parameters
        assert "argv" in params, name
        assert ("prog" in params) == (command.takes_prog or bool(command.leading)), name


def test_setup_cfg_console_scripts_import():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].split("\n")
                   if line.strip())
    scripts = {k.strip(): v.strip() for k, v in scripts.items()}
    assert set(scripts) == {"facetrain", "maskgen"}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    packages = cfg["options.packages.find"]["include"].split()
    assert "facetrain*" in packages


def test_flops_command_prints_params_and_gmacs(capsys):
    from trainer.backbones import build_backbone
    from trainer.model_io import flops

    assert flops.main(["--network", "mbf", "--json", "embedding_size=128"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = flops.describe(build_backbone("mbf", embedding_size=128))
    assert row["network"] == "mbf"
    assert row["params_m"] == pytest.approx(want["params_m"]) and row["gmacs"] == pytest.approx(want["gmacs"])
    assert 0.3 < row["gmacs"] < 0.6  # MobileFaceNet: about 0.45 GMACs at 112x112
    assert flops.main(["--network", "no_such_net"]) == 2
    assert "unknown backbone" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["trainer", "facetrain"])
def test_python_dash_m_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "No module named" not in proc.stderr
    assert "--config" in proc.stdout if module == "trainer" else "facetrain train" in proc.stdout


@pytest.mark.slow
def test_trainer_runs_under_torch_distributed_run_as_module_and_as_facetrain_train(tmp_path):
    data = pack_glint24(tmp_path / "data", holdout=2, holdout_pairs=20)
    fast = ["--config", "cpu_demo", "--data", str(data), "batch_size=16", "frequent=1",
            "progress_bar=false", "warmup_epoch=0", "num_threads=1", "max_steps=2"]
    launch = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    for name, cmd in {"module": [*launch, "-m", "trainer"],
                      "facetrain": [*launch, "--no-python", PYTHON, "-m", "facetrain", "train"]}.items():
        out = tmp_path / name
        proc = subprocess.run([*cmd, *fast, "--output", str(out)], cwd=REPO, env=trainer_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-4000:]}"
        assert (out / "model.pt").is_file(), name


@pytest.mark.parametrize("command,defaults", [
    ("build", [("--ratio", "0.05"), ("--seed", "0"), ("--mode", "mixed"), ("--crops", "aligned"),
               ("--shard-size", "1024.0"), ("--workers", None), ("--nose-covered", None), ("--types", None)]),
    ("preview", [("-n", "64"), ("--cols", "4"), ("--mode", "mixed")]),
    ("folder", [("--seed", "0"), ("--workers", None), ("--mode", "mixed")]),
])
def test_maskgen_help_shows_its_defaults(command, defaults, capsys):
    from maskgen import __main__ as maskgen_cli

    with pytest.raises(SystemExit) as stop:
        maskgen_cli.main([command, "--help"])
    assert stop.value.code == 0
    entries = _option_entries(capsys.readouterr().out)
    for option, default in defaults:
        shown = re.search(r"\(default: ([^)]*)\)", entries[option])
        assert shown, f"maskgen {command} {option}: no default in --help: {entries[option]}"
        if default is not None:
            assert shown.group(1).startswith(default), (option, shown.group(1))
