"""Training augmentations, named once and applied by either reader (DALI graph or numpy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

MEAN = 127.5  # insightface normalises faces to [-1, 1]
STD = 127.5
# Random erasing's box: area share from U(ERASE_MIN_AREA, erase_area), aspect ratio log-uniform in
# ERASE_ASPECT; filled with the grey that normalises to 0. Shared by the numpy and DALI readers.
ERASE_MIN_AREA = 0.02
ERASE_ASPECT = (0.3, 3.3)
ERASE_FILL = int(MEAN + 0.5)


@dataclass(frozen=True)
class AugmentConfig:
    """Flip is insightface's only augmentation; the others are off unless asked for."""

    flip: bool = True
    crop_area: float = 1.0  # random resized crop keeping at least this share of the area (1.0 = off)
    brightness: float = 0.0  # multiply by U(1-b, 1+b)
    contrast: float = 0.0  # scale around the mean by U(1-c, 1+c)
    saturation: float = 0.0  # scale the distance from grey by U(1-s, 1+s)
    grey_p: float = 0.0  # probability of a greyscale copy
    # Random erasing (Zhong et al., 2020): with probability erase_p, a rectangle of U(0.02, erase_area)
    # of the image, aspect ratio in [0.3, 3.3], is filled with mid grey (0 after normalisation), so that
    # no single part of the face can carry the identity alone.
    erase_p: float = 0.0
    erase_area: float = 0.25

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "AugmentConfig":
        if d is None:
            return cls()
        if isinstance(d, AugmentConfig):
            return d
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown augmentation keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(flip=False)


def augment_numpy(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """The numpy twin of the DALI graph: HxWx3 uint8 in, HxWx3 uint8 out (normalisation comes later,
    per batch, so that worker processes hand over 4x fewer bytes)."""
    import cv2

    h, w = rgb.shape[:2]
    img = rgb
    if cfg.crop_area < 1.0:
        area = rng.uniform(cfg.crop_area, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(0.9), np.log(1.1)))
        cw = int(round(min(w, np.sqrt(area * aspect))))
        ch = int(round(min(h, np.sqrt(area / aspect))))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        img = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    if cfg.flip and rng.random() < 0.5:
        img = img[:, ::-1]
    if cfg.erase_p > 0 and rng.random() < cfg.erase_p:
        img = np.array(img)
        ex, ey, ew, eh = erase_box(h, w, cfg.erase_area, rng)
        img[ey:ey + eh, ex:ex + ew] = ERASE_FILL
    if not (cfg.brightness or cfg.contrast or cfg.saturation or cfg.grey_p):
        return img
    out = img.astype(np.float32)
    if cfg.brightness > 0:
        out *= rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    if cfg.contrast > 0:
        m = out.mean()
        out = (out - m) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + m
    if cfg.saturation > 0 or cfg.grey_p > 0:
        grey = (out @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
        if cfg.saturation > 0:
            out = grey + (out - grey) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        if cfg.grey_p > 0 and rng.random() < cfg.grey_p:
            out = np.repeat(grey, 3, axis=2)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def erase_box(h: int, w: int, max_area: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(x, y, width, height) of a random-erasing rectangle inside an h x w image."""
    area = rng.uniform(ERASE_MIN_AREA, max(max_area, ERASE_MIN_AREA)) * h * w
    aspect = np.exp(rng.uniform(*np.log(ERASE_ASPECT)))
    ew = int(min(w, max(1, round(np.sqrt(area * aspect)))))
    eh = int(min(h, max(1, round(np.sqrt(area / aspect)))))
    return int(rng.integers(0, w - ew + 1)), int(rng.integers(0, h - eh + 1)), ew, eh


def normalise(batch_uint8_chw):
    """uint8 [B,3,H,W] (a torch tensor, on any device) to float32 in [-1, 1], as insightface does."""
    return (batch_uint8_chw.float() - MEAN) / STD
