"""Putting a rendered mask layer onto the photo so that it belongs there: the face's lighting, the crop's
blur, noise and colour cast, a soft contact shadow, feathered edges, and grey (or toned) masks on
grey (or toned) photos.

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


# One-hue photos (black and white, toned, duotone) vary in chroma around their tint by at most this much
# (95th percentile of the per-pixel distance from the mean (a, b), CIELAB units): at most 3.7 on the
# one-hue glint24 crops, at least 5.5 on the colour ones (a cold-graded still, then sepia prints).
MONO_CHROMA = 4.5


@dataclass(frozen=True)
class CropStats:
    """What the mask is matched to, measured on the crop."""

    grey: bool  # one hue: a black-and-white or toned photo; the mask takes its luminance and the tint
    blur: float  # Gaussian sigma of the crop's edges, pixels
    noise: float  # noise sigma, in [0, 1] units
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # a one-hue photo's RGB per unit of luma


def luminance(rgb: np.ndarray) -> np.ndarray:
    """`[H, W]` luma of a float32 RGB image (a 2D image is returned as it is)."""
    if rgb.ndim == 2:
        return rgb
    out = cv2.transform(np.ascontiguousarray(rgb), _LUMA[None, :])
    return out if out.ndim == 2 else out[..., 0]


def chroma_spread(rgb_u8: np.ndarray) -> float:
    """95th percentile of each pixel's chroma distance (CIELAB a, b) from the photo's mean chroma: near 0
    for grey and toned photos whatever their tint. A percentile, not a maximum: JPEG's chroma rounding,
    a coloured logo or a few stray pixels leave a photo one-hued."""
    if rgb_u8.ndim == 2 or rgb_u8.shape[2] == 1:
        return 0.0
    # Every other pixel of every other row: a percentile needs no more, and this runs on every crop.
    # CIELAB from the sRGB formulas here, not cv2.cvtColor: OpenCV builds its Lab tables on first use,
    # 0.1 s of CPU in every worker process, more than masking 15 crops.
    lin = cv2.LUT(np.ascontiguousarray(rgb_u8[::2, ::2]), _SRGB_LINEAR)
    xyz = cv2.transform(lin, _RGB_TO_XYZ_WHITE)
    f = np.cbrt(xyz)
    low = xyz <= _F(0.008856)  # CIELAB's linear segment near black
    if low.any():
        f[low] = xyz[low] * _F(7.787) + _F(16 / 116)
    a = _F(500) * (f[..., 0] - f[..., 1])
    b = _F(200) * (f[..., 1] - f[..., 2])
    dist = cv2.magnitude(a - _F(cv2.mean(a)[0]), b - _F(cv2.mean(b)[0])).ravel()
    k = int(0.95 * (dist.size - 1))
    return float(np.partition(dist, k)[k])


_levels = np.arange(256) / 255.0
_SRGB_LINEAR = np.where(_levels <= 0.04045, _levels / 12.92,
                        ((_levels + 0.055) / 1.055) ** 2.4).astype(np.float32).reshape(1, 256)
# Linear sRGB to CIE XYZ (D65), each row over the white point's X, Y, Z: white is (1, 1, 1).
_RGB_TO_XYZ_WHITE = (np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                               [0.019334, 0.119193, 0.950227]])
                     / np.array([[0.950456], [1.0], [1.088754]])).astype(np.float32)


def is_grey(rgb_u8: np.ndarray, tolerance: float = MONO_CHROMA) -> bool:
    """True for one-hue photos: grey, or grey with one tint (sepia, a cold cast); see `chroma_spread`."""
    return chroma_spread(rgb_u8) <= tolerance


def photo_tint(rgb_u8: np.ndarray) -> tuple[float, float, float]:
    """The photo's mean RGB per unit of its mean luma: (1, 1, 1) on a grey photo."""
    if rgb_u8.ndim == 2 or rgb_u8.shape[2] == 1:
        return (1.0, 1.0, 1.0)
    mean = np.array(cv2.mean(rgb_u8)[:3])
    luma = float(mean @ _LUMA)
    if luma < 1.0:
        return (1.0, 1.0, 1.0)
    return tuple(float(c) for c in mean / luma)


def estimate_blur(lum: np.ndarray, blurred_grad: np.ndarray | None = None) -> float:
    """Gaussian sigma of the image's edges by re-blurring (Zhuo & Sim, 2011): at an edge blurred by s,
    the ratio R of gradient magnitudes before and after an extra blur s0 gives s = s0 / sqrt(R^2 - 1)."""
    lum = lum.astype(np.float32, copy=False)
    g1 = _grad(lum)
    g2 = _grad(cv2.GaussianBlur(lum, (0, 0), REBLUR_SIGMA)) if blurred_grad is None else blurred_grad
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
    # Sobel's own scale (an exact power of two) instead of a multiply after it: the same numbers.
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    return cv2.magnitude(gx, gy)


def estimate_noise(lum: np.ndarray, blurred_grad: np.ndarray | None = None) -> float:
    """Noise sigma by Immerkaer's (1996) Laplacian-difference operator, over the flattest half of the
    image so that texture is not taken for noise."""
    lum = lum.astype(np.float32, copy=False)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    resp = np.abs(cv2.filter2D(lum, -1, kernel))[1:-1, 1:-1]
    if blurred_grad is None:
        blurred_grad = _grad(cv2.GaussianBlur(lum, (0, 0), REBLUR_SIGMA))
    grad = blurred_grad[1:-1, 1:-1]
    g = grad.ravel()
    flat = resp[grad <= np.partition(g, g.size // 2)[g.size // 2]]
    if flat.size == 0:
        return 0.0
    return float(np.sqrt(np.pi / 2) * flat.mean() / 6.0)


def measure(rgb_u8: np.ndarray) -> CropStats:
    lum = luminance(rgb_u8.astype(np.float32) * _F(1 / 255))
    # Both estimators look at the luminance's gradient after the same small blur: computed once.
    soft = _grad(cv2.GaussianBlur(lum, (0, 0), REBLUR_SIGMA))
    grey = is_grey(rgb_u8)
    return CropStats(grey=grey, blur=estimate_blur(lum, soft), noise=min(estimate_noise(lum, soft), 0.05),
                     tint=photo_tint(rgb_u8) if grey else (1.0, 1.0, 1.0))


_RIDGE = 1e-6 * np.eye(6)


def lighting_field(lum: np.ndarray, alpha: np.ndarray, origin: tuple[int, int] = (0, 0),
                   size: int | None = None) -> tuple[np.ndarray, float]:
    """(a quadratic surface fitted to the luminance where the mask goes, its mean there).

    `lum` and `alpha` may be a window of a crop whose larger side is `size`, with its top-left pixel at
    `origin` (x, y) (even, so that the window samples the crop's own grid): the surface is the crop's.

    A surface, not a blur: a blur of the face would print the mouth and nostrils onto the mask. One
    refit without the worst residuals keeps an open mouth or a beard from tilting it.
    """
    h, w = lum.shape
    x0, y0 = origin
    # Every other pixel of every other row is plenty for six coefficients.
    sub = alpha[::2, ::2] > 0.5
    ys, xs = np.nonzero(sub)
    if xs.size < 12:
        ref = float(lum.mean())
        return np.full_like(lum, ref), ref
    target = lum[::2, ::2][sub].astype(np.float64)
    scale = 2.0 / (size or max(h, w))
    x, y = (xs * 2 + x0) * scale - 1, (ys * 2 + y0) * scale - 1
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], 1)
    b, t = basis, target
    for _ in range(2):
        coef = np.linalg.solve(b.T @ b + _RIDGE, b.T @ t)
        r = t - b @ coef  # the residuals of the points fitted
        std = np.sqrt(max(float(r @ r) / r.size - (float(r.sum()) / r.size) ** 2, 0.0))
        keep = np.abs(target - basis @ coef) <= 1.5 * std + 1e-6
        b, t = basis[keep], target[keep]
    gx = np.arange(x0, x0 + w, dtype=np.float32) * _F(scale) - _F(1)
    gy = (np.arange(y0, y0 + h, dtype=np.float32) * _F(scale) - _F(1))[:, None]
    c = coef.astype(np.float32)
    field = c[0] + c[1] * gx + c[2] * gy + c[3] * gx * gx + c[4] * gx * gy + c[5] * gy * gy
    return field.astype(np.float32), float(t.mean())


def _window(box: tuple[int, int, int, int], shape: tuple[int, int], pad: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): `box` (x, y, width, height) grown by `pad` within `shape`, its origin even."""
    x, y, bw, bh = box
    h, w = shape
    x0, y0 = max(x - pad, 0) & ~1, max(y - pad, 0) & ~1
    return x0, y0, min(x + bw + pad, w), min(y + bh + pad, h)


def composite(rgb_u8: np.ndarray, layer: np.ndarray, rng: np.random.Generator,
              stats: CropStats | None = None, keep_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend a premultiplied RGBA layer `[H, W, 4]` onto an RGB uint8 crop; returns (uint8 RGB, alpha).

    `keep_out` (`[H, W]`, 1 = never) is applied after every blur, so nothing spreads back into it."""
    h, w = rgb_u8.shape[:2]
    stats = stats or measure(rgb_u8)
    box = cv2.boundingRect(cv2.compare(layer[..., 3], 0, cv2.CMP_GT))  # of the layer's nonzero alpha
    if box[2] == 0:
        return rgb_u8.copy(), np.zeros((h, w), np.float32)
    size = max(h, w) / 112.0
    extra = np.sqrt(max(stats.blur ** 2 - RENDER_BLUR ** 2, 0.0))
    sigma = float(np.hypot(extra, 0.45 * size))  # never less than a feathered edge
    shadow_sigma = 1.5 * size
    shift = max(1, int(round(size)))
    # Only the mask's box changes, grown by what the blur and the shadow below it reach (4 sigma: the
    # tails beyond are under half a level): the rest of the crop is copied as it is.
    pad = int(np.ceil(4 * sigma + 4 * shadow_sigma)) + shift
    x0, y0, x1, y1 = _window(box, (h, w), pad)
    r, g, b, alpha = cv2.split(layer[y0:y1, x0:x1])
    win_u8 = rgb_u8[y0:y1, x0:x1]
    wh, ww = win_u8.shape[:2]
    img = win_u8.astype(np.float32) * _F(1 / 255)
    lum = luminance(img)

    # Lighting: a smooth field fitted to the face's luminance under the mask carries shadows and light
    # falloff across the mask; the overall level dims masks in dark photos.
    light, ref = lighting_field(lum, alpha, (x0, y0), max(h, w))
    relative = cv2.pow(cv2.min(cv2.max(light * _F(1 / max(ref, 1e-3)), 0.35), 1.6), 0.85)
    gain = relative * _F(np.clip((ref / 0.5) ** 0.4, 0.55, 1.15))
    if stats.grey:
        # A one-hue photo: the mask's own luminance in the photo's tint (grey on a grey photo).
        y = (r * _F(0.299) + g * _F(0.587) + b * _F(0.114)) * gain
        planes = [y * _F(t) for t in stats.tint]
    else:
        # The photo's colour cast (grey world, over the whole crop), gently.
        mean_rgb = np.array(cv2.mean(rgb_u8)[:3]) / 255.0
        cast = (mean_rgb / max(float(mean_rgb.mean()), 1e-3)) ** 0.35
        planes = [p * gain * _F(c) for p, c in zip((r, g, b), cast)]

    # The crop's blur, on colour and alpha alike (premultiplied, so the edge blurs as a real edge).
    r, g, b, alpha = cv2.split(cv2.GaussianBlur(cv2.merge(planes + [alpha]), (0, 0), sigma))
    if stats.noise > 0:
        grain = rng.standard_normal((wh, ww), dtype=np.float32) * _F(stats.noise) * alpha
        r, g, b = (p + grain * _F(t) for p, t in zip((r, g, b), stats.tint))
    if keep_out is not None:
        allowed = _F(1) - keep_out[y0:y1, x0:x1]
        r, g, b, alpha = r * allowed, g * allowed, b * allowed, alpha * allowed

    # A contact shadow just outside the mask's edge, mostly below it (light from above).
    shadow = cv2.GaussianBlur(alpha, (0, 0), shadow_sigma)
    shadow = np.concatenate([np.zeros((shift, ww), np.float32), shadow[:-shift]], 0)
    keep = (_F(1) - alpha) * (_F(1) - _F(0.22) * shadow * (_F(1) - alpha))
    out = [p * keep + c for p, c in zip(cv2.split(img), (r, g, b))]
    image = rgb_u8.copy()
    image[y0:y1, x0:x1] = cv2.convertScaleAbs(cv2.merge(out), alpha=255.0)
    full_alpha = np.zeros((h, w), np.float32)
    full_alpha[y0:y1, x0:x1] = alpha
    return image, full_alpha
