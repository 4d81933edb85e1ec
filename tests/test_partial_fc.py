"""Partial FC: equality with plain softmax CE on 1/2/3 ranks, sampling, per-row optimizer state,
re-sharding checkpoints across world sizes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests._pfc_helpers import (
    LOSSES,
    TRAIN,
    build_trainable,
    equality_worker,
    load_rank_results,
    pfc_step,
    problem,
    reference,
    rel_err,
    resume_one_step,
    run_ranks,
    train_and_save,
    train_steps,
)
from trainer.distributed import shard_range
from trainer.losses import ArcFace, CosFace
from trainer.optim import RowSparseAdamW, RowSparseSGD
from trainer.partial_fc import DistSoftmaxCrossEntropy, PartialFC
from trainer.shard_state import assemble_full_state, slice_rows

F64 = torch.float64
# 10 classes on 3 ranks: shards of 4, 3, 3; 7 samples: batches of 3, 2, 2.
BASE = dict(n=7, c=10, d=16, seed=1, dtype=F64)
CASES = {
    "arcface": dict(BASE, loss="arcface"),
    "cosface": dict(BASE, loss="cosface", seed=2),
    "combined_filter": dict(BASE, loss="combined_filter", seed=3),
    "sphere": dict(BASE, loss="sphere", seed=4),
    "norm_head": dict(BASE, loss="norm_head", seed=5),
    "grad_scale": dict(BASE, loss="arcface", seed=6, grad_scale=3.0),
    "arcface_fp32": dict(BASE, loss="arcface", seed=7, dtype=torch.float32),
    "sampled": dict(BASE, loss="cosface", seed=8, c=40, n=9, rate=0.3),
}


def _tol(case):
    return 1e-10 if case["dtype"] == F64 else 1e-5


def check_against_reference(results, case, name):
    """Every rank's loss, embedding gradient and weight-shard gradient vs one-process softmax CE."""
    columns = None
    if case.get("rate", 1.0) < 1.0:
        columns = torch.cat([r["sampled"] for r in results])  # rank order = class order: sorted
        assert torch.equal(columns, columns.sort().values)
    ref = reference(case, columns)
    tol, scale = _tol(case), case.get("grad_scale", 1.0)
    covered = 0
    for r in results:
        assert rel_err(r["loss"], ref["loss"]) < tol, name
        b0, nb = r["batch_start"], r["batch_count"]
        assert rel_err(r["emb_grad"], scale * ref["emb_grad"][b0:b0 + nb]) < tol, name
        c0, nc = r["class_start"], r["num_local"]
        if columns is None:
            assert rel_err(r["weight_grad"], ref["weight_grad"][c0:c0 + nc]) < tol, name
        covered += nc
    assert covered == case["c"]
    if columns is not None:
        dense = torch.cat([r["weight_grad"] for r in results])
        assert rel_err(dense, ref["weight_grad"]) < tol, name
        # The gradient is sparse and holds exactly the sampled rows.
        for r in results:
            assert r["weight_grad_sparse"]
            assert torch.equal(r["grad_rows"], r["sampled"])
        # every positive class of the global batch was kept
        _, labels, _ = problem(case["seed"], case["n"], case["c"], case["d"])
        assert set(labels.tolist()) <= set(columns.tolist())


def test_one_process_equals_reference():
    for name, case in CASES.items():
        check_against_reference([pfc_step(case, 0, 1)], case, name)


@pytest.fixture(scope="module")
def multi_rank_dir(tmp_path_factory):
    """One 2-rank and one 3-rank process group run every multi-rank check (start-up is the cost):
    the 2 ranks also train and save a checkpoint, which the 3 ranks then resume."""
    out = tmp_path_factory.mktemp("pfc_ranks")
    run_ranks(2, equality_worker, str(out), CASES, train_and_save)
    run_ranks(3, equality_worker, str(out), CASES, resume_one_step)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_multi_rank_equals_reference(multi_rank_dir, world_size):
    results = load_rank_results(str(multi_rank_dir), world_size)
    for name, case in CASES.items():
        per_rank = [r[name] for r in results]
        check_against_reference(per_rank, case, name)
    # The initial classifier does not depend on the world size.
    single = pfc_step(CASES["arcface"], 0, 1)["init_weight"]
    joined = torch.cat([r["arcface"]["init_weight"] for r in results])
    assert torch.equal(joined, single)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_from_two_ranks_resumes_on_one_and_three(multi_rank_dir):
    tmp_path = multi_rank_dir
    for kind in ("adamw", "sgd"):
        # One process, uninterrupted: the trajectory every world size must reproduce.
        ref, ref_opt = build_trainable(kind)
        train_steps(ref, ref_opt, range(3), 0, 1)
        ref_after3 = ref.full_weight_state(ref_opt)
        train_steps(ref, ref_opt, range(3, 4), 0, 1)
        ref_after4 = ref.full_weight_state(ref_opt)

        full2 = torch.load(tmp_path / f"full_{kind}.pt")
        assert rel_err(full2["weight"], ref_after3["weight"]) < 1e-10
        assert full2["optimizer_state"].keys() == ref_after3["optimizer_state"].keys()
        for key, value in ref_after3["optimizer_state"].items():
            assert rel_err(full2["optimizer_state"][key], value) < 1e-10, key

        # Per-rank shards assemble into the same full state.
        shards = [torch.load(tmp_path / f"shard_{kind}_{r}.pt") for r in range(2)]
        assembled = assemble_full_state(shards)
        assert torch.equal(assembled["weight"], full2["weight"])
        for key, value in full2["optimizer_state"].items():
            assert torch.equal(assembled["optimizer_state"][key], value), key

        # Resumed on 3 ranks: one more step lands where the uninterrupted run is.
        resumed = assemble_full_state([torch.load(tmp_path / f"resumed_{kind}_{r}.pt") for r in range(3)])
        assert rel_err(resumed["weight"], ref_after4["weight"]) < 1e-10
        for key, value in ref_after4["optimizer_state"].items():
            assert rel_err(resumed["optimizer_state"][key], value) < 1e-10, key

        # Resumed on 1 rank (this process) from the 2-rank checkpoint.
        one, one_opt = build_trainable(kind)
        one.load_full_state(full2, one_opt)
        train_steps(one, one_opt, range(3, 4), 0, 1)
        assert rel_err(one.weight.detach(), ref_after4["weight"]) < 1e-10


# ---- sampling -----------------------------------------------------------------------------------

def _sampled_pfc(num_classes=1000, rate=0.1, dim=8, seed=0):
    return PartialFC(CosFace(), dim, num_classes, sample_rate=rate, seed=seed)


def test_sampling_keeps_every_positive_and_relabels():
    pfc = _sampled_pfc()
    labels = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    index, relabelled = pfc.sample(pfc.local_labels(labels))
    assert index.numel() == 100  # int(0.1 * 1000)
    assert torch.equal(index, index.unique())  # sorted, no repeats
    assert set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index[relabelled], labels)


def test_sampling_when_positives_exceed_the_budget():
    pfc = _sampled_pfc(num_classes=50, rate=0.1)  # budget 5 rows
    labels = torch.arange(0, 50, 2)
    index, relabelled = pfc.sample(pfc.local_labels(labels))
    assert torch.equal(index, labels)
    assert torch.equal(index[relabelled], labels)


def test_sampling_with_foreign_labels():
    # Labels owned by other ranks (-1) are ignored by the sampler and stay -1.
    pfc = _sampled_pfc(num_classes=20, rate=0.5)
    local = torch.tensor([3, -1, 7, -1, 3])
    index, relabelled = pfc.sample(local)
    assert index.numel() == 10
    assert torch.equal(relabelled == -1, local == -1)
    assert torch.equal(index[relabelled[local != -1]], local[local != -1])


def test_sampler_is_seeded_and_restorable():
    labels = torch.tensor([1, 5, 9])
    a, b = _sampled_pfc(seed=3), _sampled_pfc(seed=3)
    first = [a.sample(a.local_labels(labels))[0] for _ in range(2)]
    assert torch.equal(first[0], b.sample(b.local_labels(labels))[0])
    assert not torch.equal(first[0], first[1])  # a new draw every step
    state = copy.deepcopy(a.sampler_state_dict())
    nxt = a.sample(a.local_labels(labels))[0]
    c = _sampled_pfc(seed=99)
    c.load_sampler_state_dict(state)
    assert torch.equal(c.sample(c.local_labels(labels))[0], nxt)


def test_eval_mode_uses_every_row():
    pfc = _sampled_pfc().eval()
    emb, labels = torch.randn(4, 8), torch.tensor([1, 2, 3, 4])
    loss = pfc(emb, labels)
    loss.backward()
    assert pfc.sampled_index is None and not pfc.weight.grad.is_sparse


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
    pfc = _sampled_pfc(num_classes=40, rate=0.2, dim=4).double()
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


def test_optimizer_state_resharding_helpers():
    full = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    parts = [slice_rows(full, 10, r, 3) for r in range(3)]
    assert [p.shape[0] for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError):
        slice_rows(full, 11, 0, 2)
    shard = {"num_classes": 10, "embedding_size": 3, "class_start": 0, "num_local": 4, "weight": parts[0]}
    gap = dict(shard, class_start=5, num_local=5, weight=full[5:])
    with pytest.raises(ValueError, match="tile"):
        assemble_full_state([shard, gap])


def test_load_full_state_rejects_other_shapes():
    pfc = PartialFC(ArcFace(), 8, 10)
    with pytest.raises(ValueError):
        pfc.load_full_weight(torch.zeros(11, 8))
    with pytest.raises(ValueError):
        pfc.load_full_state({"num_classes": 12, "embedding_size": 8, "weight": torch.zeros(12, 8)})


# ---- numerics and contract ------------------------------------------------------------------------

def test_dist_cross_entropy_equals_torch_on_extreme_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1000, generator=g) * 64.0  # s = 64 scale: softmax saturates
    labels = torch.randint(0, 1000, (16,), generator=g)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    la = DistSoftmaxCrossEntropy()(a, labels)
    lb = F.cross_entropy(b, labels)
    la.backward()
    lb.backward()
    assert torch.isfinite(la) and rel_err(la, lb) < 1e-5
    assert rel_err(a.grad, b.grad) < 1e-5


def test_backward_twice_is_refused():
    logits = torch.randn(4, 6, requires_grad=True)
    loss = DistSoftmaxCrossEntropy()(logits * 2, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_autocast_bf16_keeps_softmax_fp32():
    torch.manual_seed(0)
    pfc = PartialFC(ArcFace(), 64, 500)
    emb = torch.randn(32, 64, requires_grad=True)
    labels = torch.randint(0, 500, (32,))
    seen = {}

    def spy(module, inputs, output):
        seen["cos"], seen["logits"] = inputs[0].dtype, output.dtype

    handle = pfc.margin_loss.register_forward_hook(spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(emb, labels)
    handle.remove()
    assert seen == {"cos": torch.float32, "logits": torch.float32} and loss.dtype == torch.float32
    exact = pfc(emb.detach(), labels)
    assert abs(loss.item() - exact.item()) / exact.item() < 2e-2
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(pfc.weight.grad).all()


def test_rejects_bad_inputs():
    pfc = PartialFC(ArcFace(), 8, 10)
    with pytest.raises(ValueError, match="outside"):
        pfc(torch.randn(2, 8), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="embeddings"):
        pfc(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        pfc(torch.randn(2, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(ArcFace(), 8, 10, sample_rate=0.0)


def test_shard_range_is_contiguous_and_balanced():
    for total, world in [(10, 3), (3, 5), (1_000_003, 8), (0, 2)]:
        spans = [shard_range(total, r, world) for r in range(world)]
        assert spans[0][0] == 0 and sum(c for _, c in spans) == total
        assert all(spans[i][0] + spans[i][1] == spans[i + 1][0] for i in range(world - 1))
        assert max(c for _, c in spans) - min(c for _, c in spans) <= 1
        assert [c for _, c in spans] == sorted((c for _, c in spans), reverse=True)


def test_losses_registry_is_complete():
    # The helpers' loss table is what the multi-rank tests cover: keep it in sync with CASES.
    assert {c["loss"] for c in CASES.values()} == set(LOSSES)
    assert TRAIN["c"] % 3 != 0 and TRAIN["c"] % 2 != 0  # uneven shards on 2 and 3 ranks
