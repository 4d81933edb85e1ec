"""python -m trainer.eval and python -m trainer.eval.embed on a small real pack of glint24 (with masked copies
added as maskgen lays them out), with a real backbone."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests._eval_helpers import add_masked_shard, face_folder, last_json, run_module, save_model
from trainer.eval import __main__ as eval_cli
from trainer.eval import embed as embed_cli
from trainer.eval.pairs import verify
from trainer.eval.targets import load_bin
from trainer.model_io.load import load_backbone

IDS, PER_ID, HOLDOUT = 6, 6, 2
TRAIN = IDS * (PER_ID - HOLDOUT)  # 24 unmasked train images, 4 per identity


@pytest.fixture(scope="module")
def work(glint24, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    faces = face_folder(glint24, root / "faces", IDS, PER_ID)
    data = root / "data"
    run_module("pipeline", "pack", str(faces), "--out", str(data), "--holdout", str(HOLDOUT),
               "--workers", "1", "--no-progress")
    masked = root / "masked"
    shutil.copytree(data, masked)
    copies = add_masked_shard(masked, every=2)
    return {"root": root, "data": data, "masked": masked, "copies": copies,
            "a": save_model(root / "a.pt", seed=1), "b": save_model(root / "b.pt", seed=2)}


def _eval(capsys, *argv) -> tuple[int, list[str], str]:
    code = eval_cli.main([*argv, "--no-progress", "--workers", "0"])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


@pytest.mark.slow
def test_pairs_bin_through_the_command_line(work):
    pairs = work["data"] / "holdout_pairs.bin"
    proc = run_module("trainer.eval", "--checkpoint", str(work["a"]), "--pairs", str(pairs), "--no-progress")
    result = last_json(proc.stdout)
    assert result["pairs"] == IDS * 2  # one genuine pair per identity, as many impostors
    assert set(result["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
    assert 0.0 <= result["acc"] <= 1.0 and result["std"] >= 0.0
    assert result["network"] == "mbf" and result["flip"] is True
    # The command reports what the library computes.
    ref = verify(load_backbone(work["a"]), load_bin(pairs), "cpu")
    assert result["acc"] == pytest.approx(ref.kfold.acc) and result["std"] == pytest.approx(ref.kfold.std)


@pytest.mark.slow
def test_masked_probe_protocol_counts_every_pair(work, capsys):
    code, lines, err = _eval(capsys, "--checkpoint", str(work["a"]), "--data", str(work["masked"]),
                             "--masked-probe", "--cmc", "--max-rank", "3")
    assert code == 0, err
    r = json.loads(lines[-1])
    assert r["protocol"] == "masked" and r["images"] == TRAIN + len(work["copies"])
    assert set(r["subsets"]) == {"unmasked", "masked", "masked/surgical", "masked/kn95"}
    per_id = PER_ID - HOLDOUT
    u = r["subsets"]["unmasked"]
    assert (u["pairs"], u["genuine"]) == (TRAIN * (TRAIN - 1) // 2, IDS * per_id * (per_id - 1) // 2)
    assert u["cmc_pairs"] == IDS * per_id * (per_id - 1)  # ordered (probe, mate) pairs
    n_masked = len(work["copies"])
    m = r["subsets"]["masked"]
    # Every masked probe against every unmasked image, except its own source photo.
    assert (m["pairs"], m["genuine"]) == (n_masked * TRAIN - n_masked, n_masked * (per_id - 1))
    assert m["cmc_pairs"] == m["genuine"] and len(m["cmc"]) == 3
    for t, name in ((1, "surgical"), (2, "kn95")):
        n_t = sum(c["mask_type"] == t for c in work["copies"])
        s = r["subsets"][f"masked/{name}"]
        assert (s["pairs"], s["genuine"]) == (n_t * TRAIN - n_t, n_t * (per_id - 1))
    assert r["pairs"] == m["pairs"] and r["acc"] == m["acc"]  # the top level is the masked protocol


@pytest.mark.slow
def test_compare_checkpoints_table_and_plots(work, capsys):
    out = work["root"] / "cmp" / "result.json"
    out.parent.mkdir()
    table = work["root"] / "cmp" / "table.md"
    code, lines, err = _eval(capsys, "--checkpoint", str(work["a"]), str(work["b"]), "--pairs",
                             str(work["data"] / "holdout_pairs.bin"), "--output", str(out),
                             "--table", str(table))
    assert code == 0, err
    a, b = (json.loads(line) for line in lines[-2:])
    assert (a["checkpoint"], b["checkpoint"]) == (str(work["a"]), str(work["b"]))
    assert a["acc"] != b["acc"] or a["tar_at_far"] != b["tar_at_far"] or a["xnorm"] != b["xnorm"]
    saved = json.loads(out.read_text())["results"]
    assert saved == [a, b]
    rows = [line for line in table.read_text().splitlines() if line.startswith(f"| {work['root']}")]
    assert len(rows) == 2 and f"{100 * a['acc']:.2f} ± {100 * a['std']:.2f}" in rows[0]
    png = out.parent / "result.roc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_embed_folder_then_use_it_as_distractors(work, glint24, capsys, tmp_path):
    # Three people who are not in the pack, two images each.
    others = tmp_path / "others"
    others.mkdir()
    for p in sorted(face_folder(glint24, tmp_path / "all", IDS + 3, 2).iterdir())[IDS:]:
        shutil.move(str(p), others / p.name)
    (others / "broken.png").write_bytes(b"\x89PNG not really")
    npz = tmp_path / "distractors.npz"
    assert embed_cli.main(["--checkpoint", str(work["a"]), "--images", str(others), "--out", str(npz),
                           "--workers", "0", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 6 and summary["skipped"] == 1
    z = np.load(npz)
    assert z["embeddings"].shape == (6, 64)
    assert np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, atol=1e-5)
    assert z["labels"].tolist() == [0, 0, 1, 1, 2, 2] and len(z["classes"]) == 3
    assert str(z["skipped"][0]).startswith("broken.png\t")

    code, lines, err = _eval(capsys, "--checkpoint", str(work["a"]), "--data", str(work["data"]), "--cmc",
                             "--distractors", str(npz), "--max-rank", "2")
    assert code == 0, err
    r = json.loads(lines[-1])
    assert r["distractors"] == 6 and len(r["cmc"]) == 2 and r["cmc"][0] <= r["cmc"][1]
    # Embeddings of another model are refused.
    code, _, err = _eval(capsys, "--checkpoint", str(work["b"]), "--data", str(work["data"]), "--cmc",
                         "--distractors", str(npz))
    assert code == 2 and "another checkpoint" in err


def test_usage_errors_exit_2_in_one_line(work, capsys):
    cases = [
        (["--pairs", str(work["data"] / "holdout_pairs.bin"), "--cmc"], "need --data"),
        (["--data", str(work["data"]), "--masked-probe"], "no masked records"),
        (["--pairs", str(work["root"] / "nothing.bin")], "no such file"),
        (["--data", str(work["root"] / "faces")], "manifest.json"),
    ]
    for argv, message in cases:
        code, lines, err = _eval(capsys, "--checkpoint", str(work["a"]), *argv)
        assert code == 2, argv
        assert err.strip().count("\n") == 0 and message in err, err


@pytest.mark.slow
def test_masked_probes_on_a_pairs_pack(work, capsys):
    code, lines, err = _eval(capsys, "--checkpoint", str(work["a"]), "--pairs",
                             str(work["data"] / "holdout_pairs.bin"), "--masked-probe", "--mask-mode", "2d")
    assert code == 0, err
    r = json.loads(lines[-1])
    assert r["masked_probe"] is True and r["mask_failures"] == 0
    assert r["target"] == "holdout_pairs_masked_probe"
    assert r["pairs"] == IDS * 2


@pytest.mark.slow
def test_headline_on_an_imbalanced_set_is_tar_and_balanced_accuracy_with_the_counts(work, capsys):
    table = work["root"] / "headline.md"
    code, lines, err = _eval(capsys, "--checkpoint", str(work["a"]), "--data", str(work["data"]), "--holdout",
                             "--name", "glint-holdout", "--headline-far", "1e-2", "--table", str(table))
    assert code == 0, err
    r = json.loads(lines[-1])
    n = IDS * HOLDOUT
    genuine, impostor = IDS * HOLDOUT * (HOLDOUT - 1) // 2, n * (n - 1) // 2 - IDS * HOLDOUT * (HOLDOUT - 1) // 2
    assert (r["genuine"], r["impostor"], r["pairs"]) == (genuine, impostor, genuine + impostor)
    assert r["majority_acc"] == pytest.approx(impostor / (genuine + impostor))
    assert 0.0 <= r["balanced_acc"] <= 1.0 and set(r) >= {"acc", "std", "tar_at_far", "balanced_std"}
    assert r["target"] == "glint-holdout" and r["headline_far"] == "1e-2"
    assert "1e-2" in r["tar_at_far"]
    # The headline on stderr: TAR at the stated FAR, balanced accuracy and both counts on one line. With 60
    # impostor pairs a FAR of 1e-2 cannot be measured, and the line says so.
    head = [line for line in err.splitlines() if line.startswith("glint-holdout: ")]
    assert len(head) == 1
    assert "TAR@FAR=1e-2 n/a (needs 100 impostor pairs)" in head[0]
    assert f"balanced acc {100 * r['balanced_acc']:.2f}%" in head[0]
    assert f"{genuine} genuine / {impostor} impostor pairs" in head[0]
    header, _, row = table.read_text().splitlines()[:3]
    assert header.startswith("| checkpoint | set | genuine | impostor | TAR@FAR=1e-2 (%) | balanced acc (%)")
    assert f"| glint-holdout unmasked | {genuine} | {impostor} | - | {100 * r['balanced_acc']:.2f} |" in row


@pytest.mark.slow
def test_embed_follows_symlinked_folders(work, capsys, tmp_path):
    person = sorted(p for p in (work["root"] / "faces").iterdir() if p.is_dir())[0]
    images = tmp_path / "images"
    images.mkdir()
    (images / "someone").symlink_to(person, target_is_directory=True)
    (images / "loop").symlink_to(images, target_is_directory=True)  # walked once, not forever
    npz = tmp_path / "e.npz"
    assert embed_cli.main(["--checkpoint", str(work["a"]), "--images", str(images), "--out", str(npz),
                           "--workers", "0", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == len(list(person.iterdir())) == PER_ID
    assert np.load(npz)["classes"].tolist() == ["someone"]


def test_embed_fails_when_every_image_is_skipped(work, capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"\x89PNG not really")
    npz = tmp_path / "e.npz"
    assert embed_cli.main(["--checkpoint", str(work["a"]), "--images", str(images), "--out", str(npz),
                           "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none of its 3 images could be used" in err and err.strip().count("\n") == 0
    assert not npz.exists()


def test_headline_line_names_far_balanced_accuracy_counts_and_the_majority_baseline():
    r = {"target": "lfw", "tar_at_far": {"1e-3": 0.5}, "genuine": 240, "impostor": 6900, "balanced_acc": 0.7,
         "acc": 0.969, "majority_acc": 6900 / 7140}
    assert eval_cli.headline(r, 1e-3) == ("lfw: TAR@FAR=1e-3 50.00%, balanced acc 70.00% on 240 genuine / 6900 "
                                          "impostor pairs (acc 96.90%; always the commoner answer: 96.64%)")
    none = {**r, "genuine": 0, "tar_at_far": {"1e-3": None}, "balanced_acc": None}
    assert "TAR@FAR=1e-3 n/a, balanced acc n/a on 0 genuine" in eval_cli.headline(none, 1e-3)
