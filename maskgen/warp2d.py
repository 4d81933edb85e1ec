"""`--mode 2d`: the mask texture fitted to the face's landmark outline by a thin-plate spline.

The spline maps image positions to UV through control points: the lower face outline, points inside the
lower face, the lower eyelids (which pins the mask's eye margin) and two rows of points pushed outward
from the outline in the image plane, where the mask runs past the jaw. Unlike `--mode 3d` it knows no
depth: a turned head gets a flat, squeezed mask with no occlusion, as 2D tools do.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .facemesh_asset import NUM_LANDMARKS, RING_UV, RINGS, MeshAsset, affine_solver, load_asset
from .render3d import sample_texture
from .textures import UVCanvas

# Inside the lower face: nose ridge, tip and wings, cheeks, mouth, chin.
INNER = (4, 6, 197, 2, 98, 327, 50, 280, 205, 425, 117, 346, 123, 352, 0, 17, 61, 291, 199, 118, 347,
         214, 434)
# The lower eyelids and eye corners: they pin the spline where the mask must keep its distance.
LOWER_LIDS = (33, 133, 145, 153, 263, 362, 374, 380)
GRID_STEP = 8  # the spline is evaluated every GRID_STEP pixels (of a 112 crop) and interpolated


def _tps_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """U(r) = r^2 log r between every point of `a` [N, 2] and `b` [M, 2], as r^2 log(r^2) / 2."""
    r2 = (a[:, None, 0] - b[None, :, 0]) ** 2 + (a[:, None, 1] - b[None, :, 1]) ** 2
    return 0.5 * r2 * np.log(np.maximum(r2, 1e-20))


class ThinPlateSpline:
    """A 2D -> 2D thin-plate spline through control points, with optional smoothing."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, smoothing: float = 0.0) -> None:
        src = np.asarray(src, np.float64)
        dst = np.asarray(dst, np.float64)
        n = len(src)
        # Coordinates are centred and scaled: the linear system is then well conditioned at any image size.
        self.mean = src.mean(0)
        self.scale = float(np.sqrt(((src - self.mean) ** 2).sum(1).mean())) or 1.0
        s = (src - self.mean) / self.scale
        k = _tps_kernel(s, s) + smoothing * np.eye(n)
        p = np.concatenate([np.ones((n, 1)), s], 1)
        a = np.zeros((n + 3, n + 3))
        a[:n, :n], a[:n, n:], a[n:, :n] = k, p, p.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n] = dst
        self.coef = np.linalg.solve(a, rhs)
        self.ctrl = s

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        s = (np.asarray(pts, np.float64) - self.mean) / self.scale
        k = _tps_kernel(s, self.ctrl)
        n = len(self.ctrl)
        return k @ self.coef[:n] + self.coef[n] + s @ self.coef[n + 1:]


def outward_normals(points: np.ndarray) -> np.ndarray:
    """Unit normals of an open polyline `[K, 2]`, pointing away from its centroid."""
    tangent = np.gradient(points, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], 1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    flip = ((points - points.mean(0)) * normal).sum(1) < 0
    normal[flip] *= -1
    return normal


class SplineWarper:
    """Renders a UV texture onto faces by a thin-plate spline on their 2D landmarks."""

    def __init__(self, canvas: UVCanvas, asset: Optional[MeshAsset] = None, smoothing: float = 1e-4) -> None:
        self.asset = asset or load_asset()
        self.canvas = canvas
        self.smoothing = smoothing
        self.ids = np.array(sorted(set(self.asset.chain.tolist()) | set(INNER) | set(LOWER_LIDS)))
        # The best affine map UV -> image over all landmarks is a least-squares fit whose UV side never
        # changes: the rows of its pseudo-inverse that give the linear part, `[2, 468]`, computed once.
        self._uv_solver = affine_solver(self.asset.uv[:NUM_LANDMARKS])[:2]

    def control_points(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image points `[N, 2]`, their UV `[N, 2]`)."""
        asset = self.asset
        xy = landmarks[:, :2]
        uv = asset.uv[:NUM_LANDMARKS]
        # Pixels per UV unit near the face: from the best affine map UV -> image over all landmarks.
        lin = self._uv_solver @ xy
        px_per_uv = float(np.sqrt(abs(np.linalg.det(lin))))
        chain = asset.chain
        normals = outward_normals(xy[chain])
        img = [xy[self.ids]]
        uvs = [uv[self.ids]]
        every = slice(None, None, 2)  # the rings are smooth: half their points pin them as well
        for r in range(1, RINGS + 1):
            img.append((xy[chain] + normals * (r * RING_UV * px_per_uv))[every])
            uvs.append(asset.uv[NUM_LANDMARKS + (r - 1) * len(chain): NUM_LANDMARKS + r * len(chain)][every])
        return np.concatenate(img), np.concatenate(uvs)

    def uv_map(self, landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
        src, dst = self.control_points(landmarks)
        spline = ThinPlateSpline(src, dst, self.smoothing)
        step = GRID_STEP * max(width, height) / 112.0
        gx = np.arange(0, width + step, step)
        gy = np.arange(0, height + step, step)
        grid = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        coarse = spline(grid).reshape(len(gy), len(gx), 2).astype(np.float32)
        # Bilinear interpolation of the coarse grid: pixel centre (x, y) sits at coarse (x / step, y / step).
        xs = np.broadcast_to(np.arange(width, dtype=np.float32) / np.float32(step), (height, width))
        ys = np.broadcast_to((np.arange(height, dtype=np.float32) / np.float32(step))[:, None], (height, width))
        return cv2.remap(coarse, np.ascontiguousarray(xs), np.ascontiguousarray(ys), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    def render(self, landmarks: np.ndarray, texture: np.ndarray, width: int, height: int) -> np.ndarray:
        """The texture on the face: `[H, W, 4]` float32 premultiplied RGB + alpha."""
        return sample_texture(texture, self.uv_map(landmarks, width, height), self.canvas)
