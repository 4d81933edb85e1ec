"""Local contrast normalisation in front of a backbone (`input_norm="lcn"`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.backbones import build_backbone
from trainer.backbones.input_norm import LocalContrastNorm, build_input_norm


def _reference(x: np.ndarray, sigma: float, eps: float, gain: float) -> np.ndarray:
    """The same definition, one pixel at a time: a 2D Gaussian window with reflected borders."""
    r = max(1, int(round(2 * sigma)))
    taps = np.arange(-r, r + 1)
    g = np.exp(-taps ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    w2 = np.outer(g, g)

    def smooth(img: np.ndarray) -> np.ndarray:
        p = np.pad(img, r, mode="reflect")
        out = np.empty_like(img)
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                out[i, j] = (p[i:i + 2 * r + 1, j:j + 2 * r + 1] * w2).sum()
        return out

    d = x - smooth(x)
    return d / (np.sqrt(smooth(d * d)) + eps) * gain


def test_lcn_matches_its_definition_pixel_by_pixel():
    x = np.random.default_rng(0).uniform(-1, 1, (20, 17)).astype(np.float64)
    lcn = LocalContrastNorm(sigma=1.5, eps=0.05, gain=0.3).double()
    got = lcn(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, _reference(x, 1.5, 0.05, 0.3), rtol=1e-5, atol=1e-7)  # the kernel is float32


def test_lcn_removes_tint_offset_gradient_and_contrast():
    """What it is for: a face's local structure comes out the same under another print's offset and
    contrast, and under a lighting ramp (away from the borders, where the window is reflected)."""
    rng = np.random.default_rng(1)
    face = torch.from_numpy(rng.uniform(-0.5, 0.5, (1, 3, 48, 48)).astype(np.float64))
    ramp = torch.linspace(-0.4, 0.4, 48, dtype=torch.float64).view(1, 1, 1, 48)
    lcn = LocalContrastNorm(eps=0.0).double()
    base = lcn(face)
    relit = lcn(1.7 * (face + ramp) + torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64).view(1, 3, 1, 1))
    inner = (slice(None), slice(None), slice(13, -13), slice(13, -13))
    torch.testing.assert_close(relit[inner], base[inner], rtol=1e-5, atol=1e-6)
    flat = LocalContrastNorm().double()(torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64))
    assert flat.abs().max() < 1e-6  # no structure, nothing out (eps keeps 0 / 0 away)


def test_backbone_with_lcn_keeps_its_state_dict_and_runs_channels_last():
    kw = dict(embedding_size=64, scale=1, units=(1, 2, 3, 1), resolution=56)
    plain, normed = build_backbone("mbf", **kw), build_backbone("mbf", input_norm="lcn", **kw)
    assert plain.state_dict().keys() == normed.state_dict().keys()
    normed.load_state_dict(plain.state_dict())
    normed.eval()
    x = torch.randn(3, 3, 112, 112)
    want = normed(x)
    got = normed.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain.eval()
    assert not torch.allclose(plain(x), want)  # it is in the path


def test_unknown_input_norm_is_refused():
    assert isinstance(build_input_norm(None), torch.nn.Identity)
    with pytest.raises(ValueError, match="unknown input_norm 'clahe'"):
        build_input_norm("clahe")
    with pytest.raises(ValueError, match="sigma"):
        LocalContrastNorm(sigma=0)


def test_backbone_with_lcn_exports_to_onnx(tmp_path):
    """The kernel has a fixed shape, so the exported graph matches PyTorch (export checks, or raises)."""
    from trainer.model_io.export import export_onnx

    model = build_backbone("mbf", embedding_size=32, scale=1, units=(1, 2, 3, 1), resolution=56,
                           input_norm="lcn").eval()
    export_onnx(model, tmp_path / "lcn.onnx")
    assert (tmp_path / "lcn.onnx").stat().st_size > 0


def test_imagenet_norm_is_torchvisions_normalize_of_the_same_pixels():
    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float()
    ours = build_input_norm("imagenet")((pixels - 127.5) / 127.5)  # what the readers give
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(ours, (pixels / 255 - mean) / std)  # ToTensor + Normalize
    net = build_backbone("mbf", embedding_size=32, input_norm="imagenet")
    assert set(net.state_dict()) == set(build_backbone("mbf", embedding_size=32).state_dict())
