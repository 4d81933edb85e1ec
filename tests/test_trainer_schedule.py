"""Learning-rate schedule: warmup then poly / cosine, a pure function of the step."""

import pytest
import torch

from trainer.schedule import LRSchedule


def test_warmup_then_poly():
    s = LRSchedule(base_lr=0.1, total_steps=110, warmup_steps=10, kind="poly", power=2.0)
    assert s.lr(0) == pytest.approx(0.01)
    assert s.lr(9) == pytest.approx(0.1)
    assert s.lr(10) == pytest.approx(0.1)
    assert s.lr(60) == pytest.approx(0.1 * 0.5 ** 2)
    assert s.lr(110) == pytest.approx(0.0)
    assert s.lr(500) == pytest.approx(0.0)  # past the end stays at min_lr


def test_cosine_with_floor():
    s = LRSchedule(base_lr=1.0, total_steps=100, kind="cosine", min_lr=0.1)
    assert s.lr(0) == pytest.approx(1.0)
    assert s.lr(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr(100) == pytest.approx(0.1)
    values = [s.lr(i) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_apply_sets_every_group():
    p = torch.nn.Parameter(torch.zeros(1))
    opts = [torch.optim.SGD([p], lr=1.0), torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))],
                                                             "lr_scale": 0.5}], lr=1.0)]
    s = LRSchedule(base_lr=0.2, total_steps=10, kind="poly", power=1.0)
    lr = s.apply(opts, 5)
    assert lr == pytest.approx(0.1)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.1)
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("kw", [dict(kind="step"), dict(total_steps=0), dict(warmup_steps=20)])
def test_bad_schedules(kw):
    args = dict(base_lr=0.1, total_steps=10)
    args.update(kw)
    with pytest.raises(ValueError):
        LRSchedule(**args)
