"""Putting a rendered mask layer onto the photo so that it belongs there: the face's lighting, the crop's
blur, noise and colour cast, a soft contact shadow, feathered edges, and grey masks on grey photos.

A sharp, clean, evenly lit mask on a blurred, noisy crop would be a shortcut a network learns instead of
the face; every statistic the mask gets here is measured on the crop itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_F = np.float32
# Rec. 601 luma, as JPEG uses.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
RENDER_BLUR = 0.5  # pixels: the blur a bilinear texture lookup and the feathering already give
REBLUR_SIGMA = 1.0
# The re-blur estimate of a perfectly sharp pixel edge: the sampling and the 3x3 derivative's own width.
# Measured on synthetic steps; subtracted in quadrature.
GRADIENT_BLUR = 0.8


@dataclass(frozen=True)
class CropStats:
    """What the mask is matched to, measured on the crop."""

    grey: bool
    blur: float  # Gaussian sigma of the crop's edges, pixels
    noise: float  # noise sigma, in [0, 1] units


def luminance(rgb: np.ndarray) -> np.ndarray:
    """`[H, W]` luma of a float32 RGB image (a 2D image is returned as it is)."""
    if rgb.ndim == 2:
        return rgb
    out = cv2.transform(np.ascontiguousarray(rgb), _LUMA[None, :])
    return out if out.ndim == 2 else out[..., 0]


def is_grey(rgb_u8: np.ndarray, tolerance: int = 3) -> bool:
    """True when the channels agree (within JPEG's chroma rounding) on all but 1% of the pixels."""
    if rgb_u8.ndim == 2 or rgb_u8.shape[2] == 1:
        return True
    r, g, b = cv2.split(rgb_u8)
    spread = cv2.max(cv2.absdiff(r, g), cv2.absdiff(g, b))
    return cv2.countNonZero(cv2.compare(spread, tolerance, cv2.CMP_GT)) <= 0.01 * spread.size


def estimate_blur(lum: np.ndarray) -> float:
    """Gaussian sigma of the image's edges by re-blurring (Zhuo & Sim, 2011): at an edge blurred by s,
    the ratio R of gradient magnitudes before and after an extra blur s0 gives s = s0 / sqrt(R^2 - 1)."""
    lum = lum.astype(np.float32)
    g1 = _grad(lum)
    g2 = _grad(cv2.GaussianBlur(lum, (0, 0), REBLUR_SIGMA))
    border = 3
    g1, g2 = g1[border:-border, border:-border], g2[border:-border, border:-border]
    flat = g1.ravel()
    k = int(0.9 * (flat.size - 1))
    strong = g1 > max(float(np.partition(flat, k)[k]), 0.02)
    if strong.sum() < 10:
        return 0.0
    ratio = g1[strong] / np.maximum(g2[strong], 1e-6)
    ratio = ratio[ratio > 1.001]
    if ratio.size == 0:
        return 4.0
    sigmas = REBLUR_SIGMA / np.sqrt(ratio ** 2 - 1)
    sigma = float(np.partition(sigmas, sigmas.size // 2)[sigmas.size // 2])
    return float(np.clip(np.sqrt(max(sigma ** 2 - GRADIENT_BLUR ** 2, 0.0)), 0.0, 4.0))


def _grad(img: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3) * _F(0.125)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3) * _F(0.125)
    return cv2.magnitude(gx, gy)


def estimate_noise(lum: np.ndarray) -> float:
    """Noise sigma by Immerkaer's (1996) Laplacian-difference operator, over the flattest half of the
    image so that texture is not taken for noise."""
    lum = lum.astype(np.float32)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    resp = np.abs(cv2.filter2D(lum, -1, kernel))[1:-1, 1:-1]
    grad = _grad(cv2.GaussianBlur(lum, (0, 0), 1.0))[1:-1, 1:-1]
    g = grad.ravel()
    flat = resp[grad <= np.partition(g, g.size // 2)[g.size // 2]]
    if flat.size == 0:
        return 0.0
    return float(np.sqrt(np.pi / 2) * flat.mean() / 6.0)


def measure(rgb_u8: np.ndarray) -> CropStats:
    lum = luminance(rgb_u8.astype(np.float32) * _F(1 / 255))
    return CropStats(grey=is_grey(rgb_u8), blur=estimate_blur(lum), noise=min(estimate_noise(lum), 0.05))


def lighting_field(lum: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, float]:
    """(a quadratic surface fitted to the luminance where the mask goes, its mean there).

    A surface, not a blur: a blur of the face would print the mouth and nostrils onto the mask. One
    refit without the worst residuals keeps an open mouth or a beard from tilting it.
    """
    h, w = lum.shape
    # Every other pixel of every other row is plenty for six coefficients.
    sub = alpha[::2, ::2] > 0.5
    ys, xs = np.nonzero(sub)
    if xs.size < 12:
        ref = float(lum.mean())
        return np.full_like(lum, ref), ref
    target = lum[::2, ::2][sub].astype(np.float64)
    scale = 2.0 / max(h, w)
    x, y = xs * (2 * scale) - 1, ys * (2 * scale) - 1
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], 1)
    keep = np.ones(target.size, bool)
    for _ in range(2):
        b = basis[keep]
        coef = np.linalg.solve(b.T @ b + 1e-6 * np.eye(6), b.T @ target[keep])
        resid = target - basis @ coef
        keep = np.abs(resid) <= 1.5 * resid[keep].std() + 1e-6
    gx = np.arange(w, dtype=np.float32) * _F(scale) - _F(1)
    gy = (np.arange(h, dtype=np.float32) * _F(scale) - _F(1))[:, None]
    c = coef.astype(np.float32)
    field = c[0] + c[1] * gx + c[2] * gy + c[3] * gx * gx + c[4] * gx * gy + c[5] * gy * gy
    return field.astype(np.float32), float(target[keep].mean())


def composite(rgb_u8: np.ndarray, layer: np.ndarray, rng: np.random.Generator,
              stats: CropStats | None = None, keep_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend a premultiplied RGBA layer `[H, W, 4]` onto an RGB uint8 crop; returns (uint8 RGB, alpha).

    `keep_out` (`[H, W]`, 1 = never) is applied after every blur, so nothing spreads back into it."""
    h, w = rgb_u8.shape[:2]
    stats = stats or measure(rgb_u8)
    r, g, b, alpha = cv2.split(layer)
    if not cv2.countNonZero(cv2.compare(alpha, 0, cv2.CMP_GT)):
        return rgb_u8.copy(), alpha
    img = rgb_u8.astype(np.float32) * _F(1 / 255)
    lum = luminance(img)
    size = max(h, w) / 112.0

    # Lighting: a smooth field fitted to the face's luminance under the mask carries shadows and light
    # falloff across the mask; the overall level dims masks in dark photos.
    light, ref = lighting_field(lum, alpha)
    relative = cv2.pow(cv2.min(cv2.max(light * _F(1 / max(ref, 1e-3)), 0.35), 1.6), 0.85)
    gain = relative * _F(np.clip((ref / 0.5) ** 0.4, 0.55, 1.15))
    # The photo's colour cast (grey world), gently.
    mean_rgb = np.array(cv2.mean(img)[:3])
    cast = (mean_rgb / max(float(mean_rgb.mean()), 1e-3)) ** 0.35
    planes = [p * gain * _F(c) for p, c in zip((r, g, b), cast)]
    if stats.grey:
        y = planes[0] * _F(0.299) + planes[1] * _F(0.587) + planes[2] * _F(0.114)
        planes = [y, y, y]

    # The crop's blur, on colour and alpha alike (premultiplied, so the edge blurs as a real edge).
    extra = np.sqrt(max(stats.blur ** 2 - RENDER_BLUR ** 2, 0.0))
    sigma = float(np.hypot(extra, 0.45 * size))  # never less than a feathered edge
    r, g, b, alpha = cv2.split(cv2.GaussianBlur(cv2.merge(planes + [alpha]), (0, 0), sigma))
    if stats.noise > 0:
        grain = rng.standard_normal((h, w), dtype=np.float32) * _F(stats.noise) * alpha
        r, g, b = r + grain, g + grain, b + grain
    if keep_out is not None:
        allowed = _F(1) - keep_out
        r, g, b, alpha = r * allowed, g * allowed, b * allowed, alpha * allowed

    # A contact shadow just outside the mask's edge, mostly below it (light from above).
    shadow = cv2.GaussianBlur(alpha, (0, 0), 1.5 * size)
    shift = max(1, int(round(size)))
    shadow = np.concatenate([np.zeros((shift, w), np.float32), shadow[:-shift]], 0)
    keep = (_F(1) - alpha) * (_F(1) - _F(0.22) * shadow * (_F(1) - alpha))
    out = [p * keep + c for p, c in zip(cv2.split(img), (r, g, b))]
    return cv2.convertScaleAbs(cv2.merge(out), alpha=255.0), alpha
