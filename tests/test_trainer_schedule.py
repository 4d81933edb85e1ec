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


def test_sample_clock_continues_the_curve_on_another_world_size():
    """The issue's case: 2 ranks of 64 (global 128) killed at step 15 inside a 20-step warmup; resumed on
    1 rank of 64, the lr is the 2-rank run's at the same samples seen, not a restarted warmup."""
    from trainer.schedule import SampleClock

    epoch = 1280  # samples per epoch
    two = SampleClock(samples_per_step=128, samples_per_epoch=epoch)
    one = SampleClock(samples_per_step=64, samples_per_epoch=epoch)
    cfg = dict(lr=0.1, num_epoch=10, warmup_epoch=2, lr_schedule="cosine", lr_power=2.0, min_lr=0.0)
    s2, s1 = two.schedule(cfg), one.schedule(cfg)
    assert (s2.total_steps, s2.warmup_steps, s1.total_steps, s1.warmup_steps) == (100, 20, 200, 40)
    seen = 15 * 128
    assert s1.lr(one.position(seen)) == pytest.approx(s2.lr(two.position(seen)), rel=0.05)
    # the old clock (the step count) restarted the warmup: half the rate
    assert s1.lr(15) <= 0.5 * s2.lr(15)
    # past the warmup the curves agree exactly at every shared sample count
    for seen in range(40 * 64, 100 * 128, 128):
        assert s1.lr(one.position(seen)) == pytest.approx(s2.lr(two.position(seen)), rel=1e-12)
    assert one.epoch(seen) == two.epoch(seen) == seen / epoch


def test_sample_clock_steps_left():
    from trainer.schedule import SampleClock

    clock = SampleClock(samples_per_step=32, samples_per_epoch=320)
    assert clock.steps_left(0, 2) == 20
    assert clock.steps_left(10 * 32 + 16, 2) == 10  # a partial step still runs
    assert clock.steps_left(5000, 2) == 0
    with pytest.raises(ValueError):
        SampleClock(samples_per_step=0, samples_per_epoch=10)
