"""pipeline/nvjpeg_reader.py on the CPU: the same code as on the GPU with torchvision's nvJPEG decode swapped
for a CPU JPEG decoder (PIL) producing the same uint8 CHW tensors. It must keep the DALI reader's contract
(rank sharding, equal full batches per rank, exact mid-epoch resume) and give the torch reader's batches:
the same records, augmentation draws and normalisation."""
from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.dataset import PackedDataset, TorchTrainLoader
from pipeline.loader import build_train_loader
from pipeline.manifest import load_manifest
from pipeline.nvjpeg_reader import DecoderUnavailable, NvjpegTrainLoader
from tests._eval_helpers import with_extra_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")
AUGMENT = {"flip": True, "erase_p": 0.5, "crop_area": 0.8, "brightness": 0.2, "contrast": 0.2,
           "saturation": 0.2, "grey_p": 0.2}


def pil_decode(data, device):
    """A CPU stand-in for torchvision.io.decode_jpeg(list, device='cuda', mode=RGB)."""
    return [torch.from_numpy(np.array(Image.open(io.BytesIO(d.numpy().tobytes())).convert("RGB")))
            .permute(2, 0, 1).contiguous().to(device) for d in data]


def nvjpeg(data, batch_size, **kw) -> NvjpegTrainLoader:
    kw.setdefault("device", "cpu")
    return NvjpegTrainLoader(data, batch_size, decode=pil_decode, **kw)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_record_once_per_epoch_over_the_ranks(unique_label_data, world):
    n = load_manifest(unique_label_data)["num_images"]
    for epoch in range(2):
        seen = collections.Counter()
        for rank in range(world):
            loader = nvjpeg(unique_label_data, 8, rank=rank, world_size=world, drop_last=False, seed=1)
            loader.epoch = epoch
            for images, labels in loader:
                assert images.dtype == torch.float32 and labels.dtype == torch.int64
                assert images.shape[1:] == (3, 112, 112) and -1.0 <= images.min() and images.max() <= 1.0
                seen.update(labels.tolist())
        assert sorted(seen) == list(range(n)) and max(seen.values()) == 1


def test_drop_last_gives_every_rank_the_same_full_batches(unique_label_data):
    loaders = [nvjpeg(unique_label_data, 8, rank=r, world_size=3, seed=2) for r in range(3)]
    labels = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == 101 // 3 // 8 and loader.epoch == 1
        assert all(images.shape[0] == 8 and y.shape == (8,) for images, y in batches)
        labels.append({v for _, y in batches for v in y.tolist()})
    assert not labels[0] & labels[1] and not labels[1] & labels[2] and not labels[0] & labels[2]


def test_mid_epoch_resume_equals_the_uninterrupted_run(unique_label_data):
    straight = nvjpeg(unique_label_data, 8, rank=1, world_size=2, seed=5, augment=AUGMENT)
    it = iter(straight)
    for _ in range(2):
        next(it)
    state = straight.state_dict()
    want = list(it) + list(straight)[:2]  # the rest of this epoch, then into the next
    resumed = nvjpeg(unique_label_data, 8, rank=1, world_size=2, seed=5, augment=AUGMENT)
    resumed.load_state_dict(state)
    got = list(resumed) + list(resumed)[:2]
    assert len(got) == len(want) == straight.steps_per_epoch - 2 + 2
    for (wi, wl), (gi, gl) in zip(want, got):
        assert torch.equal(wl, gl) and torch.equal(wi, gi)


def test_resume_on_another_world_size_reads_the_rest_once(unique_label_data):
    two = [nvjpeg(unique_label_data, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    first, states = collections.Counter(), []
    for loader in two:
        it = iter(loader)
        for _ in range(2):
            first.update(next(it)[1].tolist())
        states.append(loader.state_dict())
    one = nvjpeg(unique_label_data, 8, seed=3, drop_last=False)
    one.load_state_dict(states[0])
    rest = collections.Counter(v for _, y in one for v in y.tolist())
    assert not set(rest) & set(first) and len(rest) + len(first) == 101


@pytest.mark.parametrize("augment, tolerance", [({"flip": False}, 0), ({"flip": True, "erase_p": 0.5}, 0),
                                                 (AUGMENT, 2)])
def test_same_batches_as_the_torch_reader(unique_label_data, augment, tolerance):
    """The same records in the same order, the same augmentation draws and the same normalisation; the crop
    (grid_sample vs cv2's fixed-point weights) moves about a tenth of the pixels by one level, which the
    colour jitter may stretch to two."""
    ours = nvjpeg(unique_label_data, 16, seed=7, augment=augment, drop_last=False)
    theirs = TorchTrainLoader(unique_label_data, 16, seed=7, augment=augment, drop_last=False, num_workers=0)
    pairs = list(zip(ours, theirs))
    assert len(pairs) == len(theirs) == 7
    for (oi, ol), (ti, tl) in pairs:
        assert torch.equal(ol, tl)
        diff = (oi - ti).abs() * 127.5
        assert diff.max() <= tolerance + 1e-3, diff.max()
        if tolerance:
            assert diff.mean() < 0.25  # most pixels exact
    images = torch.cat([oi for (oi, _), _ in pairs])
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_normalisation_is_the_torch_readers_on_one_record(unique_label_data):
    ours = nvjpeg(unique_label_data, 1, augment={"flip": False}, shuffle=False, drop_last=False)
    image, label = next(iter(ours))
    header, data = ours.dataset.read_record(0)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)
    expected = torch.from_numpy((rgb - 127.5) / 127.5).permute(2, 0, 1)
    assert label.tolist() == [int(ours.dataset.label_vector(header)[0])] and torch.equal(image[0], expected)


def test_label_vectors_and_the_backend_registration(packed_glint):
    loader = build_train_loader(packed_glint, batch_size=8, backend="nvjpeg", device="cpu", num_threads=1,
                                return_label_vectors=True, seed=1)
    assert isinstance(loader, NvjpegTrainLoader) and loader.num_threads == 1
    loader.decode = pil_decode
    images, identities, vectors = next(iter(loader))
    assert vectors.shape == (8, len(loader.label_fields)) and vectors.dtype == torch.float32
    assert torch.equal(vectors[:, 0].long(), identities)
    with pytest.raises(ValueError, match="dali, nvjpeg, torch"):
        build_train_loader(packed_glint, batch_size=8, backend="nvjpg")


def _both_readers_agree(data, num_classes: int) -> None:
    """The nvjpeg and torch readers give the same batches and the same count of replaced records (1)."""
    ours = nvjpeg(data, 32, shuffle=False, drop_last=False, augment={"flip": False})
    theirs = TorchTrainLoader(data, 32, shuffle=False, drop_last=False, augment={"flip": False},
                              num_workers=0)
    for (oi, ol), (ti, tl) in zip(ours, theirs):
        assert torch.equal(ol, tl) and torch.equal(oi, ti)
        assert int(ol.max()) < num_classes
    assert ours.skipped_records == theirs.skipped_records == 1


def test_an_undecodable_record_is_replaced_and_counted(packed_glint, tmp_path):
    data = with_extra_record(packed_glint, tmp_path / "d", 3, b"\xff\xd8\xff\xe0 broken jpeg")
    _both_readers_agree(data, load_manifest(data)["num_classes"])


def test_default_decoder_names_what_is_missing(unique_label_data):
    try:
        import torchvision.io  # noqa: F401
        pytest.skip("torchvision loads here")
    except Exception:  # noqa: BLE001
        pass
    loader = NvjpegTrainLoader(unique_label_data, 8, device="cpu")
    with pytest.raises(DecoderUnavailable, match="backend 'nvjpeg' needs torchvision"):
        next(iter(loader))


def test_an_out_of_range_label_is_skipped_and_counted_as_in_the_torch_reader(packed_glint, tmp_path):
    """A record labelled 999 in a 24-class set: both readers replace it with the next usable record."""
    _, jpeg = PackedDataset(packed_glint).read_record(0)  # a real face, relabelled 999
    data = with_extra_record(packed_glint, tmp_path / "d", 999, jpeg)
    _both_readers_agree(data, load_manifest(data)["num_classes"])
