"""Margin losses on hand-checkable cosines."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.config import load_config
from trainer.heads import build_margin_loss
from trainer.losses import ArcFace, CombinedMarginLoss, CosFace

F64 = torch.float64


def _cos(*rows):
    return torch.tensor(rows, dtype=F64)


def test_arcface_adds_the_angle_to_the_target_only():
    cos = _cos([0.5, 0.2, -0.3], [0.1, 0.9, 0.0])
    out = ArcFace(s=64.0, m=0.5)(cos, torch.tensor([0, 1]))
    expected = 64.0 * cos.clone()
    expected[0, 0] = 64.0 * math.cos(math.acos(0.5) + 0.5)
    expected[1, 1] = 64.0 * math.cos(math.acos(0.9) + 0.5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_cosface_subtracts_from_the_target_only():
    cos = _cos([0.5, 0.2], [0.1, 0.9])
    out = CosFace(s=64.0, m=0.4)(cos, torch.tensor([1, 1]))
    expected = 64.0 * _cos([0.5, 0.2 - 0.4], [0.1, 0.9 - 0.4])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_rows_whose_class_is_elsewhere_are_only_scaled():
    cos = _cos([0.5, 0.2], [0.1, 0.9], [0.3, 0.3])
    for loss in (ArcFace(), CosFace(), CombinedMarginLoss(64.0, 1.2, 0.3, 0.1)):
        out = loss(cos, torch.tensor([-1, 0, -1]))
        torch.testing.assert_close(out[[0, 2]], 64.0 * cos[[0, 2]])
        assert out[1, 0] < 64.0 * 0.1 and out[1, 1] == 64.0 * 0.9


def test_arcface_past_pi_falls_back_like_insightface():
    # theta = acos(-0.95) = 2.82 > pi - 0.5: cos(theta + m) would rise again; use cos - m sin m.
    out = ArcFace(64.0, 0.5)(_cos([-0.95, 0.0]), torch.tensor([0]))
    assert out[0, 0].item() == pytest.approx(64.0 * (-0.95 - 0.5 * math.sin(0.5)), rel=1e-12)


def test_target_logit_decreases_with_the_angle():
    theta = torch.linspace(0.0, math.pi, 2001, dtype=F64)
    cos = torch.cos(theta)
    for loss in (ArcFace(), CosFace(), CombinedMarginLoss(64.0, 1.35, 0.2, 0.1),
                 CombinedMarginLoss(64.0, 2.0, 0.0, 0.0), CombinedMarginLoss(64.0, 1.0, 0.3, 0.2)):
        target = loss.target_logit(cos)
        assert (target[1:] <= target[:-1] + 1e-12).all(), loss
        assert (target <= cos + 1e-12).all(), f"{loss} must never raise the target logit"


def test_general_combined_margin_is_continuous_at_its_fallback():
    loss = CombinedMarginLoss(64.0, 1.5, 0.3, 0.0)
    theta_t = (math.pi - 0.3) / 1.5
    near = torch.cos(torch.tensor([theta_t - 1e-7, theta_t + 1e-7], dtype=F64))
    a, b = loss.target_logit(near)
    assert abs(a.item() - b.item()) < 1e-5
    assert a.item() == pytest.approx(-1.0, abs=1e-5)


def test_combined_reduces_to_arcface_cosface_and_plain_softmax():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 5, generator=g, dtype=F64) * 2 - 1
    labels = torch.tensor([0, 4, -1, 2, 2, 1])
    torch.testing.assert_close(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)(cos, labels), ArcFace()(cos, labels))
    torch.testing.assert_close(CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)(cos, labels), CosFace()(cos, labels))
    torch.testing.assert_close(CombinedMarginLoss(30.0)(cos, labels), 30.0 * cos)
    both = CombinedMarginLoss(64.0, 1.0, 0.3, 0.2)(cos, labels)
    rows = torch.tensor([0, 1, 3, 4, 5])  # the rows of a class of this shard
    cols = labels[rows]
    expected = 64.0 * (torch.cos(torch.acos(cos[rows, cols]) + 0.3) - 0.2)
    torch.testing.assert_close(both[rows, cols], expected)
    # The trainer's default loss "combined" takes (m1, m2, m3) from margin_list and s from scale.
    cfg = load_config("cpu_demo", ["loss=combined", "margin_list=(1.0,0.5,0.0)", "scale=64.0"])
    torch.testing.assert_close(build_margin_loss(cfg, 5)(cos, labels), ArcFace()(cos, labels))


def test_arcface_gradient_is_the_margin_functions():
    # d/dc s*cos(acos(c) + m) = s * (cos m + c sin m / sqrt(1 - c^2))
    c = torch.tensor([[0.3, 0.1]], dtype=F64, requires_grad=True)
    ArcFace(64.0, 0.5)(c, torch.tensor([0]))[0, 0].backward()
    expected = 64.0 * (math.cos(0.5) + 0.3 * math.sin(0.5) / math.sqrt(1 - 0.09))
    assert c.grad[0, 0].item() == pytest.approx(expected, rel=1e-10)
    assert c.grad[0, 1].item() == 0.0


def test_gradients_stay_finite_at_cosine_one():
    for loss in (ArcFace(), CombinedMarginLoss(64.0, 1.35, 0.2, 0.1)):
        c = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0000001, 0.0]], requires_grad=True)
        out = loss(c, torch.tensor([0, 0, 0]))
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(c.grad).all(), loss


def test_easy_margin_leaves_obtuse_targets_alone():
    loss = ArcFace(64.0, 0.5, easy_margin=True)
    out = loss(_cos([-0.2, 0.1], [0.6, 0.1]), torch.tensor([0, 0]))
    assert out[0, 0].item() == pytest.approx(64.0 * -0.2)
    assert out[1, 0].item() == pytest.approx(64.0 * math.cos(math.acos(0.6) + 0.5))


def test_interclass_filtering_drops_hard_negatives_only():
    cos = _cos([0.8, 0.5, 0.1, 0.45], [0.2, 0.6, 0.7, 0.0], [0.9, 0.3, 0.2, 0.1])
    cos.requires_grad_(True)
    loss = CosFace(64.0, 0.4, interclass_filtering_threshold=0.4)
    out = loss(cos, torch.tensor([0, 1, -1]))
    expected = _cos(
        [0.4, 0.0, 0.1, 0.0],  # positive 0.8 kept (with margin); negatives 0.5 and 0.45 dropped
        [0.2, 0.2, 0.0, 0.0],  # positive 0.6 kept; negative 0.7 dropped
        [0.0, 0.3, 0.2, 0.1],  # no positive in this shard: every entry is a negative
    )
    torch.testing.assert_close(out.detach(), 64.0 * expected)
    out.sum().backward()
    dropped = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert (cos.grad[dropped] == 0).all() and (cos.grad[~dropped] == 64.0).all()


def test_inputs_are_not_modified_and_label_shapes():
    cos = _cos([0.5, 0.2], [0.1, 0.9])
    before = cos.clone()
    a = ArcFace()(cos, torch.tensor([[0], [1]]))  # [B, 1] labels as insightface passes them
    b = ArcFace()(cos, torch.tensor([0, 1]))
    assert torch.equal(cos, before) and torch.equal(a, b)
    assert ArcFace()(cos.float(), torch.tensor([0, 1])).dtype == torch.float32
    assert ArcFace()(cos.half(), torch.tensor([0, 1])).dtype == torch.float32


def test_empty_shard_and_bad_arguments():
    out = ArcFace()(torch.zeros(3, 0), torch.tensor([-1, -1, -1]))
    assert out.shape == (3, 0)
    with pytest.raises(ValueError):
        ArcFace()(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        CombinedMarginLoss(0.0)
    with pytest.raises(ValueError):
        CombinedMarginLoss(64.0, m2=4.0)
