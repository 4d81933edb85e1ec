"""Step decay (`lr_schedule = "step"`): the papers' rates at their step epochs, torch's MultiStepLR per epoch,
and the shipped recipes that use it."""
from __future__ import annotations

import pytest
import torch

from trainer.config import load_config
from trainer.schedule import LRSchedule, build_schedule

STEPS_PER_EPOCH = 7  # optimizer steps; milestones land on whole multiples of it


@pytest.mark.parametrize("config,lr,milestones,num_epoch", [
    ("facex_zoo_backbones", 0.1, (10, 13, 16), 18),   # FaceX-Zoo section 4: lr 0.1, /10 at 10, 13, 16 of 18
    ("sst_mbf", 0.1, (150, 200, 230), 250),           # FaceX-Zoo section 5.1 (SST): /10 at 150, 200, 230 of 250
    ("aaface_r50", 0.01, (4, 10, 17), 25),            # AAFace section 3: lr 0.01, steps at 4, 10, 17 of 25
])
def test_recipe_rates_at_the_step_epochs(config, lr, milestones, num_epoch):
    cfg = load_config(config)
    assert (cfg.lr_schedule, tuple(cfg.lr_steps), cfg.lr_gamma, cfg.num_epoch, cfg.lr) == (
        "step", milestones, 0.1, num_epoch, lr)
    s = build_schedule(cfg, STEPS_PER_EPOCH)
    assert s.total_steps == num_epoch * STEPS_PER_EPOCH
    assert s.lr(0) == pytest.approx(lr)
    for k, epoch in enumerate(milestones):
        first = epoch * STEPS_PER_EPOCH
        assert s.lr(first - 1) == pytest.approx(lr * 0.1 ** k), (epoch, "last step before the drop")
        assert s.lr(first) == pytest.approx(lr * 0.1 ** (k + 1)), (epoch, "first step of the epoch")
    assert s.lr(s.total_steps - 1) == pytest.approx(lr * 1e-3)


def test_equals_torch_multisteplr_stepped_per_epoch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[10, 13, 16], gamma=0.1)
    s = LRSchedule(0.1, 18 * 3, kind="step", milestones=(30, 39, 48), gamma=0.1)
    for epoch in range(18):
        for i in range(3):
            assert s.lr(epoch * 3 + i) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        ref.step()


def test_warmup_then_steps_count_from_the_start():
    s = build_schedule({"lr": 1.0, "num_epoch": 10, "warmup_epoch": 1.0, "lr_schedule": "step", "lr_power": 2.0,
                        "min_lr": 0.0, "lr_steps": (5,), "lr_gamma": 0.5}, steps_per_epoch=4)
    assert [s.lr(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s.lr(19) == 1.0 and s.lr(20) == 0.5 and s.lr(39) == 0.5
    # fractional steps per epoch (gradient accumulation): the milestone rounds to the nearest step
    assert build_schedule({"lr": 1.0, "num_epoch": 10, "warmup_epoch": 0.0, "lr_schedule": "step",
                           "lr_power": 2.0, "min_lr": 0.0, "lr_steps": (5,), "lr_gamma": 0.1},
                          2.5).milestones == (12,)


def test_other_kinds_ignore_lr_steps():
    cfg = {"lr": 1.0, "num_epoch": 10, "warmup_epoch": 0.0, "lr_schedule": "cosine", "lr_power": 2.0,
           "min_lr": 0.0, "lr_steps": (5,), "lr_gamma": 0.1}
    s = build_schedule(cfg, 10)
    assert s.milestones == () and s.lr(50) == pytest.approx(0.5)


@pytest.mark.parametrize("kw,match", [
    (dict(milestones=()), "needs lr_steps"),
    (dict(milestones=(5, 3)), "increasing"),
    (dict(milestones=(0, 3)), "increasing and positive"),
    (dict(milestones=(3,), gamma=1.5), "lr_gamma"),
])
def test_bad_step_schedules(kw, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(0.1, 100, kind="step", **kw)


def test_lr_steps_outside_the_run_are_refused():
    cfg = load_config("facex_zoo_backbones", ["lr_steps=10,13,18"])
    assert cfg.lr_steps == (10, 13, 18)
    with pytest.raises(ValueError, match="not inside"):
        build_schedule(cfg, 10)
