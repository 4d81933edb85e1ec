"""The heads of trainer/heads/: registry, hand-checked formulas, and 1 rank == 2 ranks for every head."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests._heads_helpers import run_ranks
from trainer import distributed
from trainer.config import ConfigError, load_config
from trainer.heads import available_heads, build_head, build_margin_loss, register_head
from trainer.losses import CombinedMarginLoss
from trainer.partial_fc import PartialFC

# (case id, registered name, kwargs): every registered head appears at least once.
HEAD_CASES = [
    ("arcface", "arcface", {}),
    ("cosface", "cosface", {}),
    ("combined", "combined", dict(m1=1.0, m2=0.3, m3=0.2)),
    ("am_softmax", "am_softmax", {}),
    ("facex_arcface", "facex_arcface", dict(m_am=0.1)),
    ("adacos", "adacos", {}),
    ("adam_softmax", "adam_softmax", {}),
    ("circleloss", "circleloss", {}),
    ("curricularface", "curricularface", {}),
    ("mv_softmax_am", "mv_softmax", {}),
    ("mv_softmax_arc", "mv_softmax", dict(is_am=False)),
    ("npcface", "npcface", {}),
    ("magface", "magface", {}),
    ("adaface", "adaface", dict(t_alpha=0.3)),
    ("linear", "linear", {}),
]
NUM_CLASSES, DIM, BATCH, STEPS = 11, 16, 12, 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _step_data(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    # Norms spread over 3..60 so that AdaFace's and MagFace's norm-dependent margins vary (and clamp).
    scale = 3.0 + 57.0 * torch.rand(BATCH, 1, generator=gen, dtype=torch.float64)
    emb = F.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=1) * scale
    return emb, labels


def _run_case(name: str, kwargs: dict, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    head = build_head(name, num_classes=NUM_CLASSES, **kwargs)
    pfc = PartialFC(head, DIM, NUM_CLASSES, sample_rate=1.0, seed=3).double()
    start, count = distributed.shard_range(BATCH, rank, world)
    out = {"loss": [], "emb_grad": [], "weight_grad": [], "param_grad": []}
    for step in range(STEPS):
        emb, labels = _step_data(step)
        mine = emb[start: start + count].clone().requires_grad_(True)
        pfc.zero_grad(set_to_none=True)
        loss = pfc(mine, labels[start: start + count])
        loss.backward()
        out["loss"].append(loss.item())
        out["emb_grad"].append(mine.grad.clone())
        out["weight_grad"].append(pfc.weight.grad.clone())
        out["param_grad"].append({n: p.grad.clone() for n, p in head.named_parameters()
                                  if p.grad is not None})
    out["buffers"] = {n: b.clone() for n, b in head.named_buffers()}
    return out


def _run_all(rank: int, world: int) -> dict:
    return {case: _run_case(name, kw, rank, world) for case, name, kw in HEAD_CASES}


def test_every_head_has_a_distributed_case():
    assert {name for _, name, _ in HEAD_CASES} == set(available_heads())


@pytest.mark.slow
def test_one_rank_equals_two_ranks_for_every_head(tmp_path):
    single = _run_all(0, 1)
    ranks = run_ranks(_run_all, 2, tmp_path)
    for case, _, _ in HEAD_CASES:
        ref, parts = single[case], [r[case] for r in ranks]
        for step in range(STEPS):
            for part in parts:  # the same global loss on every rank, equal to the 1-rank loss
                assert part["loss"][step] == pytest.approx(ref["loss"][step], rel=1e-6, abs=1e-9), \
                    (case, step)
            torch.testing.assert_close(torch.cat([p["emb_grad"][step] for p in parts]), ref["emb_grad"][step],
                                       rtol=1e-5, atol=1e-9, msg=f"{case} step {step}: embedding gradient")
            torch.testing.assert_close(torch.cat([p["weight_grad"][step] for p in parts]),
                                       ref["weight_grad"][step], rtol=1e-5, atol=1e-9,
                                       msg=f"{case} step {step}: weight gradient")
            for pname, g in ref["param_grad"][step].items():  # per-class head parameters: sharded
                torch.testing.assert_close(torch.cat([p["param_grad"][step][pname] for p in parts]), g,
                                           rtol=1e-5, atol=1e-9, msg=f"{case} step {step}: {pname} gradient")
        for bname, b in ref["buffers"].items():  # running statistics stay in step on every rank
            for part in parts:
                torch.testing.assert_close(part["buffers"][bname], b, rtol=1e-6, atol=1e-9,
                                           msg=f"{case}: buffer {bname}")


# ----------------------------------------------------------------------------- registry

def test_registry_names_are_case_and_dash_insensitive():
    assert type(build_head("CurricularFace")) is type(build_head("curricularface"))
    assert type(build_head("MV-Softmax")) is type(build_head("mv_softmax"))
    with pytest.raises(KeyError, match="unknown head 'nosuch'.*adaface"):
        build_head("nosuch")
    with pytest.raises(ValueError, match="registered twice"):
        register_head("AdaFace")(lambda: None)


def test_config_loss_goes_through_the_registry():
    cfg = load_config("cpu_demo", ["margin_list=(1.0,0.3,0.2)", "scale=30.0"])
    combined = build_margin_loss(cfg, 10)
    assert type(combined) is CombinedMarginLoss and (combined.s, combined.m2, combined.m3) == (30.0, 0.3, 0.2)
    cfg.loss, cfg.loss_kwargs = "AdaCos", {}
    assert type(build_margin_loss(cfg, 10)).__name__ == "AdaCos"
    cfg.loss = "nosuch"
    with pytest.raises(ConfigError, match="'nosuch' is not a head.*adaface"):
        build_margin_loss(cfg, 10)
    cfg.loss, cfg.loss_kwargs = "curricularface", {"nosuch": 1}
    with pytest.raises(ConfigError, match="loss_kwargs"):
        build_margin_loss(cfg, 10)


def test_heads_that_need_the_class_count_say_so():
    for name in ("adacos", "adam_softmax"):
        with pytest.raises(ValueError, match="num_classes"):
            build_head(name)


# ----------------------------------------------------------------------------- hand-checked formulas

def test_adacos_scale_follows_the_paper_update():
    cos = torch.tensor([[0.8, 0.1, -0.2], [0.3, 0.6, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    head = build_head("adacos", num_classes=3).double()
    s0 = math.sqrt(2) * math.log(2)
    assert float(head.scale) == pytest.approx(s0)
    out = head(cos, labels)
    b_avg = (math.exp(s0 * 0.1) + math.exp(s0 * -0.2) + math.exp(s0 * 0.3) + math.exp(s0 * 0.0)) / 2
    theta_med = min(math.acos(0.8), math.acos(0.6))  # torch.median of two values: the lower one
    s1 = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    assert float(head.scale) == pytest.approx(s1, rel=1e-6)
    torch.testing.assert_close(out, cos * s1)


def test_curricularface_modulates_hard_negatives_with_running_t():
    m, s = 0.5, 64.0
    cos = torch.tensor([[0.5, 0.45, 0.0, -0.3]], dtype=torch.float64)
    head = build_head("curricularface", s=s, m=m).double()
    out = head(cos, torch.tensor([0]))
    t = 0.01 * 0.5
    assert float(head.t) == pytest.approx(t)
    bar = math.cos(math.acos(0.5) + m)  # 0.5 * cos m - sin(60 deg) * sin m ~= 0.0268
    expected = [math.cos(math.acos(0.5) + m), 0.45 * (t + 0.45), 0.0, -0.3]
    assert 0.0 < bar < 0.45
    torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float64) * s)


def test_npcface_margin_grows_with_mean_hard_negative():
    cos = torch.tensor([[0.6, 0.7, 0.5, -0.1]], dtype=torch.float64)
    head = build_head("npcface", s=1.0, m=0.35).double()
    out = head(cos, torch.tensor([0]))
    bar = math.cos(math.acos(0.6) + 0.35)  # 0.286: columns 1 and 2 are hard, column 3 is not
    new_m = 0.40 + 0.20 * (0.7 + 0.5) / 2
    expected = [math.cos(math.acos(0.6) + new_m), 1.1 * 0.7 + 0.2, 1.1 * 0.5 + 0.2, -0.1]
    assert -0.1 < bar < 0.5
    torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float64))


def test_mv_softmax_reweights_only_misclassified_negatives():
    cos = torch.tensor([[0.5, 0.3, 0.1]], dtype=torch.float64)
    out = build_head("mv_softmax", s=1.0, m=0.35, t=1.2)(cos, torch.tensor([0]))
    # target 0.5 - 0.35 = 0.15: 0.3 is mis-classified (-> 1.2 * 0.3 + 0.2), 0.1 is not
    torch.testing.assert_close(out[0], torch.tensor([0.15, 1.2 * 0.3 + 0.2, 0.1], dtype=torch.float64))


def test_circleloss_logits():
    cos = torch.tensor([[0.5, 0.2, -0.4]], dtype=torch.float64)
    out = build_head("circleloss", m=0.25, gamma=2.0)(cos, torch.tensor([0]))
    expected = [(1.25 - 0.5) * (0.5 - 0.75), (0.2 + 0.25) * (0.2 - 0.25), 0.0]  # a_n = [cos + m]_+ = 0
    torch.testing.assert_close(out[0], 2.0 * torch.tensor(expected, dtype=torch.float64))


def test_magface_margin_and_regulariser():
    head = build_head("magface", s=1.0).double()
    norms = torch.tensor([5.0, 10.0, 60.0, 200.0], dtype=torch.float64)
    margin = head.margin(norms)
    expected = torch.tensor([0.45, 0.45, 0.45 + 0.35 * 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(margin, expected)
    cos = torch.full((4, 2), 0.3, dtype=torch.float64)
    logits, extra = head(cos, torch.zeros(4, dtype=torch.long), norms=norms)
    a = norms.clamp(10, 110)
    assert float(extra) == pytest.approx(float(20.0 * (a / 110 ** 2 + 1 / a).mean()))
    torch.testing.assert_close(logits[:, 0], torch.cos(math.acos(0.3) + margin))
    with pytest.raises(ValueError, match="norms"):
        head(cos, torch.zeros(4, dtype=torch.long))


def test_adaface_margin_from_norm_statistics():
    head = build_head("adaface", s=1.0, m=0.4, h=0.333, t_alpha=1.0).double()  # t_alpha 1: this batch's stats
    norms = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    cos = torch.full((3, 2), 0.5, dtype=torch.float64)
    out = head(cos, torch.zeros(3, dtype=torch.long), norms=norms)
    z = ((norms - 20.0) / (10.0 + 1e-3) * 0.333).clamp(-1, 1)
    expected = torch.cos(math.acos(0.5) - 0.4 * z) - (0.4 + 0.4 * z)
    torch.testing.assert_close(out[:, 0], expected)
    torch.testing.assert_close(out[:, 1], torch.full((3,), 0.5, dtype=torch.float64))
    assert float(head.batch_mean) == pytest.approx(20.0) and float(head.batch_std) == pytest.approx(10.0)


def test_adam_softmax_margins_are_per_class_and_clamped():
    head = build_head("adam_softmax", num_classes=3, s=1.0, lamda=10.0).double()
    with torch.no_grad():
        head.margins.copy_(torch.tensor([0.2, 1.5, 0.4]))
    cos = torch.full((2, 3), 0.5, dtype=torch.float64)
    logits, extra = head(cos, torch.tensor([1, 2]))
    assert head.margins.tolist() == pytest.approx([0.2, 1.0, 0.4])
    torch.testing.assert_close(logits, torch.tensor([[0.5, -0.5, 0.5], [0.5, 0.5, 0.1]], dtype=torch.float64))
    assert extra.item() == pytest.approx(10.0 * (1 - 1.6 / 3))
    # Sampled columns: class_index maps column -> local class.
    logits, _ = head(cos[:, :2], torch.tensor([0, 1]), class_index=torch.tensor([0, 2]))
    torch.testing.assert_close(logits, torch.tensor([[0.3, 0.5], [0.5, 0.1]], dtype=torch.float64))
    with pytest.raises(ValueError, match="class_index"):
        head(cos[:, :2], torch.tensor([0, 1]))


def test_facex_arcface_falls_back_past_pi():
    head = build_head("facex_arcface", s=1.0, m_arc=0.5, m_am=0.1).double()
    cos = torch.tensor([[0.9, 0.0], [-0.95, 0.0]], dtype=torch.float64)  # acos(-0.95) + 0.5 > pi
    out = head(cos, torch.tensor([0, 0]))
    torch.testing.assert_close(out[:, 0], torch.tensor([math.cos(math.acos(0.9) + 0.5), -1.05],
                                                       dtype=torch.float64))


# ----------------------------------------------------------------------------- conventions

@pytest.mark.parametrize("case,name,kw", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_gradients_are_finite_at_cosine_one(case, name, kw):
    head = build_head(name, num_classes=3, **kw)
    cos = torch.tensor([[1.0, 0.2, -1.0], [0.3, 1.0, 0.1]], requires_grad=True)
    extra = {"norms": torch.tensor([20.0, 40.0])} if getattr(head, "needs_norms", False) else {}
    out = head(cos, torch.tensor([0, 1]), **extra)
    logits = out[0] if isinstance(out, tuple) else out
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert logits.dtype == torch.float32
    assert torch.isfinite(cos.grad).all()


def test_half_precision_logits_come_out_fp32():
    cos = torch.rand(4, 5, dtype=torch.bfloat16)
    for name in ("curricularface", "npcface", "adaface"):
        head = build_head(name)
        extra = {"norms": torch.full((4,), 30.0, dtype=torch.bfloat16)} if head.needs_norms else {}
        assert head(cos, torch.tensor([0, 1, 2, 3]), **extra).dtype == torch.float32


def test_a_label_owned_by_no_rank_is_an_error():
    with pytest.raises(ValueError, match="held by 0 ranks"):
        build_head("curricularface")(torch.rand(2, 3), torch.tensor([0, -1]))


def test_partial_fc_adds_the_regulariser_once():
    torch.manual_seed(0)
    head = build_head("magface")
    pfc = PartialFC(head, DIM, NUM_CLASSES).double()
    emb, labels = _step_data(0)
    loss = pfc(emb, labels)
    cos = F.normalize(emb) @ F.normalize(pfc.weight.detach()).t()
    logits, extra = head(cos, labels, norms=emb.norm(dim=1))
    assert loss.item() == pytest.approx((F.cross_entropy(logits, labels) + extra).item(), rel=1e-6)


def test_adam_softmax_margins_follow_the_sampled_rows():
    """With sample_rate < 1, Partial FC passes the sampled rows so each class's margin gets its own gradient."""
    torch.manual_seed(0)
    head = build_head("adam_softmax", num_classes=12)
    pfc = PartialFC(head, 8, 12, sample_rate=0.5, seed=1)
    emb = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 7, 9, 11])
    pfc(emb, labels).backward()
    grad = head.margins.grad
    sampled = set(pfc.sampled_index.tolist())
    assert set(labels.tolist()) <= sampled
    # unsampled classes get only the regulariser's gradient (the same for all); positives get more,
    # so the column -> class mapping picked the right margins
    rest = [grad[c] for c in range(12) if c not in sampled]
    assert rest and all(torch.isclose(g, rest[0]) for g in rest)
    assert all(not torch.isclose(grad[c], rest[0]) for c in set(labels.tolist()))
