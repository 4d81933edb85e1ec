"""Host syncs of one optimizer step (issue I item 10), counted on the CPU through a proxy: every Python-level
call that reads a tensor's value back to the host on a GPU (item, tolist, bool/int/float, nonzero, unique,
masked_select, boolean-mask indexing, coalesce) inside `train_step`, the optimizers' steps included.

Budget: one per optimizer step at sample_rate 1.0, two below it (the accumulated sparse gradient's
coalesce), for the trainer's GPU recipes' loss (ArcFace / CosFace through CombinedMarginLoss), fp16's
GradScaler included; for every registered head (trainer.heads) and for LVFace's Partial FC in both of
its stages."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from tests._trainer_helpers import TinyNet
from trainer.config import Config
from trainer.heads import available_heads, build_head
from trainer.losses import ArcFace, CosFace
from trainer.modes.lvface import LVFaceCurriculum, build_lvface_partial_fc
from trainer.optim import build_optimizer
from trainer.partial_fc import PartialFC
from trainer.step import train_step

_READS = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                                            "nonzero", "unique", "coalesce", "masked_select")]
_READS += [(torch, name) for name in ("nonzero", "unique", "masked_select")]


@contextlib.contextmanager
def count_host_reads(host_tensors=()):
    """`host_tensors`: tensors that stay on the CPU in a GPU run too (torch's optimizers keep their `step`
    counts there unless capturable / fused): reading them costs no sync."""
    counts: collections.Counter = collections.Counter()
    saved = []
    exempt = {id(t) for t in host_tensors}

    def wrap(owner, name, fn):
        def counted(*args, **kwargs):
            if not (args and id(args[0]) in exempt):
                counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    def indexing(fn, name):
        def counted(self, index, *rest):
            parts = index if isinstance(index, tuple) else (index,)
            if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
                counts[name] += 1  # a boolean mask's result size is data-dependent
            return fn(self, index, *rest)
        return counted

    for owner, name in _READS:
        fn = getattr(owner, name)
        saved.append((owner, name, fn))
        setattr(owner, name, wrap(owner, name, fn))
    for name in ("__getitem__", "__setitem__"):
        fn = getattr(torch.Tensor, name)
        saved.append((torch.Tensor, name, fn))
        setattr(torch.Tensor, name, indexing(fn, name))
    try:
        yield counts
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _setup(rate: float, loss, optimizer: str, pfc=None):
    torch.manual_seed(0)
    net = TinyNet()
    pfc = PartialFC(loss, 16, 200, sample_rate=rate, seed=1) if pfc is None else pfc
    cfg = Config(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-8)
    opts = [build_optimizer(cfg, net.parameters()), build_optimizer(cfg, pfc.parameters(), row_sparse=True)]
    return net, pfc, opts


def _batches(n: int, step: int):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 200, (8,), generator=g)) for _ in range(n)]


def _assert_steps_within_budget(net, pfc, opts, accumulation: int, budget, scaler=None,
                                 before_step=lambda step: None) -> None:
    """`budget`: an int, or a function of the step's Partial FC (its sample rate may change)."""
    before_step(0)
    train_step(net, pfc, _batches(accumulation, 0), opts, scaler, None, 5.0)  # lazy state made here
    host = [s["step"] for opt in opts if type(opt).__module__.startswith("torch.optim")
            for s in opt.state.values() if "step" in s]
    for step in range(1, 3):
        before_step(step)
        with count_host_reads(host) as counts:
            result = train_step(net, pfc, _batches(accumulation, step), opts, scaler, None, 5.0)
        assert not result.skipped
        limit = budget(pfc) if callable(budget) else budget
        assert sum(counts.values()) <= limit, (step, dict(counts))


@pytest.mark.parametrize("rate, accumulation, budget", [(1.0, 1, 1), (1.0, 2, 1), (0.5, 1, 1), (0.5, 2, 2)])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("fp16", [False, True])
def test_one_step_reads_the_device_at_most_budget_times(rate, accumulation, budget, optimizer, fp16):
    net, pfc, opts = _setup(rate, ArcFace(), optimizer)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1) if fp16 else None
    _assert_steps_within_budget(net, pfc, opts, accumulation, budget, scaler)


@pytest.mark.parametrize("rate, accumulation, budget", [(1.0, 2, 1), (0.5, 2, 2)])
@pytest.mark.parametrize("name", available_heads())
def test_every_head_reads_the_device_at_most_budget_times(name, rate, accumulation, budget):
    head = build_head(name, num_classes=200)
    if getattr(head, "needs_raw_logits", False) and rate < 1:
        pytest.skip(f"{name} trains every class row (its bias), so only at sample_rate 1")
    net, pfc, opts = _setup(rate, head, "sgd")
    _assert_steps_within_budget(net, pfc, opts, accumulation, budget)


@pytest.mark.parametrize("rate", [1.0, 0.5])
@pytest.mark.parametrize("switch_epoch", [0.0, 2.0])
def test_lvface_reads_the_device_at_most_budget_times(switch_epoch, rate):
    """Both stages: NCS (negatives sampled at `rate`) before `switch_epoch`, then EPL (every class, centres
    mixed with the class means); switch_epoch 2.0 counts an NCS step, then the first EPL step."""
    pfc = build_lvface_partial_fc(16, 200, ncs_sample_rate=rate, seed=1)
    net, pfc, opts = _setup(rate, None, "adamw", pfc)
    curriculum = LVFaceCurriculum(switch_epoch, rate)
    stages = []

    def before_step(step: int) -> None:
        stages.append(curriculum.apply(pfc, float(step)))

    _assert_steps_within_budget(net, pfc, opts, 2, lambda p: 1 if p.sample_rate == 1.0 else 2,
                                before_step=before_step)
    assert stages == (["epl"] * 3 if switch_epoch == 0 else ["ncs", "ncs", "epl"])
    assert pfc.margin_loss.class_seen.any()


def test_cosface_and_the_counter_itself():
    net, pfc, opts = _setup(1.0, CosFace(), "sgd")
    with count_host_reads() as counts:
        train_step(net, pfc, _batches(1, 0), opts, None, None, 5.0)
        x = torch.arange(4)
        x[x > 1].tolist()
    assert counts["tolist"] == 2 and counts["__getitem__"] == 1
    assert sum(counts.values()) == 3, dict(counts)
