"""Training augmentations: the numpy reader and the DALI graph apply the same named options."""
import numpy as np
import pytest
import torch

from pipeline.augment import AugmentConfig, augment_numpy, erase_box
from pipeline.loader import build_train_loader, dali_available

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]
GREY = 128 / 127.5 - 1  # the erased value after normalisation


def _batch(data, backend: str, augment: dict) -> torch.Tensor:
    loader = build_train_loader(data, batch_size=32, device=torch.device("cpu"), backend=backend, num_threads=1,
                                seed=3, augment=augment)
    images, _ = next(iter(loader))
    return images


def _erased_share(images: torch.Tensor) -> np.ndarray:
    """Per image: the share of pixels at the erased grey in all three channels."""
    return ((images - GREY).abs() < 1e-3).all(1).float().mean((1, 2)).numpy()


def test_erase_box_stays_inside_and_spans_the_area_range():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        x, y, w, h = erase_box(112, 96, 0.25, rng)
        assert 0 <= x and x + w <= 96 and 0 <= y and y + h <= 112 and w >= 1 and h >= 1
        areas.append(w * h / (112 * 96))
    areas = np.array(areas)
    assert areas.min() < 0.03 and 0.2 < areas.max() <= 0.26
    assert 0.11 < areas.mean() < 0.15  # U(0.02, 0.25), a little less where the aspect ratio clips a side


def test_numpy_erase_fills_one_grey_rectangle():
    img = np.full((112, 112, 3), 30, np.uint8)
    out = augment_numpy(img, AugmentConfig(flip=False, erase_p=1.0), np.random.default_rng(1))
    ys, xs = np.nonzero((out == 128).all(2))
    assert ys.size > 0.02 * 112 * 112 - 10
    # A full rectangle: its bounding box is all grey.
    assert ys.size == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert (out[out[..., 0] != 128] == 30).all()
    assert (img == 30).all()  # the input is not written to


@pytest.mark.parametrize("backend", BACKENDS)
def test_erase_probability_and_area_in_either_reader(packed_glint, backend):
    never = _erased_share(_batch(packed_glint, backend, {"flip": True, "erase_p": 0.0}))
    always = _erased_share(_batch(packed_glint, backend, {"flip": True, "erase_p": 1.0, "erase_area": 0.25}))
    assert (never < 0.005).all()
    assert (always > 0.015).all() and (always < 0.27).all()
    assert 0.07 < always.mean() < 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_grey_copies_in_either_reader(packed_glint, backend):
    images = _batch(packed_glint, backend, {"flip": True, "grey_p": 1.0})
    assert torch.allclose(images[:, 0], images[:, 1], atol=2 / 127.5)
    assert torch.allclose(images[:, 1], images[:, 2], atol=2 / 127.5)
    coloured = _batch(packed_glint, backend, {"flip": True})
    assert (coloured[:, 0] - coloured[:, 2]).abs().mean() > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_and_colour_jitter_run_in_either_reader(packed_glint, backend):
    plain = _batch(packed_glint, backend, {"flip": False})
    jittered = _batch(packed_glint, backend, {"flip": False, "crop_area": 0.8, "brightness": 0.2,
                                               "contrast": 0.2, "saturation": 0.2})
    assert jittered.shape == plain.shape and jittered.dtype == torch.float32
    assert jittered.abs().max() <= 1.0 + 1e-6
    assert (jittered - plain).abs().mean() > 0.02


def test_unknown_augmentation_key_is_an_error():
    with pytest.raises(ValueError, match="erase_q"):
        AugmentConfig.from_dict({"erase_q": 0.5})


def test_record_uniforms_are_a_fixed_uniform_hash_of_seed_epoch_and_index():
    from pipeline.augment import DRAW_SLOTS, UniformStream, augment_uniforms, record_draws

    u = augment_uniforms(3, 1, np.arange(50_000))
    assert u.shape == (50_000, DRAW_SLOTS) and 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.std() - 12 ** -0.5) < 0.005
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.02 and abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.02
    # a record's numbers do not depend on the batch it is read in; seed and epoch change them all
    assert np.array_equal(augment_uniforms(3, 1, [7, 123])[1], u[123])
    assert not np.isclose(augment_uniforms(4, 1, [123]), u[123]).any()
    assert not np.isclose(augment_uniforms(3, 2, [123]), u[123]).any()
    stream = UniformStream(np.array([0.0, 0.999999, 0.5]))
    assert stream.integers(3, 7) == 3 and stream.integers(3, 7) == 6 and stream.uniform(2.0, 4.0) == 3.0
    with pytest.raises(IndexError):
        stream.random()
    cfg = AugmentConfig(crop_area=0.5, erase_p=1.0, brightness=0.1, contrast=0.1, saturation=0.1, grey_p=0.5)
    draws = record_draws(112, 96, cfg, 0, 0, range(200))  # every option on: the slots suffice
    assert all(d.crop is not None and d.erase is not None for d in draws)
    assert 60 < sum(d.flip for d in draws) < 140 and 60 < sum(d.grey for d in draws) < 140
