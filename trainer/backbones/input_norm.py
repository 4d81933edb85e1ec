"""Input normalisations a backbone can put before its stem (`input_norm=` of the backbones that take it).

`lcn`: local contrast normalisation. Each pixel has the Gaussian-weighted mean of its neighbourhood taken
away and is divided by the neighbourhood's RMS contrast, per channel. What is left is the face's local
structure, without the lighting's slow gradients, the print's tint or the camera's global contrast: the
things a network trained on a few hundred photos otherwise learns to tell people apart by (sepia prints,
one lit side). In the CPU demo (glint24, 5 held-out images per person) it lifts held-out verification on
every seed tried: 0.856-0.892 over 4 seeds (mean 0.878) against 0.80-0.88 before (bench/RESULTS.md). On
millions of images a network learns this invariance itself; there it is only a cost.

`imagenet`: the readers' [-1, 1] pixels re-normalised with ImageNet's per-channel mean and std, as
torchvision's `Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])` gives them (the CrossScan
hybrid's report, and any network started from ImageNet weights). In the network rather than in the
readers, so that every reader (DALI, nvJPEG, torch), evaluation and export see the same input.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_NORMS = ("none", "lcn", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LocalContrastNorm(nn.Module):
    """`[B, C, H, W]` -> `(x - mean_g(x)) / (sqrt(mean_g((x - mean_g x)^2)) + eps) * gain`, g a Gaussian.

    `sigma` is in pixels of the input it is given (112x112 crops: 3 px, about an eye's height).
    Reflect padding at the borders; the kernel is a non-persistent buffer, so state dicts are unchanged."""

    def __init__(self, sigma: float = 3.0, eps: float = 0.05, gain: float = 0.3):
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.radius = max(1, int(round(2 * sigma)))
        taps = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)
        self.eps, self.gain = eps, gain

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        # Separable, each channel on its own: the channels folded into the batch, so that the kernel has
        # a fixed shape (ONNX export needs one) whatever the channel count.
        b, c, h, w = x.shape
        r = self.radius
        k = self.kernel.to(x.dtype)
        x = x.reshape(-1, 1, h, w)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        return x.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the memory format it was given (channels-last stays channels-last)."""
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous()  # the channel fold of `_smooth` needs NCHW
        x = x - self._smooth(x)
        x = x / (self._smooth(x * x).sqrt() + self.eps) * self.gain
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def extra_repr(self) -> str:
        return f"radius={self.radius}, eps={self.eps}, gain={self.gain}"


class ImageNetNorm(nn.Module):
    """`[B, 3, H, W]` in [-1, 1] (RGB) -> `((x + 1) / 2 - mean) / std` per channel, ImageNet's statistics.
    Non-persistent buffers: state dicts are unchanged."""

    def __init__(self):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # (x + 1) / 2 - mean) / std = x * scale + shift
        self.register_buffer("scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def build_input_norm(kind: Optional[str]) -> nn.Module:
    """The module for `input_norm=` (None or "none": identity)."""
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "lcn":
        return LocalContrastNorm()
    if kind == "imagenet":
        return ImageNetNorm()
    raise ValueError(f"unknown input_norm {kind!r}; known: {', '.join(INPUT_NORMS)}")
