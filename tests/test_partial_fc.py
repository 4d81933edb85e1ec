"""Partial FC: equality with plain softmax CE on 1/2/3 ranks, sampling, re-sharding checkpoints across
world sizes (the row-sparse optimizers: test_optim.py; the shard helpers: test_shard_state.py)."""
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
    sampled_pfc,
    train_and_save,
    train_steps,
)
from trainer.distributed import shard_range
from trainer.losses import ArcFace
from trainer.partial_fc import DistSoftmaxCrossEntropy, PartialFC
from trainer.shard_state import assemble_full_state

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
    # the trainer's contract: the same batch size on every rank, gathered without reading sizes back
    "equal_batches": dict(BASE, loss="arcface", seed=9, n=12, equal_batches=True),
    "equal_batches_sampled": dict(BASE, loss="arcface", seed=10, c=40, n=12, rate=0.2, equal_batches=True),
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
    if world_size == 2:  # uneven batches under equal_batches=True: refused on both ranks
        for r in range(2):
            assert "equal_batches" in (multi_rank_dir / f"uneven_refused_{r}.txt").read_text()
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

def test_sampling_keeps_every_positive_and_relabels():
    pfc = sampled_pfc()
    labels = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    index, relabelled = pfc.sample(pfc.local_labels(labels))
    assert index.numel() == 100  # int(0.1 * 1000)
    assert torch.equal(index, index.unique())  # sorted, no repeats
    assert set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index[relabelled], labels)


def test_sampling_when_positives_exceed_the_budget():
    pfc = sampled_pfc(num_classes=50, rate=0.1)  # budget 5 rows
    labels = torch.arange(0, 50, 2)
    index, relabelled = pfc.sample(pfc.local_labels(labels))
    assert torch.equal(index, labels)
    assert torch.equal(index[relabelled], labels)


def test_sampling_with_foreign_labels():
    # Labels owned by other ranks (-1) are ignored by the sampler and stay -1.
    pfc = sampled_pfc(num_classes=20, rate=0.5)
    local = torch.tensor([3, -1, 7, -1, 3])
    index, relabelled = pfc.sample(local)
    assert index.numel() == 10
    assert torch.equal(relabelled == -1, local == -1)
    assert torch.equal(index[relabelled[local != -1]], local[local != -1])


def test_sampler_is_seeded_and_restorable():
    labels = torch.tensor([1, 5, 9])
    a, b = sampled_pfc(seed=3), sampled_pfc(seed=3)
    first = [a.sample(a.local_labels(labels))[0] for _ in range(2)]
    assert torch.equal(first[0], b.sample(b.local_labels(labels))[0])
    assert not torch.equal(first[0], first[1])  # a new draw every step
    state = copy.deepcopy(a.sampler_state_dict())
    nxt = a.sample(a.local_labels(labels))[0]
    c = sampled_pfc(seed=99)
    c.load_sampler_state_dict(state)
    assert torch.equal(c.sample(c.local_labels(labels))[0], nxt)


def test_eval_mode_uses_every_row():
    pfc = sampled_pfc().eval()
    emb, labels = torch.randn(4, 8), torch.tensor([1, 2, 3, 4])
    loss = pfc(emb, labels)
    loss.backward()
    assert pfc.sampled_index is None and not pfc.weight.grad.is_sparse


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


# ---- issue I: precision under autocast, device-free sampler state ------------------------------------

def _near_target(dim: int = 512, classes: int = 64, cos: float = 0.994):
    """Embeddings [16, dim] and a classifier whose row i is at cosine `cos` from embedding i % 16."""
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(16, dim, generator=g, dtype=F64), dim=1)
    noise = torch.randn(classes, dim, generator=g, dtype=F64)
    base = emb[torch.arange(classes) % 16]
    noise = F.normalize(noise - (noise * base).sum(1, keepdim=True) * base, dim=1)
    weight = (cos * base + (1 - cos * cos) ** 0.5 * noise) * 0.05  # the trainer's small weights
    return emb * 3.0, weight  # embedding norms as a backbone gives them


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_target_cosine_error_stays_within_fp16s_under_every_autocast(amp):
    """bf16 matmuls put ~2.5e-3 on a target cosine of 0.994 (0.16 on its logit at s=64); fp16, what
    arcface_torch trains with, ~3e-4. Every AMP setting must stay within 5e-4."""
    emb, weight = _near_target()
    pfc = PartialFC(ArcFace(), 512, weight.shape[0])
    exact = F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1))
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        cos = pfc.cosine(emb.float(), weight.float())
    assert cos.dtype == torch.float32
    target = torch.arange(weight.shape[0]) % 16
    err = (cos.double() - exact).abs()
    assert exact[target, torch.arange(weight.shape[0])].mean() == pytest.approx(0.994, abs=1e-6)
    assert err[target, torch.arange(weight.shape[0])].max() <= 5e-4
    assert err.max() <= 5e-4


def test_sampler_state_is_device_free_and_continues_the_stream():
    """The sampling RNG is saved as numbers (seed, draws): a CPU generator's state (a ByteTensor) cannot be
    set into a CUDA generator, so a checkpoint saved on one device failed to resume on the other."""
    labels = torch.tensor([1, 5, 9])
    a = sampled_pfc(seed=3)
    for _ in range(3):
        a.sample(a.local_labels(labels))
    state = a.sampler_state_dict()
    assert not any(torch.is_tensor(v) for v in state.values()), state
    nxt = a.sample(a.local_labels(labels))[0]
    b = sampled_pfc(seed=3)
    b.sample(b.local_labels(labels))  # b's generator already made (here on the CPU, on a GPU its own)
    b.load_sampler_state_dict(copy.deepcopy(state))
    assert torch.equal(b.sample(b.local_labels(labels))[0], nxt)
    # A checkpoint from before (a generator state tensor) keeps the fresh seeded stream.
    c, fresh = sampled_pfc(seed=3), sampled_pfc(seed=3)
    c.load_sampler_state_dict({"rank": 0, "world_size": 1, "generator": torch.Generator().get_state()})
    assert torch.equal(c.sample(c.local_labels(labels))[0], fresh.sample(fresh.local_labels(labels))[0])
