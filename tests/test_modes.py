"""trainer/modes: LVFace's curriculum, AAFace, Semi-Siamese Training."""
from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests._heads_helpers import run_ranks
from trainer import distributed
from trainer.backbones.aaface import AAFaceNet, AAIModule, aaface
from trainer.heads import build_head
from trainer.modes.aaface import AAFaceObjective, AAFaceSchedule, AttributeLoss, attribute_targets, balanced_pos_weight
from trainer.modes.lvface import EPLHead, LVFaceCurriculum, LVFacePartialFC, build_lvface_partial_fc
from trainer.modes.sst import IdentityPairLoader, PrototypeQueue, SemiSiameseTraining
from trainer.optim import RowSparseSGD
from trainer.partial_fc import PartialFC

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ============================================================================ LVFace


def test_epl_centres_mix_the_running_means_of_seen_classes():
    head = EPLHead(num_classes=3, embedding_size=2, alpha=0.25)
    weight = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    with torch.no_grad():
        head.class_mean[0] = torch.tensor([0.0, 5.0])  # class 0 seen, 1 and 2 not
        head.class_seen[0] = True
    plain = F.normalize(weight, dim=1)
    torch.testing.assert_close(head.centres(weight, None), plain)  # EPL off: plain centres
    head.epl_enabled = True
    expected = plain.clone()
    expected[0] = F.normalize(0.75 * torch.tensor([1.0, 0.0]) + 0.25 * torch.tensor([0.0, 1.0]), dim=0)
    torch.testing.assert_close(head.centres(weight, None), expected)
    torch.testing.assert_close(head.centres(weight[[2, 0]], torch.tensor([2, 0])), expected[[2, 0]])


def test_epl_means_are_an_ema_of_normalised_features():
    head = EPLHead(num_classes=3, embedding_size=2, momentum=0.9)
    emb = torch.tensor([[3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    head.update_means(emb, torch.tensor([0, 0, -1]))  # -1: another rank's class
    torch.testing.assert_close(head.class_mean[0], torch.tensor([0.5, 0.5]))  # first sight: the batch mean
    assert head.class_seen.tolist() == [True, False, False]
    head.update_means(torch.tensor([[0.0, 4.0]]), torch.tensor([0]))
    expected = 0.9 * torch.tensor([0.5, 0.5]) + 0.1 * torch.tensor([0.0, 1.0])
    torch.testing.assert_close(head.class_mean[0], expected)
    assert head.class_mean[1:].abs().sum() == 0


def test_curriculum_switches_sampling_and_epl():
    torch.manual_seed(0)
    pfc = build_lvface_partial_fc(8, 40, ncs_sample_rate=0.25)
    curriculum = LVFaceCurriculum(switch_epoch=2, ncs_sample_rate=0.25)
    emb, labels = torch.randn(6, 8), torch.randint(0, 40, (6,))
    assert curriculum.apply(pfc, 1.99) == "ncs"
    assert pfc.sample_rate == 0.25 and not pfc.margin_loss.epl_enabled
    pfc(emb, labels).backward()
    assert pfc.weight.grad.is_sparse  # negative class sub-sampling: only sampled rows get a gradient
    assert pfc.margin_loss.class_seen.sum() == labels.unique().numel()  # means kept up to date anyway
    pfc.zero_grad(set_to_none=True)
    assert curriculum.apply(pfc, 2.0) == "epl" and pfc.sample_rate == 1.0 and pfc.margin_loss.epl_enabled
    loss = pfc(emb, labels)
    loss.backward()
    assert not pfc.weight.grad.is_sparse
    plain = PartialFC(build_head("arcface"), 8, 40, seed=0)
    with torch.no_grad():
        plain.weight.copy_(pfc.weight)
    assert abs(plain(emb, labels).item() - loss.item()) > 1e-3  # the mixed centres change the logits
    with pytest.raises(TypeError, match="EPLHead"):
        LVFacePartialFC(build_head("arcface"), 8, 40)


def test_lvface_curriculum_trains_through_the_switch():
    torch.manual_seed(0)
    classes, dim = 12, 16
    centres = F.normalize(torch.randn(classes, dim), dim=1)
    net = nn.Linear(dim, dim)
    pfc = build_lvface_partial_fc(dim, classes, s=16.0, m=0.2, ncs_sample_rate=0.5, epl_alpha=0.3)
    curriculum = LVFaceCurriculum(switch_epoch=15, ncs_sample_rate=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt_fc = RowSparseSGD(pfc.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(30):
        curriculum.apply(pfc, step)  # one "epoch" per step here
        labels = torch.randint(0, classes, (24,))
        x = centres[labels] + 0.3 * torch.randn(24, dim)
        loss = pfc(net(x), labels)
        loss.backward()
        opt.step(), opt_fc.step()
        opt.zero_grad(), opt_fc.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert np.mean(losses[-5:]) < np.mean(losses[15:20])  # still improving after the switch


# ============================================================================ AAFace

def test_aai_fusion_formula_and_its_start():
    torch.manual_seed(0)
    aai = AAIModule(16, reduction=8)
    f_fr, f_sb = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    g = torch.sigmoid(torch.tensor(3.0))
    # At initialisation both gates are sigmoid(3): the joint stage starts close to F = F_FR.
    torch.testing.assert_close(aai(f_fr, f_sb), g * g * f_fr + (1 - g) * (1 - g) * f_sb)
    with torch.no_grad():  # move off the initial point and check eq. 3 with the module's own maps
        for p in aai.parameters():
            p.add_(0.3 * torch.randn_like(p))
    aai.eval()
    mc = aai.channel(f_fr + f_sb)
    ms = aai.spatial(mc * f_fr + (1 - mc) * f_sb)
    # Both integration weights have the input feature's shape and vary along every axis of it.
    assert mc.shape == ms.shape == (2, 16, 5, 5)
    for m in (mc, ms):
        assert m.std(dim=1).mean() > 0.01 and m.std(dim=(2, 3)).mean() > 0.01
    torch.testing.assert_close(aai(f_fr, f_sb), ms * (mc * f_fr) + (1 - ms) * ((1 - mc) * f_sb))


def test_aai_sub_modules_as_the_paper_describes():
    aai = AAIModule(64, reduction=8)
    shapes = {n: tuple(p.shape) for n, p in aai.named_parameters() if n.endswith("weight") and p.dim() == 4}
    # Channel: the GAP and GMP descriptors share one point-wise bottleneck 64 -> 8 -> 64; the global-context
    # descriptor (the whole map) has its own.
    assert shapes["channel.pooled.0.weight"] == (8, 64, 1, 1) and shapes["channel.pooled.2.weight"] == (64, 8, 1, 1)
    assert shapes["channel.context.0.weight"] == (8, 64, 1, 1) and shapes["channel.context.3.weight"] == (64, 8, 1, 1)
    # Spatial: a 7x7 convolution of the channel-pooled [mean, max] maps, and a convolutional bottleneck.
    assert shapes["spatial.pooled.weight"] == (1, 2, 7, 7)
    assert shapes["spatial.context.0.weight"] == (8, 64, 3, 3) and shapes["spatial.context.3.weight"] == (64, 8, 3, 3)
    x = torch.randn(3, 64, 7, 7)
    assert aai.channel.pooled(torch.randn(3, 64, 1, 1)).shape == (3, 64, 1, 1)  # shared by GAP and GMP
    assert aai.channel.context(x).shape == aai.spatial.context(x).shape == (3, 64, 7, 7)


def _tiny_aaface(num_attributes: int, dim: int = 32, freeze_backbone: bool = True) -> AAFaceNet:
    """A small AAFaceNet for fast tests: 112x112 -> a 16 x 14 x 14 backbone map -> 16 -> dim channels."""
    backbone = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                             nn.PReLU(16))
    return AAFaceNet(backbone, 16, num_attributes, embedding_size=dim, branch_channels=16,
                     freeze_backbone=freeze_backbone)


def _grads(module: nn.Module) -> set:
    return {n.split(".")[0] for n, p in module.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


def test_aaface_on_iresnet_has_the_papers_branches():
    from trainer.backbones import build_backbone
    from trainer.backbones.iresnet import iresnet18

    torch.manual_seed(0)
    net = build_backbone("aaface", base="r18", embedding_size=32, num_attributes=5).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        emb, attrs = net(x, with_attributes=True)
        shared = net.backbone(x)
    assert emb.shape == (2, 32) and attrs.shape == (2, 5) and shared.shape == (2, 512, 7, 7)
    # Each branch: two 3x3 convolutions then GAP; the SB branch shares Br_FR's first convolution.
    convs = {name: [m for m in getattr(net, name).modules() if isinstance(m, nn.Conv2d)]
             for name in ("conv_a", "conv_fr", "conv_sb")}
    assert [tuple(c.weight.shape) for c in convs["conv_a"]] == [(512, 512, 3, 3)]
    assert [tuple(c.weight.shape) for c in convs["conv_fr"]] == [(32, 512, 3, 3)]
    assert [tuple(c.weight.shape) for c in convs["conv_sb"]] == [(32, 512, 3, 3)]
    assert net.sb_classifier.weight.shape == (5, 32)
    with torch.no_grad():
        h = net.conv_a(shared)
        f_fr, f_sb = net.conv_fr(h), net.conv_sb(h)
        torch.testing.assert_close(emb, net.aai(f_fr, f_sb).mean(dim=(2, 3)))  # joint: GAP of the fused map
        torch.testing.assert_close(attrs, net.sb_classifier(f_sb.mean(dim=(2, 3))))
        net.set_stage("fr")
        torch.testing.assert_close(net(x), f_fr.mean(dim=(2, 3)))  # Br_FR alone: its GAP output
    # The backbone is IResNet's convolutional layers under insightface's names, without its embedding layer.
    full = set(iresnet18().state_dict())
    assert set(net.backbone.state_dict()) == {k for k in full if not k.startswith(("bn2.", "fc.", "features."))}
    with pytest.raises(TypeError, match="IResNet"):
        aaface(base="mbf")


def test_aaface_stages_train_only_their_parts():
    torch.manual_seed(0)
    net = _tiny_aaface(num_attributes=2)
    x = torch.randn(4, 3, 112, 112)
    schedule = AAFaceSchedule(fr_epochs=1, sb_epochs=1)
    # Section 3.2: Br_FR with the backbone frozen; Br_SB with the backbone and Br_FR's first conv frozen;
    # then both branches (and the AAI) jointly.
    expected = {"fr": {"conv_a", "conv_fr"}, "sb": {"conv_sb", "sb_classifier"},
                "joint": {"conv_a", "conv_fr", "conv_sb", "sb_classifier", "aai"}}
    for epoch, stage in ((0.5, "fr"), (1.5, "sb"), (2.0, "joint")):
        assert schedule.apply(net, epoch) and net.stage == stage
        assert not schedule.apply(net, epoch)
        assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == expected[stage]
        net.train()
        net.zero_grad(set_to_none=True)
        backbone_bn, conv_a_bn = net.backbone[2].running_mean.clone(), net.conv_a[1].running_mean.clone()
        emb, attrs = net(x, with_attributes=True)
        loss = sum(t.square().mean() for t in (emb, attrs) if t is not None)
        loss.backward()
        assert _grads(net) == expected[stage], stage
        assert (emb is None) == (stage == "sb") and (attrs is None) == (stage == "fr")
        # Frozen parts keep their BatchNorm statistics: the backbone always, conv_a in stage "sb".
        assert torch.equal(net.backbone[2].running_mean, backbone_bn)
        assert torch.equal(net.conv_a[1].running_mean, conv_a_bn) == (stage == "sb")
        # The stage travels with the state dict (checkpoints, model.pt): it picks the embedding path.
        copy = _tiny_aaface(num_attributes=2)
        copy.load_state_dict(net.state_dict())
        assert copy.stage == stage and copy.conv_fr[0].weight.requires_grad == (stage != "sb")
    # The shared first convolution learns from the attribute loss too in the joint stage.
    net.zero_grad(set_to_none=True)
    net(x, with_attributes=True)[1].square().mean().backward()
    assert _grads(net) == {"conv_a", "conv_sb", "sb_classifier"}
    # freeze_backbone=False: the backbone trains with Br_FR and in the joint stage (not with Br_SB).
    thawed = _tiny_aaface(num_attributes=2, freeze_backbone=False)
    for stage in ("fr", "sb", "joint"):
        thawed.set_stage(stage)
        assert thawed.backbone[1].weight.requires_grad == (stage != "sb")


def test_aaface_exports_with_its_fused_embedding(tmp_path):
    from trainer.model_io import export

    torch.manual_seed(0)
    net = _tiny_aaface(num_attributes=2).eval()
    with torch.no_grad():  # gates off their initial constant
        for p in net.aai.parameters():
            p.add_(0.3 * torch.randn_like(p))
    # ONNX and TorchScript checked against PyTorch on batches of 1 and 5 (traced with 2).
    assert export.export_onnx(net, tmp_path / "aaface.onnx", atol=1e-4) < 1e-4
    assert export.export_torchscript(net, tmp_path / "aaface.ts.pt", atol=1e-4) < 1e-4


def test_aaface_defaults_are_the_papers():
    from trainer.config import ConfigError, load_config
    from trainer.modes import build_mode
    from trainer.modes.aaface import CONFIG

    weights = dict(zip(CONFIG["aaface_attributes"], CONFIG["aaface_lambdas"]))
    assert weights == {"Male": 1.0, "Bald": 1.0, "Big_Nose": 0.5, "Chubby": 0.5, "Narrow_Eyes": 0.5}
    assert CONFIG["aaface_lambda_fr"] == 3.0 and CONFIG["aaface_pos_weight"] == []  # eq. 2: plain BCE
    assert inspect.signature(aaface).parameters["reduction"].default == 8  # r = 8, Table 2's best
    # The backbone is frozen: a run without trained weights to start from is refused.
    cfg = load_config("cpu_demo", ["mode=aaface", "network=aaface", "num_epoch=20"])
    with pytest.raises(ConfigError, match="init_weights"):
        build_mode(cfg)
    build_mode(load_config("cpu_demo", ["mode=aaface", "network=aaface", "num_epoch=20",
                                        "init_weights=backbone.pth"]))
    cfg = load_config("aaface_r50", ["init_weights=backbone.pth"])
    assert (cfg.optimizer, cfg.lr, cfg.lr_schedule, tuple(cfg.lr_steps), cfg.lr_gamma, cfg.num_epoch) == \
        ("sgd", 0.01, "step", (4, 10, 17), 0.1, 25)
    assert cfg.loss == "adaface" and cfg.network_kwargs["reduction"] == 8 and sum(cfg.aaface_stage_epochs) == 25
    assert build_mode(cfg).names == ["Male", "Bald", "Big_Nose", "Chubby", "Narrow_Eyes"]


def test_attribute_targets_by_name():
    fields = ["identity", "masked", "mask_type"]
    vectors = torch.tensor([[3, 1, 2], [4, 0, 0], [5, float("nan"), 1], [6, -1, 0]])
    targets, valid = attribute_targets(vectors, fields, ["masked"])
    assert targets[:, 0].tolist() == [1, 0, 0, 0] and valid[:, 0].tolist() == [True, True, False, False]
    with pytest.raises(KeyError, match="glasses"):
        attribute_targets(vectors, fields, ["glasses"])
    with pytest.raises(ValueError, match="binary"):
        attribute_targets(vectors, fields, ["mask_type"])
    torch.testing.assert_close(balanced_pos_weight(targets, valid), torch.tensor([1.0]))  # 1 pos, 1 neg


def test_weighted_bce_by_hand():
    loss = AttributeLoss(["a", "b"], lambdas=[1.0, 0.5], pos_weight=[3.0, 1.0])
    logits = torch.tensor([[0.2, -1.0], [1.5, 0.3], [-0.7, 2.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    total, per = loss(logits, targets, valid)

    def bce(z, y, w):
        return -(w * y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
    a = (bce(0.2, 1, 3) + bce(1.5, 0, 3) + bce(-0.7, 1, 3)) / 3
    b = (bce(-1.0, 0, 1) + bce(2.0, 1, 1)) / 2
    assert per.tolist() == pytest.approx([a, b], rel=1e-5)
    assert total.item() == pytest.approx(a + 0.5 * b, rel=1e-5)


@pytest.fixture(scope="module")
def grey_attribute_data(glint24, tmp_path_factory):
    """A packed dataset (docs/design.md section 1) of 10 glint24 identities x 12 faces whose label vectors
    carry a binary attribute "grey": every other image is stored in grey."""
    from PIL import Image

    from pipeline.imageio import encode_jpeg
    from pipeline.manifest import shard_entry, write_manifest
    from pipeline.recordio import IndexedRecordIO, IRHeader, pack_record

    out = tmp_path_factory.mktemp("grey") / "data"
    out.mkdir()
    people = sorted(p for p in glint24.iterdir() if p.is_dir())[:10]
    items = [(cls, f) for cls, person in enumerate(people) for f in sorted(person.glob("*.png"))[:12]]
    order = np.random.default_rng(0).permutation(len(items))
    writer = IndexedRecordIO(out / "train-00000.idx", out / "train-00000.rec", "w")
    for key, i in enumerate(order):
        cls, path = items[i]
        rgb = np.asarray(Image.open(path).convert("RGB"))
        grey = key % 2
        if grey:
            rgb = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)
        writer.write_idx(key, pack_record(IRHeader(2, [cls, grey], key + 1, 0), encode_jpeg(rgb)))
    writer.close()
    write_manifest(out, {"version": 1, "image_size": [112, 112], "num_images": len(items),
                         "num_classes": len(people), "label_fields": ["identity", "grey"],
                         "shards": [shard_entry(out, "train-00000.rec", "train-00000.idx", len(items))]})
    return out


@pytest.mark.slow
def test_aaface_objective_trains_each_stage_on_real_faces(grey_attribute_data):
    from pipeline.loader import build_train_loader

    torch.manual_seed(0)
    loader = build_train_loader(grey_attribute_data, batch_size=20, backend="torch", num_threads=0,
                                seed=1, return_label_vectors=True)
    net = _tiny_aaface(num_attributes=1)
    pfc = PartialFC(build_head("adaface"), 32, loader.num_classes)
    objective = AAFaceObjective(["grey"], loader.label_fields)
    schedule = AAFaceSchedule(fr_epochs=2, sb_epochs=3)
    opt = torch.optim.SGD(list(net.parameters()) + list(pfc.parameters()), lr=0.1, momentum=0.9)
    history = {"fr": [], "sb": [], "joint": []}
    for epoch in range(7):
        schedule.apply(net, epoch)
        net.train()
        for images, labels, vectors in loader:
            loss, parts = objective(net, pfc, images, labels, vectors)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history[net.stage].append(parts)
    assert set(history["fr"][0]) == {"loss_fr"}
    assert set(history["sb"][0]) == {"loss_attr", "loss_grey"}
    assert set(history["joint"][0]) == {"loss_fr", "loss_attr", "loss_grey"}
    fr = [p["loss_fr"] for p in history["fr"]]
    attr = [p["loss_attr"] for p in history["sb"]]
    assert np.mean(fr[-3:]) < np.mean(fr[:3])
    # Grey or colour is easy to see: the SB branch must learn it within its stage.
    assert np.mean(attr[-3:]) < 0.5 * np.mean(attr[:3])
    assert all(math.isfinite(v) for p in history["joint"] for v in p.values())


# ============================================================================ Semi-Siamese Training

def test_prototype_queue_loss_and_update_by_hand():
    torch.manual_seed(0)
    q = PrototypeQueue(feat_dim=4, queue_size=4, scale=2.0)
    queue0 = q.queue.clone()
    p1, p2, g1, g2 = (F.normalize(torch.randn(2, 4), dim=1) for _ in range(4))
    ids = torch.tensor([7, 9])
    loss = q(p1, g2, p2, g1, ids)

    def ce(p, g):
        protos = queue0.clone()
        protos[0:2] = g
        return F.cross_entropy(2.0 * p @ protos.t(), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(((ce(p1, g2) + ce(p2, g1)) / 2).item(), rel=1e-6)
    assert int(q.pointer) == 2 and q.queue_ids.tolist() == [7, 9, -1, -1]
    assert torch.allclose(q.queue[:2], g1) or torch.allclose(q.queue[:2], g2)
    torch.testing.assert_close(q.queue[2:], queue0[2:])
    # Next batch: identity 7 is queued at slot 0 and must not be a negative for the new sample of 7.
    p1b, p2b, g1b, g2b = (F.normalize(torch.randn(2, 4), dim=1) for _ in range(4))
    before = q.queue.clone()
    loss = q(p1b, g2b, p2b, g1b, torch.tensor([7, 3]))
    protos = before.clone()
    protos[2:4] = g2b
    logits = 2.0 * p1b @ protos.t()
    logits[0, 0] = float("-inf")
    first = F.cross_entropy(logits, torch.tensor([2, 3]))
    protos[2:4] = g1b
    logits = 2.0 * p2b @ protos.t()
    logits[0, 0] = float("-inf")
    second = F.cross_entropy(logits, torch.tensor([2, 3]))
    assert loss.item() == pytest.approx(((first + second) / 2).item(), rel=1e-6)
    assert int(q.pointer) == 0  # wrapped around
    with pytest.raises(ValueError, match="multiple of the global batch"):
        q(*(torch.randn(3, 4) for _ in range(4)), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="loss_type"):
        PrototypeQueue(loss_type="circle")


def test_gallery_is_a_moving_average_of_the_probe():
    probe = nn.Linear(3, 2)
    sst = SemiSiameseTraining(probe, feat_dim=2, queue_size=4, alpha=0.9)
    start = sst.gallery.weight.clone()
    assert torch.equal(start, probe.weight) and not sst.gallery.weight.requires_grad
    with torch.no_grad():
        probe.weight.add_(1.0)
    sst.momentum_update(probe)
    torch.testing.assert_close(sst.gallery.weight, 0.9 * start + 0.1 * probe.weight)


def _sst_worker(rank: int, world: int) -> dict:
    """The same global batch of 8 pairs on 1 or 2 ranks through a BN-free probe: equal losses (averaged
    over ranks, as DDP averages gradients), equal averaged gradients, equal queues."""
    torch.manual_seed(0)
    probe = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8))
    sst = SemiSiameseTraining(probe, feat_dim=8, queue_size=16, scale=8.0, loss_type="am_softmax", margin=0.2)
    sst.train()
    start, count = distributed.shard_range(8, rank, world)
    out = {"loss": [], "grad": []}
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        images1, images2 = torch.randn(8, 3, 4, 4, generator=gen), torch.randn(8, 3, 4, 4, generator=gen)
        ids = torch.randperm(20, generator=gen)[:8]
        mine = slice(start, start + count)
        probe.zero_grad()
        loss = sst(probe, images1[mine], images2[mine], ids[mine])
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in probe.parameters()])
        distributed.all_reduce_(grads, "mean")  # what DDP does
        loss_mean = distributed.all_reduce_(loss.detach().clone(), "mean")
        with torch.no_grad():
            for p, g in zip(probe.parameters(), grads.split([p.numel() for p in probe.parameters()])):
                p.sub_(0.5 * g.view_as(p))
        sst.momentum_update(probe)
        out["loss"].append(loss_mean.item())
        out["grad"].append(grads)
        gallery_direct = sst.gallery(images1[mine])
    out["queue"] = {k: v.clone() for k, v in sst.prototypes.state_dict().items()}
    shuffled = sst.gallery_features(images1[mine])
    out["shuffled_gallery_ok"] = torch.allclose(shuffled, gallery_direct, atol=1e-6)
    return out


def _lvface_worker(rank: int, world: int) -> dict:
    """LVFace's Partial FC in the EPL stage (means updating) on 1 or 2 ranks; and AttributeLoss."""
    torch.manual_seed(0)
    pfc = build_lvface_partial_fc(8, 7, ncs_sample_rate=0.5, seed=1).double()
    LVFaceCurriculum(switch_epoch=0).apply(pfc, 0)
    start, count = distributed.shard_range(12, rank, world)
    out = {"loss": [], "emb_grad": [], "weight_grad": []}
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        emb = torch.randn(12, 8, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 7, (12,), generator=gen)
        mine = emb[start: start + count].clone().requires_grad_(True)
        pfc.zero_grad(set_to_none=True)
        loss = pfc(mine, labels[start: start + count])
        loss.backward()
        out["loss"].append(loss.item())
        out["emb_grad"].append(mine.grad)
        out["weight_grad"].append(pfc.weight.grad.clone())
    out["class_mean"] = pfc.margin_loss.class_mean.clone()
    # AttributeLoss: uneven numbers of known labels per rank, gradient averaged as DDP does.
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(10, 4, generator=gen), torch.randn(4, 2, generator=gen).requires_grad_(True)
    targets = (torch.rand(10, 2, generator=gen) > 0.5).float()
    valid = torch.rand(10, 2, generator=gen) > 0.3
    valid[:4] = False  # on 2 ranks, rank 0 holds 1 row with known labels and rank 1 five
    first, n = distributed.shard_range(10, rank, world)
    rows = slice(first, first + n)
    attr, _ = AttributeLoss(["a", "b"], pos_weight=[2.0, 0.5])(x[rows] @ w, targets[rows], valid[rows])
    attr.backward()
    out["attr"] = attr.item()
    out["attr_grad"] = distributed.all_reduce_(w.grad.clone(), "mean")
    out["sst"] = _sst_worker(rank, world)
    return out


@pytest.mark.slow
def test_modes_one_rank_equals_two_ranks(tmp_path):
    single = _lvface_worker(0, 1)
    ranks = run_ranks(_lvface_worker, 2, tmp_path)
    for step in range(3):
        for r in ranks:
            assert r["loss"][step] == pytest.approx(single["loss"][step], rel=1e-9)
        torch.testing.assert_close(torch.cat([r["emb_grad"][step] for r in ranks]), single["emb_grad"][step])
        torch.testing.assert_close(torch.cat([r["weight_grad"][step] for r in ranks]),
                                   single["weight_grad"][step])
    torch.testing.assert_close(torch.cat([r["class_mean"] for r in ranks]), single["class_mean"])
    assert single["class_mean"].abs().sum() > 0
    for r in ranks:
        assert r["attr"] == pytest.approx(single["attr"], rel=1e-6)
        torch.testing.assert_close(r["attr_grad"], single["attr_grad"])
        sst, ref = r["sst"], single["sst"]
        assert sst["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for g, g_ref in zip(sst["grad"], ref["grad"]):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
        for k, v in ref["queue"].items():
            torch.testing.assert_close(sst["queue"][k], v, rtol=1e-5, atol=1e-6)
        assert sst["shuffled_gallery_ok"]
    assert ref["loss"][0] > 0


def test_identity_pairs_cover_every_identity_once_per_epoch(packed_glint):
    manifest = json.loads((packed_glint / "manifest.json").read_text())
    loaders = [IdentityPairLoader(packed_glint, batch_size=4, rank=r, world_size=2, seed=3, num_workers=0,
                                  progress=False) for r in range(2)]
    seen = []
    for loader in loaders:
        assert loader.steps_per_epoch == manifest["num_classes"] // 2 // 4
        for images1, images2, ids in loader:
            assert images1.shape == (4, 3, 112, 112) and images1.dtype == torch.float32
            assert not torch.equal(images1, images2)  # two different images of the identity
            seen += ids.tolist()
        assert loader.epoch == 1
    assert len(seen) == len(set(seen)) == 2 * loaders[0].steps_per_epoch * 4
    # Resume mid-epoch: the rest of the epoch, the same identities as an uninterrupted run.
    loader = IdentityPairLoader(packed_glint, batch_size=4, seed=3, num_workers=0, progress=False)
    full = [ids.tolist() for _, _, ids in loader]
    resumed = IdentityPairLoader(packed_glint, batch_size=4, seed=3, num_workers=0, progress=False)
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 2})
    assert [ids.tolist() for _, _, ids in resumed] == full[2:]


def test_sst_learns_separable_identities():
    """Many identities, two noisy views each (the shallow-data setting): once the queue holds real
    gallery features the loss must fall."""
    torch.manual_seed(0)
    classes, dim, batch = 200, 32, 16
    centres = torch.randn(classes, dim)
    probe = nn.Sequential(nn.Linear(dim, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    sst = SemiSiameseTraining(probe, feat_dim=32, queue_size=64, scale=16.0, alpha=0.9)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    probe.train(), sst.train()
    losses = []
    for _ in range(240):
        ids = torch.randperm(classes)[:batch]
        views = [centres[ids] + 0.8 * torch.randn(batch, dim) for _ in range(2)]
        loss = sst(probe, *views, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sst.momentum_update(probe)
        losses.append(loss.item())
    assert np.mean(losses[-40:]) < 0.6 * np.mean(losses[10:50])


def test_sst_runs_on_real_pairs(packed_glint):
    torch.manual_seed(0)
    loader = IdentityPairLoader(packed_glint, batch_size=8, seed=0, num_workers=0, progress=False)
    net = _tiny_aaface(num_attributes=1, dim=32, freeze_backbone=False)
    probe = nn.Sequential(net.backbone, net.conv_a, net.conv_fr, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    sst = SemiSiameseTraining(probe, feat_dim=32, queue_size=16, scale=16.0, alpha=0.9)
    opt = torch.optim.SGD(probe.parameters(), lr=0.05, momentum=0.9)
    probe.train(), sst.train()
    start = [p.clone() for p in probe.parameters()]
    losses = []
    for epoch in range(2):
        for images1, images2, ids in loader:
            loss = sst(probe, images1, images2, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sst.momentum_update(probe)
            losses.append(loss.item())
    assert len(losses) == 2 * loader.steps_per_epoch and all(math.isfinite(v) for v in losses)
    queued = sst.prototypes.queue_ids.tolist()
    assert all(0 <= i < loader.num_classes for i in queued)  # the queue holds real gallery features now
    for g, p, p0 in zip(sst.gallery.parameters(), probe.parameters(), start):
        if not torch.equal(p, p0):  # the gallery trails the probe: between its start and the probe
            assert not torch.equal(g, p0) and not torch.equal(g, p)


def test_sst_index_leaves_out_a_record_with_an_out_of_range_label(packed_glint, tmp_path):
    """SST's identity index used to stop at start on one bad label; the record is left out and counted."""
    from pipeline.dataset import PackedDataset
    from tests._eval_helpers import with_extra_record
    from trainer.modes.sst import IdentityPairLoader, identity_index

    _, jpeg = PackedDataset(packed_glint).read_record(0)
    data = with_extra_record(packed_glint, tmp_path / "d", 999, jpeg)
    m = {"num_images": len(PackedDataset(data))}
    by_identity, bad = identity_index(PackedDataset(data), progress=False)
    assert bad == 1 and 0 not in [i for ids in by_identity for i in ids]
    assert sum(map(len, by_identity)) == m["num_images"] - 1
    loader = IdentityPairLoader(data, batch_size=2, num_workers=0, progress=False)
    assert loader.skipped_records == 1
