"""The training readers (DALI, nvJPEG, PyTorch, SST's identity pairs), and the trainer tests' stand-in for
them, are each a `pipeline.loader.TrainLoader`."""
from __future__ import annotations

import inspect

import pytest

from pipeline.dataset import TorchTrainLoader
from pipeline.loader import TrainLoader
from tests._trainer_helpers import FakeLoader
from trainer.modes.sst import IdentityPairLoader

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = ("__iter__", "__len__", "state_dict", "load_state_dict")


def _dali(data):
    pytest.importorskip("nvidia.dali")
    from pipeline.dali_reader import DaliTrainLoader

    return DaliTrainLoader(data, batch_size=8, rank=1, world_size=2, seed=1)


def _nvjpeg(data):
    from pipeline.nvjpeg_reader import NvjpegTrainLoader
    from tests.test_nvjpeg_reader import pil_decode

    return NvjpegTrainLoader(data, batch_size=8, rank=1, world_size=2, seed=1, device="cpu", decode=pil_decode)


def _torch(data):
    return TorchTrainLoader(data, batch_size=8, rank=1, world_size=2, seed=1, num_workers=0)


def _sst(data):
    return IdentityPairLoader(data, batch_size=2, rank=1, world_size=2, seed=1, num_workers=0, progress=False)


def _fake(data):
    return FakeLoader()


def conformance_faults(loader) -> list[str]:
    """What keeps `loader` from being a TrainLoader: missing members, other method parameters, wrong types."""
    faults = []
    if not isinstance(loader, TrainLoader):
        faults.append("not a TrainLoader (a member is missing)")
    for name in METHODS:
        mine = getattr(type(loader), name, None)
        if mine is None:
            continue
        want = list(inspect.signature(getattr(TrainLoader, name)).parameters)
        got = list(inspect.signature(mine).parameters)
        if got != want:
            faults.append(f"{name}{tuple(got)} differs from {name}{tuple(want)}")
    for name in ("batch_size", "rank", "world_size", "num_classes", "epoch", "skipped_records"):
        if not isinstance(getattr(loader, name, None), int):
            faults.append(f"{name} is not an int")
    return faults


@pytest.mark.parametrize("make", [_dali, _nvjpeg, _torch, _sst, _fake], ids=["dali", "nvjpeg", "torch", "sst", "fake"])
def test_each_training_loader_is_a_train_loader(make, packed_glint):
    loader = make(packed_glint)
    assert conformance_faults(loader) == []
    # The trainer counts steps from steps_per_epoch; the epoch's length must agree with it.
    assert loader.steps_per_epoch >= 1 and len(loader) == loader.steps_per_epoch
    assert loader.epoch == 0 and loader.skipped_records == 0
    state = loader.state_dict()
    loader.load_state_dict(state)
    assert loader.epoch == 0


def test_the_conformance_check_finds_faults():
    class NoCounter:
        batch_size = rank = world_size = num_classes = epoch = 1
        steps_per_epoch = 1

        def __iter__(self):
            return iter(())

        def __len__(self) -> int:
            return 1

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self) -> None:  # the trainer passes the saved state
            pass

    faults = conformance_faults(NoCounter())
    assert "not a TrainLoader (a member is missing)" in faults
    assert any(f.startswith("load_state_dict") for f in faults)
    assert "skipped_records is not an int" in faults
