"""The papers' training modes run by trainer/main.py (config.mode), and ResSaNet's masked-face recipe, on
glint24 packed plus 5% maskgen copies (one module-scoped data build; "masked" is in its label_fields).

Each run is short (a few optimizer steps of a tiny batch, in this process, one rank) and checks that the
mode really ran: LVFace switches stage at the switch step and its EPL class means move; AAFace goes
through its three stages from init_weights with the attribute loss logged (and its recipe, on attributes
in CelebA's format); SST fills its prototype queue and a resumed run continues with the very queue and
gallery it saved. The modes' 1-rank == 2-rank equality is in
tests/test_modes.py.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests._trainer_helpers import PYTHON, REPO, pack_glint24, train_records
from trainer import checkpoint as ckpt
from trainer import main as trainer_main

pytestmark = pytest.mark.slow

# One rank, batch 4, a log line every step; no evaluation, no tensorboard.
FAST = ["batch_size=4", "embedding_size=32", "frequent=1", "progress_bar=false", "tensorboard=false",
        "val_targets=[]", "num_threads=0", "amp=fp32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """glint24 (2 images per identity held out) plus `maskgen build --ratio 0.05`."""
    out = pack_glint24(tmp_path_factory.mktemp("modes") / "glint24", holdout=2)
    subprocess.run([PYTHON, "-m", "maskgen", "build", "--data", str(out), "--ratio", "0.05", "--workers", "1",
                    "--no-progress"], cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


def steps_per_epoch(data: Path, batch_size: int = 4) -> int:
    from pipeline.manifest import load_manifest

    return load_manifest(data)["num_images"] // batch_size


def run(*args: str) -> None:
    assert trainer_main.main(list(args)) == 0


def head_state(checkpoint_dir: Path) -> dict:
    return torch.load(checkpoint_dir / ckpt.FC_FULL, map_location="cpu", weights_only=False)["head"]["state"]


def test_masked_data_has_five_percent_masked_copies(data):
    from pipeline.manifest import load_manifest

    m = load_manifest(data)
    assert "masked" in m["label_fields"]
    masked = sum(s["count"] for s in m["shards"] if s["rec"].startswith("masked"))
    assert masked == round(0.05 * (m["num_images"] - masked)), (masked, m["num_images"])


def test_lvface_switches_stage_at_the_switch_epoch_and_moves_the_class_means(data, tmp_path):
    out = tmp_path / "lvface"
    switch_step = 2
    run("--config", "lvface_vit", "--data", str(data), "--output", str(out), *FAST, "network=mbf",
        "max_steps=4", "save_every=2", f"lvface_switch_epoch={switch_step / steps_per_epoch(data)!r}")
    records = train_records(out)
    assert [r["stage"] for r in records] == ["ncs"] * 2 + ["epl"] * 2
    assert [r["sample_rate"] for r in records] == [0.3] * 2 + [1.0] * 2  # negative dropout off in EPL
    assert "step 2 (epoch 0.01): lvface stage 'epl'" in (out / "training.log").read_text()

    at_switch = head_state(out / ckpt.CHECKPOINTS / ckpt.step_dir_name(2))
    at_end = head_state(out / ckpt.CHECKPOINTS / ckpt.step_dir_name(4))
    # The running class means kept moving after the switch: the EPL centres changed.
    assert at_switch["class_seen"].any()
    assert at_end["class_seen"].sum() > at_switch["class_seen"].sum()
    assert not torch.equal(at_switch["class_mean"], at_end["class_mean"])
    # And those means are what the EPL stage mixes into the centres.
    from trainer.modes.lvface import EPLHead

    epl = EPLHead(24, 32)
    epl.load_state_dict(at_end)
    epl.epl_enabled = True
    weight = torch.load(out / ckpt.CHECKPOINTS / ckpt.step_dir_name(4) / ckpt.FC_FULL,
                        weights_only=False)["fc"]["weight"]
    plain = torch.nn.functional.normalize(weight, dim=1)
    mixed = epl.centres(weight, None)
    assert not torch.allclose(mixed[at_end["class_seen"]], plain[at_end["class_seen"]], atol=1e-3)


@pytest.fixture(scope="module")
def iresnet18_weights(tmp_path_factory) -> Path:
    """An IResNet-18 state dict under insightface's key names (ours are the same): AAFace's init_weights."""
    from trainer.backbones import build_backbone

    path = tmp_path_factory.mktemp("init") / "backbone.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("r18").state_dict(), path)
    return path


def _check_aaface_run(out: Path, init: Path, lambda_fr: float, lambdas: dict) -> list:
    """Three stages of two steps each, the loss of eq. 4 logged, the backbone still the init weights."""
    records = train_records(out)
    assert [r["stage"] for r in records] == ["fr", "fr", "sb", "sb", "joint", "joint"]
    for r in records:
        assert ("loss_fr" in r) == (r["stage"] != "sb")
        assert ("loss_attr" in r) == (r["stage"] != "fr")
        if "loss_attr" in r:
            weighted = sum(w * r[f"loss_{n}"] for n, w in lambdas.items())
            assert r["loss_attr"] == pytest.approx(weighted, rel=1e-5)
        expected = lambda_fr * r.get("loss_fr", 0.0) + r.get("loss_attr", 0.0)
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    # model.pt rebuilds the AAFace network in its last stage, its frozen backbone as init_weights gave it.
    from trainer.model_io.load import load_backbone

    model = load_backbone(out / ckpt.MODEL_FILE)
    assert model.stage == "joint" and model.num_attributes == len(lambdas)
    assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    released = torch.load(init, weights_only=True)
    assert all(torch.equal(v, released[k]) for k, v in model.backbone.state_dict().items())
    assert "init_weights: " in (out / "training.log").read_text()
    return records


def test_aaface_mode_runs_its_three_stages_from_init_weights(data, tmp_path, iresnet18_weights, capsys):
    out = tmp_path / "aaface"
    n = steps_per_epoch(data)
    stages = (2 / n, 2 / n, 1 - 4 / n)  # two steps of each stage, then joint to the end of the epoch
    run("--config", "cpu_demo", "--data", str(data), "--output", str(out), *FAST, "mode=aaface",
        "network=aaface", 'network_kwargs={"base": "r18", "branch_channels": 32}', "channels_last=false",
        "max_steps=6", "num_epoch=1", f"aaface_stage_epochs={stages!r}", 'aaface_attributes=["masked"]',
        "aaface_lambdas=[1.0]", f"init_weights={iresnet18_weights}")
    _check_aaface_run(out, iresnet18_weights, 3.0, {"masked": 1.0})
    # Closed-set accuracy of the held-out images with the run's own classifier (its last checkpoint).
    from trainer.eval import __main__ as eval_cli

    assert eval_cli.main(["--checkpoint", str(out / ckpt.MODEL_FILE), "--data", str(data), "--holdout",
                          "--closed-set", "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (res["n"], res["classes"]) == (24 * 2, 24) and 0.0 <= res["acc"] <= 1.0


@pytest.fixture(scope="module")
def celeba_like(tmp_path_factory) -> Path:
    """8 glint24 people x 8 faces under unique file names, packed with the paper's five attributes from a
    file in CelebA's list_attr_celeba.txt format."""
    import shutil

    from tests._trainer_helpers import GLINT24

    root = tmp_path_factory.mktemp("celeba")
    rows = []
    for k, person in enumerate(sorted(p for p in GLINT24.iterdir() if p.is_dir())[:8]):
        (root / "img" / person.name).mkdir(parents=True)
        for j, f in enumerate(sorted(person.glob("*.png"))[:8]):
            name = f"{k * 8 + j + 1:06d}.png"
            shutil.copy(f, root / "img" / person.name / name)
            values = [k % 2, int(k == 3), j % 2, int(j % 3 == 0), int(k in (1, 5))]
            rows.append(name + "".join(f" {v * 2 - 1:2d}" for v in values))
    attrs = root / "list_attr_celeba.txt"
    attrs.write_text(f"{len(rows)}\nMale Bald Big_Nose Chubby Narrow_Eyes \n" + "\n".join(rows) + "\n")
    subprocess.run([PYTHON, "-m", "pipeline", "pack", str(root / "img"), "--out", str(root / "data"),
                    "--attributes", str(attrs), "--workers", "1", "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return root / "data"


def test_aaface_recipe_runs_on_the_cpu(celeba_like, tmp_path, iresnet18_weights):
    out = tmp_path / "recipe"
    n = steps_per_epoch(celeba_like)
    stages = (2 / n, 2 / n, 25 - 4 / n)  # the recipe's 25 epochs: two steps of each stage, then joint
    run("--config", "aaface_r50", "--data", str(celeba_like), "--output", str(out), *FAST,
        'network_kwargs={"base": "r18", "branch_channels": 32}', "max_steps=6",
        f"aaface_stage_epochs={stages!r}", f"init_weights={iresnet18_weights}")
    records = _check_aaface_run(out, iresnet18_weights, 3.0,
                                {"Male": 1.0, "Bald": 1.0, "Big_Nose": 0.5, "Chubby": 0.5, "Narrow_Eyes": 0.5})
    assert [r["lr"] for r in records] == pytest.approx([0.01] * 6)  # before the first step at epoch 4


def test_aaface_attribute_missing_from_the_data_is_a_one_line_error(data, tmp_path, capsys,
                                                                     iresnet18_weights):
    code = trainer_main.main(["--config", "cpu_demo", "--data", str(data), "--output", str(tmp_path), *FAST,
                              "mode=aaface", "network=aaface", 'network_kwargs={"base": "r18"}',
                              "num_epoch=20", f"init_weights={iresnet18_weights}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: aaface_attributes ['Male', 'Bald', 'Big_Nose', 'Chubby', 'Narrow_Eyes'] "
                              "are not in") and "label_fields" in err[-1]


def test_sst_fills_its_queue_and_resume_restores_it(data, tmp_path):
    args = ["--config", "sst_mbf", "--data", str(data), *FAST, "sst_queue_size=8", "warmup_epoch=0"]
    first = tmp_path / "first"
    run(*args, "--output", str(first), "max_steps=3", "save_every=2")
    records = train_records(first)
    assert [r["queue_filled"] for r in records] == [4, 8, 8]

    # Resume the step-2 checkpoint elsewhere: step 3 must repeat the first run's exactly, which needs
    # the queue, its identities and pointer, and the gallery network back as they were.
    resumed = tmp_path / "resumed"
    run(*args, "--output", str(resumed), "max_steps=3",
        "--resume", str(first / ckpt.CHECKPOINTS / ckpt.step_dir_name(2)))
    again = train_records(resumed)
    assert [r["step"] for r in again] == [3]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in records[2:]], rel=1e-4)

    def sst_state(run_dir: Path) -> dict:
        saved = torch.load(run_dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(3) / ckpt.TRAIN_STATE,
                           weights_only=False)
        return saved["replicated"]["head"]

    a, b = sst_state(first), sst_state(resumed)
    assert a.keys() == b.keys() and "prototypes.queue" in a and any(k.startswith("gallery.") for k in a)
    assert (a["prototypes.queue_ids"] >= 0).all() and int(a["prototypes.pointer"]) == 3 * 4 % 8
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_masked_recipe_trains_on_data_with_masked_copies(data, tmp_path):
    out = tmp_path / "ressanet_masked"
    # The recipe as it is (CosFace s=64 m=0.4 through Partial FC, SGD lr 0.05) on the CPU demo's small
    # backbone (MobileFaceNet at 56x56), long enough for the loss to fall well past its batch-to-batch spread.
    run("--config", "ressanet_masked", "--data", str(data), "--output", str(out), *FAST, "network=mbf",
        'network_kwargs={"scale": 1, "units": [1, 2, 3, 1], "resolution": 56}', "channels_last=True",
        "batch_size=32", "embedding_size=64", "warmup_epoch=0", "max_steps=40")
    cfg = json.loads((out / ckpt.CONFIG_FILE).read_text())
    assert (cfg["loss"], cfg["loss_kwargs"], cfg["optimizer"], cfg["lr"], cfg["mode"]) == \
        ("cosface", {"s": 64.0, "m": 0.4}, "sgd", 0.05, "standard")
    losses = [r["loss"] for r in train_records(out)]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 3.0, losses  # it learns
