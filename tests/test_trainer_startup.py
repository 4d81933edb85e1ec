"""What a user meets before the first step (in this process, one rank): bad --data, bad data, val targets
checked whole (raw photos refused or aligned once and cached), a resume into a run with another config.
Each problem is one line on stderr, exit code 2, no traceback, and a config error makes no run folder."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from tests._trainer_helpers import pack_glint24, read_jsonl, train_records
from tests.conftest import SHARED_DATA
from trainer import main as trainer_main
from trainer import val_targets
from trainer.config import load_config

pytestmark = pytest.mark.slow

FAST = ["--config", "cpu_demo", "batch_size=4", "embedding_size=32", "frequent=1", "progress_bar=false",
        "tensorboard=false", "num_threads=0", "warmup_epoch=0"]
ORL = SHARED_DATA / "orl"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_glint24(tmp_path_factory.mktemp("startup") / "glint24", holdout=2, holdout_pairs=20)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def _copy(data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy


def _orl_pairs(folder: Path, subjects=("s1", "s2", "s3")) -> Path:
    """A pairs.txt over raw ORL photos (92x112 grey, not aligned): LFW's `name n1 n2` lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in subjects:
        (folder / s).symlink_to(ORL / s)
    lines = [f"{s}\t1\t2" for s in subjects] + [f"{a}\t3\t{b}\t4" for a, b in zip(subjects, subjects[1:])]
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    return folder / "pairs.txt"


def test_data_that_is_not_packed_is_named_before_anything_else(tmp_path, capsys):
    out = tmp_path / "run"
    # the default val target (holdout_pairs.bin) is missing too: the data is what the user must hear of
    assert trainer_main.main([*FAST, "--data", str(tmp_path), "--output", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "no manifest.json: run `python -m pipeline pack` first" in line
    assert not out.exists()


def test_config_errors_make_no_run_folder(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert trainer_main.main([*FAST, "--data", str(data), "--output", str(out), "optimizer=lamb"]) == 2
    assert "optimizer must be one of" in _one_line_error(capsys)
    assert trainer_main.main([*FAST, "--data", str(data), "--output", str(out), "val_targets=nope.bin"]) == 2
    assert "val target 'nope.bin' not found" in _one_line_error(capsys)
    assert not out.exists()


def test_a_manifest_that_is_not_utf8_is_a_one_line_error(data, tmp_path, capsys):
    copy = _copy(data, tmp_path)
    (copy / "manifest.json").write_bytes(b'{"version": 1, "name": "\xff\xfe"}')
    assert trainer_main.main([*FAST, "--data", str(copy), "--output", str(tmp_path / "run")]) == 2
    line = _one_line_error(capsys)
    assert "not UTF-8" in line and "pack the dataset again" in line
    assert not (tmp_path / "run").exists()


def test_data_smaller_than_one_step_is_a_one_line_error(data, tmp_path, capsys):
    assert trainer_main.main([*FAST, "--data", str(data), "--output", str(tmp_path / "run"),
                              "batch_size=5000"]) == 2
    line = _one_line_error(capsys)
    assert "less than one optimizer step of 5000" in line and "lower batch_size" in line
    assert not (tmp_path / "run").exists()


def test_labels_outside_the_classes_are_skipped_and_counted(data, tmp_path, capsys):
    """Records whose label is outside [0, num_classes) never reach the classifier (they used to end the run
    in a traceback): the readers skip them, and the run's last line counts them over every rank."""
    copy = _copy(data, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["num_classes"] = 10  # glint24's labels run to 23
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    assert trainer_main.main([*FAST, "--data", str(copy), "--output", str(out), "max_steps=3",
                              "val_targets=[]"]) == 0
    done = [ln for ln in (out / "training.log").read_text().splitlines() if "done:" in ln][-1]
    skipped = int(done.split(" corrupt records skipped")[0].rsplit(" ", 1)[-1])
    assert skipped > 0, done


def test_unreadable_val_target_stops_before_the_first_step(data, tmp_path, capsys):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"not a pickle")
    out = tmp_path / "run"
    assert trainer_main.main([*FAST, "--data", str(data), "--output", str(out),
                              f"val_targets=['{bad}']"]) == 2
    line = _one_line_error(capsys)
    assert "val target broken" in line and "not an insightface .bin pack" in line
    assert not out.exists()


def test_raw_photo_pairs_are_refused_before_training_without_val_align(data, tmp_path, capsys):
    pairs = _orl_pairs(tmp_path / "orl_pairs")
    out = tmp_path / "run"
    assert trainer_main.main([*FAST, "--data", str(data), "--output", str(out),
                              f"val_targets=['{pairs}']"]) == 2
    line = _one_line_error(capsys)
    assert "raw photos" in line and "92x112" in line and "val_align=true" in line
    assert not out.exists()


def test_val_align_aligns_once_and_caches_an_insightface_bin(tmp_path, monkeypatch):
    pairs = _orl_pairs(tmp_path / "orl_pairs")
    cfg = load_config("cpu_demo", [f"val_targets=['{pairs}']", "val_align=true"])
    ready = val_targets.prepare_val_targets(cfg, tmp_path / "run")
    cache = pairs.parent / "pairs.aligned.bin"
    assert ready == {"pairs": cache}
    with open(cache, "rb") as f:
        bins, issame = pickle.load(f)
    assert issame == [True, True, True, False, False] and len(bins) == 10
    from trainer.eval.targets import load_bin

    aligned = load_bin(cache)
    assert aligned.images.shape == (10, 112, 112, 3)
    # a later run (and trainer.eval through aligned_cache) reads the cache: nothing is aligned again
    monkeypatch.setattr(val_targets, "load_pairs_txt", lambda *a, **k: pytest.fail("aligned again"))
    assert val_targets.prepare_val_targets(cfg, tmp_path / "run2") == {"pairs": cache}
    assert val_targets.aligned_cache(pairs) == cache
    # an edited pairs.txt makes the cache stale
    pairs.write_text(pairs.read_text())
    assert val_targets.aligned_cache(pairs) is None


def test_val_align_caches_in_the_run_folder_when_beside_is_read_only(tmp_path, monkeypatch):
    pairs = _orl_pairs(tmp_path / "orl_pairs", subjects=("s4", "s5"))
    real = val_targets.write_bin

    def read_only_beside(target, path):
        if Path(path).parent == pairs.parent:
            raise PermissionError(13, "Permission denied")
        real(target, path)

    monkeypatch.setattr(val_targets, "write_bin", read_only_beside)
    cfg = load_config("cpu_demo", [f"val_targets=['{pairs}']", "val_align=true"])
    ready = val_targets.prepare_val_targets(cfg, tmp_path / "run")
    cache = tmp_path / "run" / val_targets.CACHE_DIR / "pairs.aligned.bin"
    assert ready == {"pairs": cache} and cache.is_file()
    assert val_targets.aligned_cache(pairs, [tmp_path / "run" / val_targets.CACHE_DIR]) == cache


def test_resume_with_another_config_is_refused_naming_the_keys(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = [*FAST, "--data", str(data), "--output", str(out), "val_targets=[]"]
    assert trainer_main.main([*common, "max_steps=2"]) == 0
    capsys.readouterr()
    assert trainer_main.main([*common, "max_steps=3", "lr=0.05", "batch_size=8"]) == 2
    line = _one_line_error(capsys)
    assert "batch_size 4 -> 8" in line and "lr 0.1 -> 0.05" in line and "--allow-config-change" in line
    assert [r["step"] for r in train_records(out)] == [1, 2]  # nothing ran
    # the keys that may differ (max_steps, frequent, progress, checkpoints) pass silently
    assert trainer_main.main([*common, "max_steps=3", "frequent=2", "keep_checkpoints=3"]) == 0
    # a meant change, said explicitly
    assert trainer_main.main([*common, "max_steps=4", "lr=0.05", "--allow-config-change"]) == 0
    assert [r["step"] for r in train_records(out)][-1] == 4
    assert "resuming with a changed config (allowed): lr 0.1 -> 0.05" in (out / "training.log").read_text()


def test_log_has_the_start_dump_and_a_step_line_with_eta(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert trainer_main.main([*FAST, "--data", str(data), "--output", str(out), "max_steps=3"]) == 0
    err = capsys.readouterr().err
    log = (out / "training.log").read_text()
    assert "  lr = 0.1" in log and "  network = 'mbf'" in log  # the config dump
    manifest = json.loads((data / "manifest.json").read_text())
    assert (f"{manifest['num_images']} images, 24 identities, {len(manifest['shards'])} shards") in log
    assert "world size 1, devices: 1 x CPU" in log and str(out.resolve()) in log
    steps = [line for line in log.splitlines() if "samples/s" in line and "ETA" in line]
    assert len(steps) == 3 and "step 3/3  epoch 0  loss " in steps[-1]
    assert "step 3/3" in err  # stderr is not a terminal here: the step lines go there too
    records = read_jsonl(out / "metrics.jsonl")
    assert all(isinstance(r["time"], float) for r in records)
    evals = [r for r in records if "eval" in r]
    assert evals and evals[-1]["epoch"] > 0 and "tar_at_far" in evals[-1]["eval"]["holdout_pairs"]


def test_a_val_target_rank_0_cannot_read_stops_every_rank(data, tmp_path):
    """Rank 0 reads the targets; rank 1 hears of its failure instead of waiting in the next collective."""
    from tests._trainer_helpers import run_trainer

    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"not a pickle")
    proc = run_trainer(2, [*FAST, "--data", str(data), "--output", str(tmp_path / "run"),
                           f"val_targets=['{bad}']"], timeout=120, check=False)
    assert proc.returncode != 0
    assert "error: val target broken" in proc.stderr
    assert "error: rank 0 could not read a val target" in proc.stderr
    # no frame of ours (torchrun prints its own ChildFailedError traceback for any worker's exit code 2)
    assert 'trainer/main.py", line' not in proc.stderr and "trainer/val_targets.py" not in proc.stderr


def test_a_broken_shard_index_is_a_one_line_error(data, tmp_path, capsys):
    copy = _copy(data, tmp_path)
    index = sorted(copy.glob("train-*.idx"))[0]
    index.write_text("garbage\tline\n")
    assert trainer_main.main([*FAST, "--data", str(copy), "--output", str(tmp_path / "run"), "max_steps=2",
                              "val_targets=[]"]) == 2
    assert f"{index}:1" in _one_line_error(capsys)
