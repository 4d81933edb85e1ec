"""Checkpoints in one process: round trip, exact continuation, atomicity, finding the last good one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests._trainer_helpers import FakeLoader, TinyNet
from trainer import checkpoint as ckpt
from trainer.config import Config
from trainer.losses import CombinedMarginLoss
from trainer.model_io.load import load_backbone
from trainer.optim import build_optimizer
from trainer.partial_fc import PartialFC
from trainer.step import train_step

CFG = Config(network="tiny", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999),
             eps=1e-8)


class Run:
    """Everything a training run checkpoints, built fresh (as a restarted process would)."""

    def __init__(self, sample_rate: float = 1.0, optimizer: str = "sgd", num_classes: int = 10,
                 seed: int = 0):
        torch.manual_seed(seed)
        cfg = Config(CFG, optimizer=optimizer)
        self.backbone = TinyNet()
        self.pfc = PartialFC(CombinedMarginLoss(16.0, 1.0, 0.3, 0.0), 16, num_classes,
                             sample_rate=sample_rate,
                             seed=5)
        self.opt_b = build_optimizer(cfg, self.backbone.parameters())
        self.opt_fc = build_optimizer(cfg, self.pfc.parameters(), row_sparse=True)
        self.loader = FakeLoader(num_classes=num_classes, batch_size=6, steps_per_epoch=4)
        self.batches = iter(self._forever())
        self.state = ckpt.TrainState()

    def _forever(self):
        while True:
            yield from self.loader

    def steps(self, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            r = train_step(self.backbone, self.pfc, [next(self.batches)], [self.opt_b, self.opt_fc],
                           None, None, 5.0)
            self.state.step += 1
            losses.append(r.loss)
        return losses

    def save(self, output: Path, keep: int = 2) -> Path:
        return ckpt.save_checkpoint(output, self.state, cfg=CFG, network_kwargs={"embedding_size": 16},
                                    backbone=self.backbone, partial_fc=self.pfc, opt_backbone=self.opt_b,
                                    opt_fc=self.opt_fc, scaler=None, loader=self.loader, keep=keep)

    def load(self, path: Path) -> None:
        self.state = ckpt.load_checkpoint(path, backbone=self.backbone, partial_fc=self.pfc,
                                          opt_backbone=self.opt_b,
                                          opt_fc=self.opt_fc, scaler=None, loader=self.loader,
                                          device=torch.device("cpu"))
        self.batches = iter(self._forever())


@pytest.mark.parametrize("sample_rate, optimizer", [(1.0, "sgd"), (0.5, "sgd"), (0.5, "adamw")])
def test_resume_continues_exactly(tmp_path, sample_rate, optimizer):
    a = Run(sample_rate, optimizer)
    a.steps(6)  # mid-epoch (4 batches per epoch)
    path = a.save(tmp_path)
    expected = a.steps(3)

    b = Run(sample_rate, optimizer, seed=123)  # another init: everything must come from the checkpoint
    b.load(path)
    assert b.state.step == 6 and b.loader.epoch == 1 and b.loader.step == 2
    assert b.steps(3) == expected  # bit for bit: weights, optimizer rows, sampler RNG, reader position
    torch.testing.assert_close(b.pfc.weight, a.pfc.weight, rtol=0, atol=0)
    for (k, v), w in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=0, atol=0, msg=k)


def test_full_copy_matches_shards_and_reloads(tmp_path):
    a = Run(0.5, "sgd")
    a.steps(3)
    path = a.save(tmp_path)
    full = torch.load(path / ckpt.FC_FULL, weights_only=False)
    torch.testing.assert_close(full["fc"]["weight"], a.pfc.weight.detach())
    rows = a.opt_fc.state[a.pfc.weight]
    torch.testing.assert_close(full["fc"]["optimizer_state"]["momentum_buffer"], rows["momentum_buffer"])
    # the rank-free copy alone rebuilds the classifier and its optimizer rows
    b = Run(0.5, "sgd", seed=9)
    b.pfc.load_full_state(full["fc"], b.opt_fc)
    torch.testing.assert_close(b.pfc.weight, a.pfc.weight)
    torch.testing.assert_close(b.opt_fc.state[b.pfc.weight]["row_step"], rows["row_step"])


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    a = Run()
    a.steps(2)
    first = a.save(tmp_path)
    weights_at_first = a.pfc.weight.detach().clone()
    a.steps(2)

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # second file of the checkpoint: half written, then the process "dies"
            f.write(b"\x00" * 100)
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        a.save(tmp_path)
    monkeypatch.setattr(torch, "save", real_save)

    assert ckpt.find_checkpoint(tmp_path) == first
    assert (tmp_path / ckpt.CHECKPOINTS / ckpt.LATEST).read_text().strip() == first.name
    assert not (tmp_path / ckpt.CHECKPOINTS / ckpt.step_dir_name(4)).exists()
    leftovers = [p.name for p in (tmp_path / ckpt.CHECKPOINTS).rglob("*") if p.name.endswith(".tmp")]
    # only the unfinished folder, never anything under a final name
    assert leftovers == [ckpt.step_dir_name(4) + ".tmp"]
    b = Run(seed=3)
    b.load(ckpt.find_checkpoint(tmp_path))
    assert b.state.step == 2
    torch.testing.assert_close(b.pfc.weight, weights_at_first, rtol=0, atol=0)
    # the next good save clears the debris
    a.save(tmp_path)
    assert not list((tmp_path / ckpt.CHECKPOINTS).glob("*.tmp"))


def test_atomic_torch_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    ckpt.atomic_torch_save({"v": 1}, path)

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        ckpt.atomic_torch_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pt"]


def test_find_checkpoint_forms_and_pruning(tmp_path):
    a = Run()
    paths = []
    for _ in range(3):
        a.steps(1)
        paths.append(a.save(tmp_path, keep=2))
    steps = sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir() if p.is_dir())
    assert steps == [ckpt.step_dir_name(2), ckpt.step_dir_name(3)]  # keep=2
    assert ckpt.find_checkpoint(tmp_path) == paths[-1]
    assert ckpt.find_checkpoint(tmp_path / ckpt.CHECKPOINTS) == paths[-1]
    assert ckpt.find_checkpoint(paths[1]) == paths[1]
    assert ckpt.find_checkpoint(paths[1] / ckpt.TRAIN_STATE) == paths[1]
    assert ckpt.find_checkpoint(tmp_path / "nothing") is None
    # a garbled `latest` falls back to the newest complete folder
    (tmp_path / ckpt.CHECKPOINTS / ckpt.LATEST).write_text("step_99999999\n")
    assert ckpt.find_checkpoint(tmp_path) == paths[-1]
    # a folder missing a rank file is not complete
    (paths[-1] / ckpt.rank_file(0)).unlink()
    assert ckpt.find_checkpoint(tmp_path) == paths[1]


def test_incompatible_checkpoint_is_refused(tmp_path):
    a = Run(num_classes=10)
    a.steps(1)
    path = a.save(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="12 x 16"):
        Run(num_classes=12).load(path)


def test_a_classifier_that_does_not_fit_another_world_size_is_a_checkpoint_error(tmp_path):
    a = Run(num_classes=10)
    a.steps(1)
    path = a.save(tmp_path)
    # As if saved on 2 ranks (so that loading re-shards fc_full.pt), with a torn classifier in it.
    saved = torch.load(path / ckpt.TRAIN_STATE, weights_only=False)
    saved["train_state"]["world_size"] = 2
    torch.save(saved, path / ckpt.TRAIN_STATE)
    full = torch.load(path / ckpt.FC_FULL, weights_only=False)
    full["fc"]["weight"] = full["fc"]["weight"][:9]
    torch.save(full, path / ckpt.FC_FULL)
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.FC_FULL}: full weight must be"):
        Run(num_classes=10).load(path)
    assert issubclass(ckpt.CheckpointError, ValueError)  # one error type with trainer.model_io's


def test_model_file_rebuilds_the_backbone(tmp_path):
    from trainer.backbones import build_backbone

    net = build_backbone("mbf", embedding_size=32)
    path = tmp_path / ckpt.MODEL_FILE
    ckpt.save_model(path, net, "mbf", {"embedding_size": 32, "dropout": 0.0}, extra={"step": 7})
    again = load_backbone(path)
    for (k, v), w in zip(net.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=0, atol=0, msg=k)
    assert torch.load(path, weights_only=True)["step"] == 7
    with pytest.raises(ckpt.CheckpointError, match="backbone alone"):
        ckpt.find_checkpoint(path)


def test_uneven_partial_fc_reshards_on_resume_row_for_row(tmp_path):
    """11 classes saved from 2 ranks (6 + 5 rows) and loaded on 1 and on 3 ranks (4 + 4 + 3): every
    class row of the weight and of every per-row optimizer tensor is the row that was saved."""
    from tests._ckpt_reshard_helpers import KINDS, load_worker, save_worker
    from tests._pfc_helpers import TRAIN, run_ranks

    classes = TRAIN["c"]
    assert classes % 2 and classes % 3  # the split is uneven on 2 and on 3 ranks
    run_ranks(2, save_worker, str(tmp_path))
    for world in (1, 3):
        run_ranks(world, load_worker, str(tmp_path))
    for kind in KINDS:
        folder = ckpt.find_checkpoint(tmp_path / kind)
        saved = [torch.load(folder / ckpt.rank_file(r), weights_only=False)["fc"] for r in range(2)]
        assert [s["num_local"] for s in saved] == [6, 5]
        saved_state = {k: torch.cat([s["optimizer_state"][k] for s in saved])
                       for k, v in saved[0]["optimizer_state"].items()
                       if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == saved[0]["num_local"]}
        assert saved_state, f"{kind}: no per-row optimizer state was saved"
        saved_weight = torch.cat([s["weight"] for s in saved])
        for world in (1, 3):
            loaded = [torch.load(tmp_path / f"loaded_{kind}_w{world}_r{r}.pt", weights_only=False)
                      for r in range(world)]
            assert [s["class_start"] for s in loaded] == [sum(s["num_local"] for s in loaded[:r])
                                                          for r in range(world)]
            assert sum(s["num_local"] for s in loaded) == classes
            for s in loaded:
                rows = slice(s["class_start"], s["class_start"] + s["num_local"])
                torch.testing.assert_close(s["weight"], saved_weight[rows], rtol=0, atol=0)
                assert set(saved_state) <= set(s["optimizer_state"]), (kind, world)
                for key, full in saved_state.items():
                    torch.testing.assert_close(s["optimizer_state"][key], full[rows], rtol=0, atol=0,
                                               msg=f"{kind} {key} on {world} ranks")
