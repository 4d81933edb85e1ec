"""Procedural mask textures, drawn in the UV space of the face mesh: shape alpha, colours, pleats, seams,
welds, valves, straps and printed fabric patterns. Everything is generated from the image's random
stream; no image files are used.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .shapes import MaskShape

PATTERNS = ("plain", "stripes", "dots", "check", "plaid", "camo", "floral", "chevron")
_CLOTH_PATTERN_P = (0.2, 0.14, 0.14, 0.12, 0.1, 0.1, 0.12, 0.08)

# Colours as sRGB in [0, 1].
_SURGICAL = ((0.56, 0.76, 0.90), (0.36, 0.66, 0.76), (0.93, 0.94, 0.94), (0.95, 0.73, 0.79),
             (0.13, 0.13, 0.14), (0.57, 0.81, 0.71), (0.71, 0.66, 0.86), (0.60, 0.63, 0.66))
_KN95 = ((0.94, 0.94, 0.93), (0.12, 0.12, 0.13), (0.62, 0.63, 0.65), (0.95, 0.76, 0.80),
         (0.62, 0.78, 0.92), (0.85, 0.78, 0.66))
_N95 = ((0.95, 0.95, 0.94), (0.92, 0.90, 0.84), (0.80, 0.81, 0.82), (0.60, 0.70, 0.80), (0.91, 0.88, 0.72))
_STRAP = ((0.95, 0.85, 0.25), (0.93, 0.93, 0.93), (0.25, 0.45, 0.80), (0.85, 0.35, 0.30))


@dataclass(frozen=True)
class UVCanvas:
    """A texture image over the UV rectangle [u0, u1] x [v0, v1]; texel (x, y) centres at integer coords."""

    u0: float
    u1: float
    v0: float
    v1: float
    width: int
    height: int

    @classmethod
    def for_size(cls, size: int) -> "UVCanvas":
        # A little over one texel per output pixel on a frontal face (1 u is about 0.7 of the crop's
        # width, 1 v about 1.15 of its height): the remap shrinks the texture rather than stretching it.
        ku, kv = 0.9 * size, 1.3 * size
        u0, u1, v0, v1 = -0.2, 1.2, 0.4, 1.12  # the eyes end at v 0.40; a mask never reaches above 0.43
        return cls(u0, u1, v0, v1, int(round((u1 - u0) * ku)), int(round((v1 - v0) * kv)))

    @property
    def ku(self) -> float:
        return self.width / (self.u1 - self.u0)

    @property
    def kv(self) -> float:
        return self.height / (self.v1 - self.v0)

    def texel(self, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Texel coordinates (x, y) of UV points `[..., 2]`."""
        return (uv[..., 0] - self.u0) * self.ku - 0.5, (uv[..., 1] - self.v0) * self.kv - 0.5

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """u of every column, v of every row."""
        return _axes(self)


@lru_cache(maxsize=8)
def _axes(c: UVCanvas) -> tuple[np.ndarray, np.ndarray]:
    u = c.u0 + (np.arange(c.width, dtype=np.float32) + 0.5) / c.ku
    v = c.v0 + (np.arange(c.height, dtype=np.float32) + 0.5) / c.kv
    return u, v


@dataclass(frozen=True)
class Style:
    """What a mask looks like beyond its outline."""

    colour: tuple[float, float, float]
    pattern: str = "plain"
    second: tuple[float, float, float] = (1.0, 1.0, 1.0)
    third: tuple[float, float, float] = (0.0, 0.0, 0.0)
    period: float = 10.0  # pattern period in texels at a 112-pixel output
    angle: float = 0.0
    pleats: int = 0
    valve: float = 0.0  # n95: valve centre's offset from the middle in u (0: none)
    nose_clip: bool = False
    strap: tuple[float, float, float] = (0.93, 0.93, 0.93)
    seed: int = 0


def _jitter(rng: np.random.Generator, colour, amount: float = 0.04) -> tuple[float, float, float]:
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 1)) for c in colour)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.15, 0.9), rng.uniform(0.15, 0.95)
    return colorsys.hsv_to_rgb(h, s, v)


def draw_style(kind: str, rng: np.random.Generator) -> Style:
    seed = int(rng.integers(1 << 31))
    if kind == "surgical":
        return Style(_jitter(rng, _pick(rng, _SURGICAL)), pleats=int(rng.integers(2, 4)),
                     strap=_jitter(rng, (0.94, 0.94, 0.94), 0.03), seed=seed)
    if kind == "kn95":
        colour = _jitter(rng, _pick(rng, _KN95))
        return Style(colour, strap=colour if rng.random() < 0.5 else (0.93, 0.93, 0.93), seed=seed)
    if kind == "n95":
        valve = float(rng.choice([-1, 1]) * rng.uniform(0.12, 0.17)) if rng.random() < 0.35 else 0.0
        return Style(_jitter(rng, _pick(rng, _N95)), valve=valve, nose_clip=bool(rng.random() < 0.7),
                     strap=_pick(rng, _STRAP), second=_jitter(rng, _pick(rng, _N95 + _STRAP)), seed=seed)
    if kind != "cloth":
        raise ValueError(f"unknown mask type {kind!r}")
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=_CLOTH_PATTERN_P))]
    base = _random_colour(rng)
    second = _random_colour(rng)
    # A print needs contrast to be a print; a washed-out second colour is pushed away from the base.
    if abs(sum(base) - sum(second)) < 0.6:
        second = tuple(float(np.clip(1.0 - c * 0.7, 0, 1)) if sum(base) < 1.5 else c * 0.4 for c in second)
    return Style(base, pattern=pattern, second=second, third=_random_colour(rng),
                 period=float(rng.uniform(6, 16)), angle=float(rng.uniform(0, np.pi)), strap=base, seed=seed)


_F = np.float32


def _smooth_step(x: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in texels (positive inside)."""
    return cv2.min(cv2.max(x + _F(0.5), 0.0), 1.0)


def _on(mask: np.ndarray, amount: float) -> np.ndarray:
    return mask * _F(amount)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float, normal: bool = True) -> np.ndarray:
    """Smooth value noise in about [-1, 1] with features of `cell` texels, from normal values or (with
    `normal=False`) uniform ones of the same variance."""
    h, w = shape
    size = (max(2, int(h / cell) + 2), max(2, int(w / cell) + 2))
    if normal:
        small = rng.standard_normal(size, dtype=np.float32)
    else:
        small = (rng.random(size, dtype=np.float32) - _F(0.5)) * _F(np.sqrt(12.0))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _grain(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """The fabric's grain: `_noise` from uniform values. At a cell of about one texel there are as many
    values as texels, and uniform ones cost a fifth of normal ones (0.15 ms a mask); a grain of a few
    percent of the shade looks the same either way."""
    return _noise(rng, shape, cell, normal=False)


def _mix(planes: list, other, m: np.ndarray) -> list:
    """Per channel: planes + (other - planes) * m (colours as 3 planes or 3 scalars)."""
    return [a + (_F(b) - a) * m for a, b in zip(planes, other)]


def render_texture(shape: MaskShape, style: Style, canvas: UVCanvas) -> np.ndarray:
    """The mask texture `[H, W, 4]` float32 on `canvas`: RGB in [0, 1] premultiplied by alpha, then alpha.

    Premultiplied, so that resampling and blurring never pull the background's black into the edges."""
    rng = np.random.default_rng(style.seed)
    u, v = canvas.axes()
    ku, kv = _F(canvas.ku), _F(canvas.kv)
    scale = canvas.ku / (0.9 * 112)  # feature sizes below are in texels of a 112-pixel output
    top = shape.top_at(u).astype(np.float32)
    bot = shape.bottom_at(u).astype(np.float32)
    du = float(u[1] - u[0])
    # Vertical distances to a sloped edge, divided by the slope's secant: true distances, near enough.
    tnorm = (kv / np.sqrt(1 + (_slope(top, du) * (kv / ku)) ** 2)).astype(np.float32)
    bnorm = (kv / np.sqrt(1 + (_slope(bot, du) * (kv / ku)) ** 2)).astype(np.float32)
    U, V = u[None, :], v[:, None]
    d_top = (V - top) * tnorm
    d_bot = (bot - V) * bnorm
    d_side = np.minimum((u - _F(shape.left)) * ku, (_F(shape.right) - u) * ku)[None, :]
    edge = np.minimum(np.minimum(d_top, d_bot), d_side)
    # Rounded corners: the distance to the intersection of the edges' half-planes, corners filleted by r.
    r = _F(max(shape.corner * canvas.ku, 2.0))
    out2 = cv2.max(r - d_top, 0.0) ** 2 + cv2.max(r - d_bot, 0.0) ** 2 + \
        np.maximum(r - d_side, 0) ** 2
    alpha = _smooth_step((r - np.sqrt(out2)) * _F(1 / 1.2))

    t = cv2.min(cv2.max((V - top) / np.maximum(bot - top, _F(1e-3)), 0.0), 1.0)
    s = (U - _F(0.5)) * _F(2.0 / (shape.right - shape.left))
    px = (U - _F(0.5)) * ku  # texel coordinates centred on the face's midline
    py = (V - top[canvas.width // 2]) * kv
    h, w = alpha.shape
    colour = [np.full((h, w), c, np.float32) for c in style.colour]
    shade = np.ones((h, w), np.float32)

    if shape.kind == "surgical":
        _surgical(shade, t, s, edge, d_top, U, scale, style)
        shade += _F(0.025) * _grain(rng, (h, w), 1.0 * scale)
    elif shape.kind == "kn95":
        _kn95(shade, edge, U, px, py, canvas.ku, scale)
        shade += _F(0.02) * _grain(rng, (h, w), 1.0 * scale)
    elif shape.kind == "n95":
        colour = _n95(colour, shade, edge, d_top, s, t, U, V, top, bot, canvas, scale, style)
        shade += _F(0.03) * _grain(rng, (h, w), 1.5 * scale)
    else:
        colour = _pattern(colour, style, px, py, rng, scale)
        _cloth(shade, edge, U, py, canvas.ku, scale)
        shade += _F(0.035) * _grain(rng, (h, w), 0.8 * scale) + _F(0.03) * _grain(rng, (h, w), 6 * scale)

    rgb = [cv2.min(cv2.max(c * shade, 0.0), 1.0) for c in colour]
    alpha, rgb = _loops(alpha, rgb, shape, style, top, bot, canvas, scale)
    return cv2.merge([c * alpha for c in rgb] + [alpha])


def _slope(f: np.ndarray, step: float) -> np.ndarray:
    """`np.gradient(f, step)` of a 1D array (central differences, one-sided at the ends), the same numbers
    without its general-case overhead (two calls per texture)."""
    out = np.empty_like(f)
    out[1:-1] = (f[2:] - f[:-2]) / (2.0 * step)
    out[0] = (f[1] - f[0]) / step
    out[-1] = (f[-1] - f[-2]) / step
    return out


def _surgical(shade, t, s, edge, d_top, U, scale, style: Style) -> None:
    # Pleats: each fold is lit on top and falls into shadow toward the next fold below it.
    n = style.pleats
    lo, hi = 0.18, 0.86
    phase = (t - _F(lo)) * _F(n / (hi - lo))
    frac = phase - np.floor(phase)
    inside = (phase >= 0) & (phase < n) & (np.abs(s) < 0.9)
    shade -= inside * (_F(0.14) * frac - _F(0.05))
    shade += _on(inside & (frac < 0.06), 0.06)
    # Bonded side strips and hemmed top/bottom edges with a stitch line.
    shade += _on(np.abs(s) >= 0.9, 0.03)
    shade -= _on(edge < 3.5 * scale, 0.05)
    shade -= _on(np.abs(edge - _F(2.0 * scale)) < 0.5 * scale, 0.06)
    # The nose wire: a ridge along the top edge over the nose.
    wire = (np.abs(U - _F(0.5)) < 0.09) & (d_top > 0.8 * scale) & (d_top < 2.6 * scale)
    shade += _on(wire, 0.08)


def _kn95(shade, edge, U, px, py, ku, scale) -> None:
    # Two panels folded along the midline: one faces the light a little more than the other.
    shade -= _on(U > 0.5, 0.04)
    shade -= _on(np.abs(U - _F(0.5)) * _F(ku) < 0.9 * scale, 0.16)
    # Ultrasonic weld dots along the edge.
    ring = (edge > 1.5 * scale) & (edge < 3.0 * scale)
    dots = np.sin((px + py) * _F(2 * np.pi / (3.2 * scale))) > 0.2
    shade -= _on(ring & dots, 0.12)
    shade -= _on(edge < 1.2 * scale, 0.05)


def _n95(colour, shade, edge, d_top, s, t, U, V, top, bot, canvas: UVCanvas, scale, style: Style):
    # A rigid cup: brightest at its crown, darker toward the rim, with a rolled rim band.
    r2 = s ** 2 + (_F(2) * t - _F(1.1)) ** 2
    shade -= _F(0.1) * cv2.min(r2, 1.5)
    shade -= _on(edge < 3.0 * scale, 0.08)
    if style.nose_clip:
        clip = (np.abs(U - _F(0.5)) < 0.07) & (d_top > 1.2 * scale) & (d_top < 4.0 * scale)
        colour = _mix(colour, (0.75, 0.75, 0.75), clip.astype(np.float32))
    if style.valve:
        cu = 0.5 + style.valve
        u, _ = canvas.axes()
        cv = float(np.interp(cu, u, (top + bot) / 2)) + 0.03
        dx, dy = (U - _F(cu)) * _F(canvas.ku), (V - _F(cv)) * _F(canvas.kv)
        rr = np.sqrt(dx ** 2 + dy ** 2)
        rad = 5.5 * scale
        valve = rr < rad
        colour = _mix(colour, style.second, _smooth_step(_F(rad) - rr))
        shade += valve * (_F(0.06) - _F(0.12 / rad ** 2) * rr ** 2)
        slots = valve & (rr < 0.7 * rad) & (np.abs(np.sin(dy * _F(np.pi / (1.3 * scale)))) < 0.35)
        shade -= _on(slots, 0.25)
        shade -= _on(np.abs(rr - _F(rad)) < 0.6 * scale, 0.2)
    return colour


def _cloth(shade, edge, U, py, ku, scale) -> None:
    off = np.abs(U - _F(0.5)) * _F(ku)
    shade -= _on(off < 0.7 * scale, 0.14)
    stitches = (np.abs(off - _F(2.0 * scale)) < 0.45 * scale) & (np.sin(py * _F(2 * np.pi / (2.5 * scale))) > 0)
    shade -= _on(stitches, 0.06)
    shade -= _on(edge < 2.5 * scale, 0.07)


def _stripes(coord: np.ndarray, period: float, duty: float = 0.5) -> np.ndarray:
    """Anti-aliased 0/1 bands across `coord` (texels)."""
    p = _F(period)
    f = coord / p
    f -= np.floor(f)
    inside = np.minimum(f, _F(duty) - f)
    outside = np.minimum(f - _F(duty), _F(1) - f)
    return _smooth_step(np.where(f < duty, inside, -outside) * p)


def _pattern(colour: list, style: Style, px, py, rng, scale) -> list:
    p = style.period * scale
    h, w = colour[0].shape
    px = np.broadcast_to(px, (h, w))
    py = np.broadcast_to(py, (h, w))
    ca, sa = _F(np.cos(style.angle)), _F(np.sin(style.angle))
    if style.pattern == "plain":
        return colour
    if style.pattern == "stripes":
        return _mix(colour, style.second, _stripes(px * ca + py * sa, p, 0.45))
    if style.pattern == "chevron":
        zig = np.abs(px / _F(p) - np.floor(px / _F(p)) - _F(0.5)) * _F(p)
        return _mix(colour, style.second, _stripes(py + zig, p * 0.8))
    if style.pattern == "dots":
        row = np.floor(py / _F(p))
        x = px + (row % 2) * _F(p / 2)
        dx = x - (np.floor(x / _F(p)) + _F(0.5)) * _F(p)
        dy = py - (row + _F(0.5)) * _F(p)
        return _mix(colour, style.second, _smooth_step(_F(0.28 * p) - np.sqrt(dx ** 2 + dy ** 2)))
    if style.pattern == "check":
        return _mix(colour, style.second, _F(0.5) * (_stripes(px, p) + _stripes(py, p)))
    if style.pattern == "plaid":
        a = px * ca + py * sa
        b = py * ca - px * sa
        out = _mix(colour, style.second, _F(0.45) * (_stripes(a, p * 1.6, 0.35) + _stripes(b, p * 1.6, 0.35)))
        thin = np.maximum(_stripes(a + _F(p * 0.8), p * 1.6, 0.08), _stripes(b + _F(p * 0.8), p * 1.6, 0.08))
        return _mix(out, style.third, thin)
    if style.pattern == "camo":
        levels = np.digitize(_noise(rng, (h, w), 2.2 * p), [-0.5, 0.0, 0.6])
        palette = np.array([style.colour, style.second, style.third,
                            0.5 * (np.array(style.colour) + np.array(style.third))], np.float32)
        return [palette[:, c][levels] for c in range(3)]
    if style.pattern == "floral":
        return _floral(colour, style, rng, p)
    raise ValueError(f"unknown pattern {style.pattern!r}")


def _floral(colour: list, style: Style, rng: np.random.Generator, p: float) -> list:
    """Five-petal flowers scattered over the fabric, drawn at 1/16-texel precision."""
    h, w = colour[0].shape
    petals = np.zeros((h, w), np.uint8)
    hearts = np.zeros((h, w), np.uint8)
    count = int(h * w / (p * p * 2.2))
    petal = max(1.0, p * 0.22)
    sub = 16
    for cx, cy, rot in zip(rng.uniform(0, w, count), rng.uniform(0, h, count), rng.uniform(0, 2 * np.pi, count)):
        for k in range(5):
            a = rot + k * 2 * np.pi / 5
            centre = (int((cx + np.cos(a) * petal * 1.3) * sub), int((cy + np.sin(a) * petal * 1.3) * sub))
            cv2.circle(petals, centre, int(petal * sub), 255, -1, cv2.LINE_AA, 4)
        cv2.circle(hearts, (int(cx * sub), int(cy * sub)), int((petal * 0.6 + 0.5) * sub), 255, -1, cv2.LINE_AA, 4)
    colour = _mix(colour, style.second, petals.astype(np.float32) * _F(1 / 255))
    return _mix(colour, style.third, hearts.astype(np.float32) * _F(1 / 255))


def _loops(alpha, rgb: list, shape: MaskShape, style: Style, top, bot, canvas: UVCanvas, scale):
    """Ear loops (or an N95's head straps) from the mask's side corners back toward the ears, drawn into
    `alpha` and the `rgb` planes (float32 `[H, W]` arrays of the caller's own) in place."""
    width = max(1, int(round((2.4 if shape.kind == "n95" else 1.3) * scale)))
    u, _ = canvas.axes()
    layer = np.zeros(alpha.shape, np.uint8)
    sub = 16  # cv2's fixed-point shift of 4 bits: lines placed to 1/16 texel
    for side, sign in ((shape.left, -1.0), (shape.right, 1.0)):
        i = int(np.clip(np.searchsorted(u, side), 0, len(u) - 1))
        y_top, y_bot = float(top[i]), float(bot[i])
        if y_bot - y_top < 0.05:  # a cup closes at its sides: both straps leave from its middle
            y_top = y_bot = 0.5 * (y_top + y_bot)
        for y0, y1 in ((y_top + 0.015, 0.5), (y_bot - 0.015, 0.56)):
            (x0, x1), (ty0, ty1) = canvas.texel(np.array([[side, y0], [side + sign * 0.15, y1]]))
            cv2.line(layer, (int(x0 * sub), int(ty0 * sub)), (int(x1 * sub), int(ty1 * sub)), 255, width,
                     cv2.LINE_AA, 4)
    # The loops cover little of the canvas: only the box of each half's lines changes (elsewhere the
    # loops are 0, and the full-canvas formula would give back alpha and rgb as they are), in place.
    half = alpha.shape[1] // 2
    for x0, x1 in ((0, half), (half, alpha.shape[1])):
        x, y, bw, bh = cv2.boundingRect(layer[:, x0:x1])
        if bw == 0:
            continue
        box = np.s_[y:y + bh, x0 + x:x0 + x + bw]
        loops = layer[box].astype(np.float32) * _F(1 / 255)
        cover = loops * (_F(1) - alpha[box])
        for c, mixed in zip(rgb, _mix([c[box] for c in rgb], style.strap, cover)):
            c[box] = mixed
        alpha[box] = np.maximum(alpha[box], loops)
    return alpha, rgb
