"""The linear classifier head (trainer/heads/linear.py) and the class-weighted cross-entropy
(`class_weighted_ce`, trainer/class_weights.py) of Partial FC."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests._eval_helpers import face_folder, run_module
from tests._trainer_helpers import train_records
from trainer import main as trainer_main
from trainer.class_weights import class_counts, inverse_frequency_weights
from trainer.eval.closed_set import closed_set_accuracy, load_classifier
from trainer.heads import build_head
from trainer.partial_fc import DistSoftmaxCrossEntropy, PartialFC

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_weighted_cross_entropy_is_torchs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 4, 2, 1])
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    mine = DistSoftmaxCrossEntropy()(a, labels, weight[labels])
    ref = F.cross_entropy(b, labels, weight=weight)
    mine.backward()
    ref.backward()
    assert mine.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)
    # unweighted: the plain mean
    assert DistSoftmaxCrossEntropy()(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-12)


def test_partial_fc_with_the_linear_head_is_a_weighted_linear_classifier():
    num_classes, dim = 7, 4
    weight = torch.rand(num_classes, dtype=torch.float64) + 0.1
    pfc = PartialFC(build_head("linear", num_classes=num_classes), dim, num_classes,
                    class_weight=weight, init_std=0.5).double()
    with torch.no_grad():
        pfc.margin_loss.bias.copy_(torch.linspace(-1, 1, num_classes, dtype=torch.float64))
    x = torch.randn(9, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1, 1])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = pfc.weight.detach().clone().requires_grad_()
    b = pfc.margin_loss.bias.detach().clone().requires_grad_()
    loss = pfc(xa, labels)
    ref = F.cross_entropy(F.linear(xb, w, b), labels, weight=pfc.class_weight)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(pfc.weight.grad, w.grad, atol=1e-10)
    assert torch.allclose(pfc.margin_loss.bias.grad, b.grad, atol=1e-10)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-10)
    # the unnormalised embedding matters (a cosine classifier would not see its scale)
    assert pfc(2 * x, labels).item() != pytest.approx(loss.item())


def test_the_linear_head_refuses_sampling_and_bad_weights():
    with pytest.raises(ValueError, match="needs sample_rate 1"):
        PartialFC(build_head("linear", num_classes=10), 4, 10, sample_rate=0.5)
    with pytest.raises(ValueError, match="class_weight must be 10"):
        PartialFC(build_head("linear", num_classes=10), 4, 10, class_weight=torch.ones(9))


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(np.array([1, 3, 0, 4]))
    # N = 8, C = 3 classes with images: w_c = 8 / (3 n_c); an empty class 0; the mean weight of an image is 1
    assert w.tolist() == pytest.approx([8 / 3, 8 / 9, 0.0, 2 / 3])
    assert float((w * torch.tensor([1, 3, 0, 4])).sum()) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        inverse_frequency_weights(np.zeros(3))


def test_closed_set_with_a_bias():
    weight = np.eye(3, dtype=np.float32)
    emb = np.array([[1.0, 0.9, 0.0], [0.2, 0.0, 0.1]], np.float32)
    # cosine: classes 0 and 0; W x + b with a bias for class 1 and 2: 1 and 2
    bias = np.array([0.0, 0.2, 0.2], np.float32)
    assert closed_set_accuracy(emb, np.array([1, 2]), weight)["acc"] == 0.0
    assert closed_set_accuracy(emb, np.array([1, 2]), weight, bias)["acc"] == 1.0


def test_a_class_weighted_linear_run(glint24, tmp_path):
    faces = face_folder(glint24, tmp_path / "faces", identities=3, per_identity=6)
    # an unbalanced set: identity 0 loses 4 of its 6 images
    for p in sorted((faces / sorted(q.name for q in faces.iterdir())[0]).iterdir())[:4]:
        p.unlink()
    data = tmp_path / "data"
    run_module("pipeline", "pack", str(faces), "--out", str(data), "--workers", "1", "--no-progress")
    counts = class_counts(data)
    assert sorted(counts.tolist()) == [2, 6, 6]
    out = tmp_path / "run"
    assert trainer_main.main(["--config", "cpu_demo", "--data", str(data), "--output", str(out),
                              "batch_size=4", "max_steps=3", "frequent=1", "loss=linear",
                              "class_weighted_ce=true", "progress_bar=false", "tensorboard=false",
                              "num_threads=0", "val_targets=[]"]) == 0
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    weight, bias = load_classifier(str(out / "model.pt"))
    assert weight.shape[0] == 3 and bias is not None and bias.shape == (3,) and np.any(bias != 0)
    # a resume puts the bias (a per-class head state) back: with lr 0 the next step leaves it as saved
    assert trainer_main.main(["--config", "cpu_demo", "--data", str(data), "--output", str(out),
                              "--allow-config-change", "batch_size=4", "max_steps=4", "frequent=1", "loss=linear",
                              "class_weighted_ce=true", "progress_bar=false", "tensorboard=false",
                              "num_threads=0", "val_targets=[]", "lr=0"]) == 0
    assert "resumed from" in (out / "training.log").read_text()
    _, resumed_bias = load_classifier(str(out / "model.pt"))
    assert np.array_equal(resumed_bias, bias)
