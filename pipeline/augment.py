"""Training augmentations, named once and applied by every reader (DALI graph, numpy, torch on the GPU)."""
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


@dataclass(frozen=True)
class AugmentDraw:
    """One sample's random choices, drawn once (`draw_augment`) and applied by the numpy reader
    (`apply_numpy`) or by the GPU readers on whole batches (`augment_torch`)."""

    crop: Optional[tuple[int, int, int, int]] = None  # (x, y, width, height) resized back to the image size
    flip: bool = False
    erase: Optional[tuple[int, int, int, int]] = None  # (x, y, width, height) set to ERASE_FILL
    colour: bool = False  # the float colour stage runs (some colour option is on)
    brightness: Optional[float] = None
    contrast: Optional[float] = None
    saturation: Optional[float] = None
    grey: bool = False


DRAW_SLOTS = 16  # uniforms per record: more than draw_augment ever takes (14)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def augment_uniforms(seed: int, epoch: int, indices) -> np.ndarray:
    """U[0, 1) float64 `[len(indices), DRAW_SLOTS]`: record `index`'s random numbers in `epoch`, a hash of
    (seed, epoch, index, slot), so every reader and worker draws the same for a record, and a whole batch
    costs one numpy call instead of a seeded generator per record (~30 us each, a GPU reader's budget)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        key = _splitmix64(key ^ np.uint64(epoch % 2**64))
        idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
        slot = np.arange(DRAW_SLOTS, dtype=np.uint64).reshape(1, -1)
        bits = _splitmix64(_splitmix64(key ^ idx) + slot * np.uint64(0x9E3779B97F4A7C15))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class UniformStream:
    """The slice of a numpy Generator's interface that `draw_augment` uses, over one row of
    `augment_uniforms`, consumed in order."""

    def __init__(self, uniforms: np.ndarray) -> None:
        self._u = uniforms.tolist()
        self._next = 0

    def random(self) -> float:
        if self._next >= len(self._u):
            raise IndexError(f"draw_augment took more than {len(self._u)} uniforms")
        self._next += 1
        return self._u[self._next - 1]

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integers(self, low: int, high: int) -> int:
        """An integer in [low, high), as Generator.integers."""
        return min(high - 1, low + int(self.random() * (high - low)))


def record_draws(h: int, w: int, cfg: AugmentConfig, seed: int, epoch: int, indices) -> list["AugmentDraw"]:
    """The draws of records `indices` in `epoch` (one vectorised hash for all of them)."""
    return [draw_augment(h, w, cfg, UniformStream(u)) for u in augment_uniforms(seed, epoch, indices)]


def draw_augment(h: int, w: int, cfg: AugmentConfig, rng) -> AugmentDraw:
    """The random choices of one h x w image, in a fixed order, from `rng` (a numpy Generator or a
    UniformStream: a record's draws do not depend on the reader that applies them)."""
    crop = None
    if cfg.crop_area < 1.0:
        area = rng.uniform(cfg.crop_area, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(0.9), np.log(1.1)))
        cw = int(round(min(w, np.sqrt(area * aspect))))
        ch = int(round(min(h, np.sqrt(area / aspect))))
        crop = (int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch)
    flip = bool(cfg.flip and rng.random() < 0.5)
    erase = None
    if cfg.erase_p > 0 and rng.random() < cfg.erase_p:
        erase = erase_box(h, w, cfg.erase_area, rng)
    colour = bool(cfg.brightness or cfg.contrast or cfg.saturation or cfg.grey_p)
    brightness = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness) if cfg.brightness > 0 else None
    contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) if cfg.contrast > 0 else None
    saturation = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) if cfg.saturation > 0 else None
    grey = bool(cfg.grey_p > 0 and rng.random() < cfg.grey_p)
    return AugmentDraw(crop, flip, erase, colour, brightness, contrast, saturation, grey)


def augment_numpy(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """The numpy twin of the DALI graph: HxWx3 uint8 in, HxWx3 uint8 out (normalisation comes later,
    per batch, so that worker processes hand over 4x fewer bytes)."""
    return apply_numpy(rgb, draw_augment(rgb.shape[0], rgb.shape[1], cfg, rng))


GREY_WEIGHTS = (0.299, 0.587, 0.114)


def apply_numpy(rgb: np.ndarray, d: AugmentDraw) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    img = rgb
    if d.crop is not None:
        x0, y0, cw, ch = d.crop
        img = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    if d.flip:
        img = img[:, ::-1]
    if d.erase is not None:
        img = np.array(img)
        ex, ey, ew, eh = d.erase
        img[ey:ey + eh, ex:ex + ew] = ERASE_FILL
    if not d.colour:
        return img
    out = img.astype(np.float32)
    if d.brightness is not None:
        out *= d.brightness
    if d.contrast is not None:
        m = out.mean()
        out = (out - m) * d.contrast + m
    if d.saturation is not None or d.grey:
        grey = (out @ np.array(GREY_WEIGHTS, dtype=np.float32))[..., None]
        if d.saturation is not None:
            out = grey + (out - grey) * d.saturation
        if d.grey:
            out = np.repeat(grey, 3, axis=2)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def augment_torch(images, draws: list[AugmentDraw]):
    """`apply_numpy` on a whole batch as tensor ops on its device: uint8 [B,3,H,W] in and out, one
    batched kernel per stage instead of one per image. The crop is a bilinear `grid_sample` with cv2's
    pixel-centre mapping (cv2 rounds its fixed-point weights, so a cropped pixel may differ by 1); the
    other stages match apply_numpy up to float32 summation order."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = images.shape
    dev = images.device
    x = images
    if any(d.crop is not None for d in draws):
        # output pixel centre u (normalised) samples input (x0 + (i + 0.5) * cw / w - 0.5), i.e.
        # u * cw / W + (2 * x0 + cw) / W - 1 in grid_sample's align_corners=False coordinates; clamped to
        # the crop's first and last pixel centres, as cv2 replicates the border of the cropped view
        theta = torch.zeros(b, 2, 3, dtype=torch.float32)
        low, high = torch.empty(b, 1, 1, 2), torch.empty(b, 1, 1, 2)
        for i, d in enumerate(draws):
            x0, y0, cw, ch = d.crop if d.crop is not None else (0, 0, w, h)
            theta[i, 0, 0], theta[i, 0, 2] = cw / w, (2 * x0 + cw) / w - 1
            theta[i, 1, 1], theta[i, 1, 2] = ch / h, (2 * y0 + ch) / h - 1
            low[i, 0, 0] = torch.tensor([(2 * x0 + 1) / w - 1, (2 * y0 + 1) / h - 1])
            high[i, 0, 0] = torch.tensor([(2 * (x0 + cw) - 1) / w - 1, (2 * (y0 + ch) - 1) / h - 1])
        grid = F.affine_grid(theta.to(dev), [b, 3, h, w], align_corners=False)
        grid = torch.maximum(torch.minimum(grid, high.to(dev)), low.to(dev))
        resized = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (resized + 0.5).clamp_(0, 255).to(torch.uint8)
    flips = [i for i, d in enumerate(draws) if d.flip]
    if flips:
        idx = torch.tensor(flips, device=dev)
        x = x.index_copy(0, idx, x.index_select(0, idx).flip(-1))
    boxes = [d.erase or (0, 0, 0, 0) for d in draws]
    if any(d.erase is not None for d in draws):
        ex, ey, ew, eh = torch.tensor(boxes, device=dev).unbind(1)
        cols, rows = torch.arange(w, device=dev), torch.arange(h, device=dev)
        inside = (((rows[None] >= ey[:, None]) & (rows[None] < (ey + eh)[:, None]))[:, :, None]
                  & ((cols[None] >= ex[:, None]) & (cols[None] < (ex + ew)[:, None]))[:, None, :])
        x = x.masked_fill(inside[:, None], ERASE_FILL)
    if not draws or not draws[0].colour:  # the colour options are the batch's config: all or none
        return x

    def per_sample(values) -> "torch.Tensor":
        return torch.tensor(values, dtype=torch.float32, device=dev).view(b, 1, 1, 1)

    out = x.float()
    if draws[0].brightness is not None:
        out = out * per_sample([d.brightness for d in draws])
    if draws[0].contrast is not None:
        m = out.mean((1, 2, 3), keepdim=True)
        out = (out - m) * per_sample([d.contrast for d in draws]) + m
    if draws[0].saturation is not None or any(d.grey for d in draws):
        weights = torch.tensor(GREY_WEIGHTS, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        grey = (out * weights).sum(1, keepdim=True)
        if draws[0].saturation is not None:
            out = grey + (out - grey) * per_sample([d.saturation for d in draws])
        is_grey = torch.tensor([d.grey for d in draws], device=dev).view(b, 1, 1, 1)
        out = torch.where(is_grey, grey.expand_as(out), out)
    return (out + 0.5).clamp_(0, 255).to(torch.uint8)


def erase_box(h: int, w: int, max_area: float, rng) -> tuple[int, int, int, int]:
    """(x, y, width, height) of a random-erasing rectangle inside an h x w image."""
    area = rng.uniform(ERASE_MIN_AREA, max(max_area, ERASE_MIN_AREA)) * h * w
    aspect = np.exp(rng.uniform(*np.log(ERASE_ASPECT)))
    ew = int(min(w, max(1, round(np.sqrt(area * aspect)))))
    eh = int(min(h, max(1, round(np.sqrt(area / aspect)))))
    return int(rng.integers(0, w - ew + 1)), int(rng.integers(0, h - eh + 1)), ew, eh


def normalise(batch_uint8_chw):
    """uint8 [B,3,H,W] (a torch tensor, on any device) to float32 in [-1, 1], as insightface does."""
    # In place after the one float copy: one batch-sized allocation, not three (issue N: a 128-image batch's
    # freed 19 MB temporaries raise glibc's mmap threshold, and the torch reader's heap grew to 1.4 GB over
    # one epoch of 10^4 images, 2 GB of 10^5)
    out = batch_uint8_chw.float()
    if out is batch_uint8_chw:  # already float32: the caller's tensor is never changed
        out = out.clone()
    return out.sub_(MEAN).div_(STD)
