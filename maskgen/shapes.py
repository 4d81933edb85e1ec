"""Mask outlines in the UV space of the face mesh (u right, v down; the face spans about [0, 1] x [0.1, 0.95]).

A shape is a top edge and a bottom edge, each a curve v(u), between two side edges. It is anchored on
landmarks through their UV coordinates: the nose bridge (197) or just under the nose (2) for the top,
below the chin (152) and along the jaw for the bottom. The top edge never comes nearer the eyes than
`EYE_MARGIN` in v, which is what keeps eyes and brows uncovered on every face the mesh fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.landmarks import LEFT_BROW, LEFT_EYE, RIGHT_BROW, RIGHT_EYE

from .facemesh_asset import NUM_LANDMARKS, RING_UV, load_asset

MASK_TYPES = ("surgical", "kn95", "n95", "cloth")  # label codes 1..4 (0: no mask)
NOSE_BRIDGE, SUBNASALE, CHIN = 197, 2, 152
EYE_MARGIN = 0.045  # in v: about 6 pixels of a 112 crop between the lowest eye point and the mask


@dataclass(frozen=True)
class MaskShape:
    """`top` and `bottom`: polylines `[K, 2]` of (u, v) sorted by u; `left`/`right`: side edges in u."""

    kind: str
    top: np.ndarray
    bottom: np.ndarray
    left: float
    right: float
    corner: float  # corner radius in UV
    nose_covered: bool

    def top_at(self, u: np.ndarray) -> np.ndarray:
        return np.maximum(np.interp(u, self.top[:, 0], self.top[:, 1]), eye_safe_v(u))

    def bottom_at(self, u: np.ndarray) -> np.ndarray:
        return np.interp(u, self.bottom[:, 0], self.bottom[:, 1])


def uv_of(landmark: int) -> np.ndarray:
    return load_asset().uv[landmark]


@lru_cache(maxsize=1)
def _eye_safe_table() -> tuple[np.ndarray, np.ndarray]:
    uv = load_asset().uv[list(RIGHT_EYE + LEFT_EYE + RIGHT_BROW + LEFT_BROW)]
    grid = np.linspace(-0.3, 1.3, 321)
    # The lowest eye or brow point within a band of u, widened so that a slope never slips under a corner.
    near = np.abs(grid[:, None] - uv[None, :, 0]) < 0.06
    low = np.where(near, uv[None, :, 1], -np.inf).max(1)
    return grid, np.where(np.isfinite(low), low + EYE_MARGIN, -np.inf)


def eye_safe_v(u: np.ndarray) -> np.ndarray:
    """The highest v (smallest, v grows down) the mask's top edge may reach at each u."""
    grid, safe = _eye_safe_table()
    idx = np.clip(np.searchsorted(grid, u), 0, len(grid) - 1)
    return np.maximum(safe[idx], safe[np.maximum(idx - 1, 0)])


@lru_cache(maxsize=1)
def _jaw_rings() -> tuple[np.ndarray, np.ndarray]:
    """UV of the face outline's lower stretch and of the first extension ring beside it."""
    asset = load_asset()
    n = len(asset.chain)
    chain_uv = asset.uv[asset.chain]
    ring1_uv = asset.uv[NUM_LANDMARKS:NUM_LANDMARKS + n]
    return chain_uv, ring1_uv


def jaw_curve(drop: float, side_v: float = 0.74) -> np.ndarray:
    """The jaw line pushed out by `drop` (UV units, along the outline's normal): points `[K, 2]` by u.

    Where the jaw turns up toward the ears (v above `side_v`) the curve runs on level instead, so the
    mask's lower corners sit under the ears' side of the jaw rather than climbing the cheeks."""
    chain_uv, ring1_uv = _jaw_rings()
    pts = chain_uv + (drop / RING_UV) * (ring1_uv - chain_uv)
    pts = pts[pts[:, 1] >= side_v]
    pts = pts[np.argsort(pts[:, 0])]
    return np.concatenate([[[-1.0, pts[0, 1]]], pts, [[2.0, pts[-1, 1]]]])


def _symmetric(du_v: list[tuple[float, float]]) -> np.ndarray:
    """A polyline symmetric about u = 0.5 from (|u - 0.5|, v) pairs."""
    half = np.array(du_v, dtype=np.float64)
    left = np.stack([0.5 - half[::-1, 0], half[::-1, 1]], 1)
    right = np.stack([0.5 + half[1:, 0], half[1:, 1]], 1)
    return np.concatenate([left, right])


def draw_shape(kind: str, rng: np.random.Generator, nose_covered: bool = True) -> MaskShape:
    """A shape of `kind` with its proportions drawn from `rng`."""
    if kind not in MASK_TYPES:
        raise ValueError(f"mask type must be one of {MASK_TYPES}, not {kind!r}")
    bridge = uv_of(NOSE_BRIDGE)[1] + rng.uniform(-0.005, 0.02)
    under = uv_of(SUBNASALE)[1] + rng.uniform(0.0, 0.012)
    chin = uv_of(CHIN)[1]
    top0 = bridge if nose_covered else under
    tilt = rng.uniform(-0.01, 0.01)  # a mask is rarely put on quite level

    if kind == "surgical":
        rise = [0.0, 0.012, 0.035, 0.05, 0.065, 0.08] if nose_covered else [0, 0, -0.01, -0.02, -0.03, -0.035]
        top = _symmetric([(d, top0 + r) for d, r in zip([0, 0.06, 0.17, 0.3, 0.5, 0.7], rise)])
        bottom = jaw_curve(rng.uniform(0.035, 0.07))
        side = rng.uniform(0.04, 0.10)
        shape = MaskShape(kind, top, bottom, -side, 1 + side, 0.02, nose_covered)
    elif kind == "kn95":
        slope = rng.uniform(0.15, 0.2) if nose_covered else rng.uniform(0.0, 0.03)
        top = _symmetric([(0.0, top0), (0.7, top0 + 0.7 * slope)])
        low = chin + rng.uniform(0.04, 0.07)
        bottom = _symmetric([(0.0, low), (0.5, low - rng.uniform(0.17, 0.21)), (0.7, low - 0.25)])
        side = rng.uniform(-0.02, 0.04)
        shape = MaskShape(kind, top, bottom, -side, 1 + side, 0.01, nose_covered)
    elif kind == "n95":
        half = rng.uniform(0.50, 0.56)
        low = chin + rng.uniform(0.035, 0.06)
        du = np.linspace(0.0, half, 15)
        e = np.sqrt(np.clip(1 - (du / half) ** 2, 0, 1))
        mid = rng.uniform(0.64, 0.68) if nose_covered else rng.uniform(0.74, 0.77)
        top = _symmetric(list(zip(du, mid - (mid - top0) * e ** 0.7)))
        bottom = _symmetric(list(zip(du, mid + (low - mid) * e ** 0.8)))
        shape = MaskShape(kind, top, bottom, 0.5 - half, 0.5 + half, 0.0, nose_covered)
    else:  # cloth
        du = np.array([0.0, 0.05, 0.12, 0.2, 0.3, 0.45, 0.6, 0.7])
        curve = 0.075 * (du / 0.5) ** 1.2 if nose_covered else -0.03 * (du / 0.5) ** 1.5
        top = _symmetric(list(zip(du, top0 + curve)))
        bottom = jaw_curve(rng.uniform(0.045, 0.08))
        side = rng.uniform(0.02, 0.08)
        shape = MaskShape(kind, top, bottom, -side, 1 + side, 0.04, nose_covered)
    if tilt:
        shape = MaskShape(shape.kind, _tilted(shape.top, tilt), _tilted(shape.bottom, tilt), shape.left,
                          shape.right, shape.corner, shape.nose_covered)
    return shape


def _tilted(curve: np.ndarray, tilt: float) -> np.ndarray:
    out = curve.copy()
    out[:, 1] += tilt * (out[:, 0] - 0.5)
    return out
