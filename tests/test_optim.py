"""The row-sparse optimizers of Partial FC's classifier (trainer/optim.py): a row is stepped only when
sampled, its momentum / Adam moments and step count kept per row; equal to torch's on dense gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from tests._pfc_helpers import rel_err, sampled_pfc
from trainer.losses import ArcFace
from trainer.optim import RowSparseAdamW, RowSparseSGD
from trainer.partial_fc import PartialFC

F64 = torch.float64


def _per_row_reference_run(make_ours, make_ref, steps=6, rate_schedule=None):
    """Our optimizer on the full weight vs torch's optimizer on one Parameter per row whose grad is
    None unless the row took part in the step (torch skips such parameters entirely)."""
    torch.manual_seed(0)
    num_classes, dim = 30, 4
    pfc = PartialFC(ArcFace(16.0, 0.3), dim, num_classes, sample_rate=0.3, seed=1).double()
    rows = [torch.nn.Parameter(pfc.weight.detach()[i].clone()) for i in range(num_classes)]
    ours, ref = make_ours([pfc.weight]), make_ref(rows)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        if rate_schedule is not None:
            pfc.sample_rate = rate_schedule[step]
        emb = torch.randn(6, dim, generator=g, dtype=F64)
        labels = torch.randint(0, num_classes, (6,), generator=g)
        before = pfc.weight.detach().clone()
        pfc(emb, labels).backward()
        grad = pfc.weight.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            touched, values = grad.indices()[0], grad.values()
            assert torch.equal(touched, pfc.sampled_index)
        else:
            touched, values = torch.arange(num_classes), grad
        for r in rows:
            r.grad = None
        for k, i in enumerate(touched.tolist()):
            rows[i].grad = values[k].clone()
        ours.step()
        ref.step()
        ours.zero_grad()
        after = pfc.weight.detach()
        assert rel_err(after, torch.stack([r.detach() for r in rows])) < 1e-12, step
        untouched = torch.ones(num_classes, dtype=torch.bool)
        untouched[touched] = False
        assert untouched.any() == (grad.is_sparse)
        assert torch.equal(after[untouched], before[untouched]), "an unsampled row moved"
    return pfc, ours, rows, ref


@pytest.mark.parametrize("extra", [{}, {"nesterov": True}, {"dampening": 0.2}, {"momentum": 0.0}])
def test_row_sparse_sgd_keeps_momentum_per_row(extra):
    kw = dict(dict(lr=0.3, momentum=0.9, weight_decay=0.05), **extra)
    pfc, ours, rows, ref = _per_row_reference_run(lambda p: RowSparseSGD(p, **kw),
                                                  lambda p: torch.optim.SGD(p, **kw))
    if kw["momentum"] == 0:
        assert "momentum_buffer" not in ours.state[pfc.weight]  # no [C, D] buffer without momentum
        return
    buf = ours.state[pfc.weight]["momentum_buffer"]
    for i, r in enumerate(rows):
        if r in ref.state and "momentum_buffer" in ref.state[r]:
            assert rel_err(buf[i], ref.state[r]["momentum_buffer"]) < 1e-12
        else:
            assert ours.state[pfc.weight]["row_step"][i] == 0 and not buf[i].any()


def test_row_sparse_adamw_keeps_moments_and_steps_per_row():
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    pfc, ours, rows, ref = _per_row_reference_run(lambda p: RowSparseAdamW(p, **kw),
                                                  lambda p: torch.optim.AdamW(p, **kw))
    state = ours.state[pfc.weight]
    for i, r in enumerate(rows):
        if r in ref.state and ref.state[r]:
            assert state["row_step"][i].item() == ref.state[r]["step"].item()
            assert rel_err(state["exp_avg"][i], ref.state[r]["exp_avg"]) < 1e-12
            assert rel_err(state["exp_avg_sq"][i], ref.state[r]["exp_avg_sq"]) < 1e-12
        else:
            assert state["row_step"][i] == 0
    assert len(set(state["row_step"].tolist())) > 1  # rows were sampled unevenly


def test_switching_sampling_off_mid_run_keeps_state():
    # LVFace's second stage turns negative sampling off: sparse then dense gradients.
    kw = dict(lr=0.05, weight_decay=0.1)
    _per_row_reference_run(lambda p: RowSparseAdamW(p, **kw), lambda p: torch.optim.AdamW(p, **kw),
                           steps=5, rate_schedule=[0.3, 0.3, 1.0, 0.3, 1.0])


def test_row_sparse_optimizers_equal_torch_on_dense_gradients():
    torch.manual_seed(0)
    for ours_cls, torch_cls, kw in [
        (RowSparseSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        (RowSparseAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ]:
        a = torch.nn.Parameter(torch.randn(7, 5, dtype=F64))
        b = torch.nn.Parameter(a.detach().clone())
        oa, ob = ours_cls([a], **kw), torch_cls([b], **kw)
        for _ in range(4):
            g = torch.randn(7, 5, dtype=F64)
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        assert rel_err(a.detach(), b.detach()) < 1e-12, ours_cls.__name__


def test_row_sparse_adamw_takes_over_torch_adamw_state():
    # A checkpoint written with torch's AdamW (one scalar step) continues under RowSparseAdamW.
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4, dtype=F64))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = torch.optim.AdamW([a], lr=0.01), torch.optim.AdamW([b], lr=0.01)
    for step in range(5):
        g = torch.randn(6, 4, dtype=F64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        if step == 2:
            state = copy.deepcopy(ob.state_dict())
            ob = RowSparseAdamW([b], lr=0.01)
            ob.load_state_dict(state)
    assert rel_err(a.detach(), b.detach()) < 1e-12
    assert ob.state[b]["row_step"].tolist() == [5.0] * 6


def test_zero_learning_rate_leaves_rows_alone():
    # Warmup schedules start at lr = 0: no update, no NaN, but the moments still accumulate.
    for cls in (RowSparseSGD, RowSparseAdamW):
        p = torch.nn.Parameter(torch.randn(5, 3))
        before = p.detach().clone()
        opt = cls([p], lr=0.0)
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.randn(2, 3), (5, 3),
                                         check_invariants=True)
        opt.step()
        assert torch.equal(p.detach(), before), cls.__name__
        assert opt.state[p]["row_step"].tolist() == [0, 1, 0, 1, 0]


def test_sparse_gradient_accumulation_sums_rows():
    # Two micro-batches sample different rows; their sparse gradients add up before one step.
    pfc = sampled_pfc(num_classes=40, rate=0.2, dim=4).double()
    opt = RowSparseSGD(pfc.parameters(), lr=0.1)
    before = pfc.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    sampled = []
    for _ in range(2):
        pfc(torch.randn(3, 4, generator=g, dtype=F64), torch.randint(0, 40, (3,), generator=g)).backward()
        sampled.append(pfc.sampled_index)
    grad = pfc.weight.grad.coalesce()
    assert torch.equal(grad.indices()[0], torch.cat(sampled).unique())
    dense = torch.zeros_like(before).index_add_(0, grad.indices()[0], grad.values())
    opt.step()
    assert rel_err(pfc.weight.detach(), before - 0.1 * dense) < 1e-12
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[grad.indices()[0]] = False
    assert torch.equal(pfc.weight.detach()[untouched], before[untouched])
