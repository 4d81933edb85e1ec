"""trainer/eval/attributes.py: per-attribute accuracy (AAFace's Table 1), by hand and from the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests._eval_helpers import face_folder, run_module
from trainer.eval import __main__ as eval_cli
from trainer.eval.attributes import attribute_accuracy


def test_accuracy_per_attribute_by_hand():
    logits = np.array([[2.0, -1.0, 0.5], [-0.5, 3.0, 0.1], [1.0, 0.2, -2.0], [-3.0, -0.1, 4.0]])
    targets = np.array([[1, 0, -1], [1, 1, np.nan], [1, 0, -1], [0, 0, -1]], dtype=float)
    res = attribute_accuracy(logits, targets, ["Male", "Bald", "Chubby"])
    # Male: right, wrong, right, right; Bald: right, right, wrong, right; Chubby: no known label.
    assert res["attributes"]["Male"] == {"acc": 0.75, "n": 4, "positive_rate": 0.75}
    assert res["attributes"]["Bald"] == {"acc": 0.75, "n": 4, "positive_rate": 0.25}
    assert res["attributes"]["Chubby"] == {"acc": None, "n": 0, "positive_rate": None}
    assert res["mean_acc"] == 0.75
    half = attribute_accuracy(logits[:, :2], np.array([[0, -1], [0, 1], [-1, 0], [0, -1]], float), ["a", "b"])
    assert half["attributes"]["a"]["acc"] == pytest.approx(2 / 3) and half["attributes"]["b"]["acc"] == 0.5


@pytest.fixture(scope="module")
def attribute_data(glint24, tmp_path_factory):
    """4 glint24 people x 6 faces, 3 held out each, with attributes A (the first two people) and B (every
    third image; unknown for the fourth person)."""
    root = tmp_path_factory.mktemp("attr")
    faces = face_folder(glint24, root / "faces", identities=4, per_identity=6)
    rows = ["path\tA\tB"]
    for k, person in enumerate(sorted(p for p in faces.iterdir())):
        for j, f in enumerate(sorted(person.glob("*.png"))):
            rows.append(f"{person.name}/{f.name}\t{int(k < 2)}\t{'' if k == 3 else int(j % 3 == 0)}")
    (root / "attrs.tsv").write_text("\n".join(rows) + "\n")
    data = root / "data"
    run_module("pipeline", "pack", str(faces), "--out", str(data), "--holdout", "3", "--attributes",
               str(root / "attrs.tsv"), "--workers", "1", "--no-progress")
    return data


def _constant_aaface(path, bias) -> None:
    """An AAFace model.pt whose attribute logits are the constant `bias` (A always yes, B always no)."""
    from trainer.backbones import build_backbone
    from trainer.checkpoint import save_model

    kwargs = {"base": "r18", "embedding_size": 16, "branch_channels": 16, "num_attributes": 2}
    net = build_backbone("aaface", **kwargs)
    with torch.no_grad():
        net.sb_classifier.weight.zero_()
        net.sb_classifier.bias.copy_(torch.tensor(bias))
    save_model(path, net, "aaface", kwargs, extra={"config": {"aaface_attributes": ["A", "B"]}})


def test_attribute_eval_on_held_out_records(attribute_data, tmp_path, capsys):
    from pipeline.dataset import PackedDataset

    ckpt = tmp_path / "model.pt"
    _constant_aaface(ckpt, [1.0, -1.0])
    assert eval_cli.main(["--checkpoint", str(ckpt), "--data", str(attribute_data), "--holdout", "--attributes",
                          "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    held = PackedDataset(attribute_data, holdout=True, raw=True, return_label_vector=True)
    vectors = np.stack([held[i][2] for i in range(len(held))])
    assert res["images"] == len(held) == 12 and res["holdout"]
    a, b = vectors[:, 1], vectors[:, 2]
    # Always "yes" is right on the positives of A; always "no" on the negatives of B, unknowns not counted.
    assert res["attributes"]["A"] == {"acc": 0.5, "n": 12, "positive_rate": 0.5}
    assert res["attributes"]["B"]["n"] == int((b >= 0).sum()) == 9
    assert res["attributes"]["B"]["acc"] == pytest.approx(float((b[b >= 0] == 0).mean()))
    assert a.mean() == 0.5
    # Named explicitly, in another order: the label columns follow the names.
    _constant_aaface(ckpt, [-1.0, 1.0])
    assert eval_cli.main(["--checkpoint", str(ckpt), "--data", str(attribute_data), "--holdout", "--attributes",
                          "B,A", "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    swapped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert swapped["attributes"]["A"]["acc"] == 0.5 and swapped["attributes"]["B"] == res["attributes"]["B"]
    # An attribute the data does not have: a one-line error.
    assert eval_cli.main(["--checkpoint", str(ckpt), "--data", str(attribute_data), "--attributes", "Bald,A",
                          "--device", "cpu", "--workers", "0", "--no-progress"]) == 2
    assert "['Bald'] are not in its label_fields" in capsys.readouterr().err
