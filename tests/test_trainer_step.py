"""One optimizer step (trainer.step.train_step): accumulation, world-size invariance, non-finite skipping.

The backbone here has no BatchNorm, so the exact same update is expected whether a global batch is one
batch on one rank, two accumulated micro batches, or split over 2 or 3 ranks (uneven class shards).
"""
from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests._trainer_helpers import TinyNet, free_port
from trainer.config import Config
from trainer.distributed import gather_to
from trainer.losses import CombinedMarginLoss
from trainer.optim import build_optimizer
from trainer.partial_fc import PartialFC
from trainer.step import train_step

NUM_CLASSES = 10
GLOBAL_BATCH = 12
STEPS = 3


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)
    return images, torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)


def _run(rank: int, world: int, accumulation: int, optimizer: str, nan_step: int = -1,
         nan_rank: int = 0) -> dict:
    """STEPS optimizer steps; returns the backbone's and the whole classifier's weights (on rank 0)."""
    torch.manual_seed(0)
    cfg = Config(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-8)
    net = TinyNet()
    backbone = DistributedDataParallel(net) if world > 1 else net
    pfc = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.3, 0.0), 16, NUM_CLASSES, embedding_grad_scale=world,
                    seed=3)
    opts = [build_optimizer(cfg, net.parameters()), build_optimizer(cfg, pfc.parameters(), row_sparse=True)]
    per_rank = GLOBAL_BATCH // world
    results = []
    for step in range(STEPS):
        images, labels = _data(step)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        images, labels = images[mine], labels[mine]
        if step == nan_step and rank == nan_rank:
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        micro = per_rank // accumulation
        parts = [slice(i * micro, (i + 1) * micro) for i in range(accumulation)]
        batches = [(images[p], labels[p]) for p in parts]
        results.append(train_step(backbone, pfc, batches, opts, None, None, clip_grad_norm=0.0))
    full = gather_to(pfc.weight.detach())
    return {"backbone": {k: v.clone() for k, v in net.state_dict().items()}, "fc": full, "results": results}


def _worker(rank: int, world: int, port: int, kwargs: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = _run(rank, world, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory tensors that die with this process
        queue.put((rank, buf.getvalue()))
    finally:
        dist.destroy_process_group()


def run_world(world: int, **kwargs) -> dict:
    if world == 1:
        return _run(0, 1, **kwargs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, kwargs, queue)) for r in range(world)]
    for p in procs:
        p.start()
    received = [queue.get(timeout=120) for _ in procs]
    outs = {r: torch.load(io.BytesIO(b), weights_only=False) for r, b in received}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # every rank holds the same backbone after the step
    for r in range(1, world):
        for k, v in outs[0]["backbone"].items():
            torch.testing.assert_close(outs[r]["backbone"][k], v, rtol=0, atol=0)
        assert [x.skipped for x in outs[r]["results"]] == [x.skipped for x in outs[0]["results"]]
    return outs[0]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    # Summing the micro batches (or ranks) in another order moves every element by a few ulps of the
    # tensor's largest summands, not of the element itself: the absolute tolerance scales with the tensor
    # (the classifier's rows reach ~14, where one float32 ulp is 1e-6; 2e-6 absolute failed on AVX-512).
    scale = max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=f"{what}: max abs diff {diff:.3g} at scale {scale:.3g}")


def _assert_same(a: dict, b: dict, tol: float = 2e-6) -> None:
    for k, v in a["backbone"].items():
        _close(b["backbone"][k], v, tol, f"backbone {k}")
    _close(b["fc"], a["fc"], tol, "classifier")
    for x, y in zip(a["results"], b["results"]):
        assert y.loss == pytest.approx(x.loss, rel=1e-5, nan_ok=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_averages(optimizer):
    one = run_world(1, accumulation=1, optimizer=optimizer)
    acc = run_world(1, accumulation=3, optimizer=optimizer)
    # Adam divides by sqrt(v): float noise in tiny gradients shows up a little larger
    _assert_same(one, acc, tol=2e-6 if optimizer == "sgd" else 1e-5)
    assert not any(r.skipped for r in one["results"])
    # and the step did move the weights
    assert not torch.equal(TinyNet().fc1.weight, one["backbone"]["fc1.weight"])


@pytest.mark.slow
def test_same_update_on_1_2_3_ranks_and_nan_on_one_rank_skips_everywhere():
    """DDP + Partial FC give the gradient of the global mean loss whatever the world size; a NaN on the
    last rank's input in the last step makes every rank skip that step (checked in run_world)."""
    ref = run_world(1, accumulation=1, optimizer="sgd", nan_step=STEPS - 1)
    assert [r.skipped for r in ref["results"]] == [False] * (STEPS - 1) + [True]
    two = run_world(2, accumulation=2, optimizer="sgd", nan_step=STEPS - 1, nan_rank=1)
    _assert_same(ref, two)
    three = run_world(3, accumulation=2, optimizer="sgd", nan_step=STEPS - 1, nan_rank=2)  # shards 4, 3, 3
    _assert_same(ref, three)
    for out in (two, three):
        assert torch.isfinite(out["fc"]).all()
        assert all(torch.isfinite(v).all() for v in out["backbone"].values())


def test_nan_step_is_skipped_in_process():
    clean = run_world(1, accumulation=1, optimizer="sgd")
    bad = run_world(1, accumulation=1, optimizer="sgd", nan_step=0)
    r0, r1 = bad["results"][:2]
    assert r0.skipped and not r0.loss_finite and not r1.skipped
    assert not any(r.skipped for r in clean["results"])
    # the skipped step left no NaN behind and the next step trained
    assert torch.isfinite(bad["fc"]).all()
    for v in bad["backbone"].values():
        assert torch.isfinite(v).all()
    assert not torch.equal(bad["fc"], clean["fc"])
    assert r1.loss == pytest.approx(r1.loss) and r1.loss_finite


def test_skipped_step_restores_batchnorm_statistics():
    """The forward of a NaN batch already wrote into BatchNorm's running stats: a skip puts them back."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 16), torch.nn.BatchNorm1d(16))
    pfc = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.3, 0.0), 16, NUM_CLASSES)
    cfg = Config(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    opts = [build_optimizer(cfg, net.parameters()), build_optimizer(cfg, pfc.parameters(), row_sparse=True)]
    images, labels = _data(0)
    train_step(net, pfc, [(images, labels)], opts, None, None, 5.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images[3, 0, 0, 0] = float("inf")
    result = train_step(net, pfc, [(images, labels)], opts, None, None, 5.0)
    assert result.skipped
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


# ---- fp16's GradScaler (torch's CPU GradScaler stands in for the GPU's) ---------------------------------

def _scaled_setup(growth_interval: int = 2):
    torch.manual_seed(0)
    net = TinyNet()
    pfc = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.3, 0.0), 16, NUM_CLASSES)
    cfg = Config(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    opts = [build_optimizer(cfg, net.parameters()), build_optimizer(cfg, pfc.parameters(), row_sparse=True)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=growth_interval)
    return net, pfc, opts, scaler


def test_fp16_step_with_an_optimizer_that_got_no_gradient():
    """AAFace's soft-biometric stage never calls the Partial FC: its optimizer gets no gradient, which
    GradScaler.step refuses ("No inf checks were recorded for this optimizer")."""
    net, pfc, opts, scaler = _scaled_setup()
    fc_before = pfc.weight.detach().clone()

    def backbone_only(backbone, head, batch):
        return backbone(batch[0]).pow(2).mean(), {}

    images, labels = _data(0)
    result = train_step(net, pfc, [(images, labels)], opts, scaler, None, 5.0, objective=backbone_only)
    assert not result.skipped
    assert torch.equal(pfc.weight.detach(), fc_before)
    assert not torch.equal(TinyNet().fc1.weight, net.fc1.weight)


def test_fp16_skip_resets_the_growth_tracker():
    """After a skipped step the scale backs off and needs growth_interval clean steps before it grows again
    (GradScaler.update(new_scale) alone kept the count of clean steps from before the skip)."""
    net, pfc, opts, scaler = _scaled_setup(growth_interval=2)
    images, labels = _data(0)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("inf")

    def run(x):
        return train_step(net, pfc, [(x, labels)], opts, scaler, None, 5.0)

    assert not run(images).skipped  # one clean step counted
    assert run(bad).skipped
    assert scaler.get_scale() == 2.0 ** 9
    assert not run(images).skipped
    assert scaler.get_scale() == 2.0 ** 9  # one clean step since the skip: no growth yet
    assert not run(images).skipped
    assert scaler.get_scale() == 2.0 ** 10  # growth_interval clean steps: grows
