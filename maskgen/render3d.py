"""`--mode 3d`: the mask texture rendered onto the detected face mesh.

Every triangle of the (extended) mesh is rasterised at once with numpy: each triangle's bounding box is
expanded into candidate pixels, barycentric coordinates keep those inside, back faces are culled (a
triangle whose winding in the image differs from its winding in UV faces away), and a depth sort keeps
the nearest triangle per pixel. The result is a UV coordinate per pixel, and the texture is looked up
with a single `cv2.remap`.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .facemesh_asset import MeshAsset, load_asset
from .textures import UVCanvas

OUTSIDE = -1e4  # remap coordinate for pixels no front face covers: far outside the texture, alpha 0


def _uv_cross(uv: np.ndarray, tris: np.ndarray) -> np.ndarray:
    a, b, c = uv[tris[:, 0]], uv[tris[:, 1]], uv[tris[:, 2]]
    return (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]


def rasterize_uv(vertices: np.ndarray, uv: np.ndarray, triangles: np.ndarray, width: int, height: int,
                 uv_sign: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """UV per pixel of the nearest front-facing triangle.

    vertices `[V, 3]` (x, y in pixels with pixel centres at integers, z smaller = nearer), uv `[V, 2]`,
    triangles `[T, 3]`. Returns (uv map `[H, W, 2]` float32, covered `[H, W]` bool).
    """
    if uv_sign is None:
        uv_sign = np.sign(_uv_cross(uv, triangles))
    p = vertices[:, :2]
    a, b, c = p[triangles[:, 0]], p[triangles[:, 1]], p[triangles[:, 2]]
    det = (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]
    front = (np.sign(det) == uv_sign) & (np.abs(det) > 1e-9)
    lo = np.ceil(np.minimum(np.minimum(a, b), c))  # pixel centres (integers) inside the box
    hi = np.floor(np.maximum(np.maximum(a, b), c))
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    span = hi - lo + 1
    keep = front & (span[:, 0] > 0) & (span[:, 1] > 0)
    tri = np.flatnonzero(keep)
    uvmap = np.full((height, width, 2), OUTSIDE, np.float32)
    covered = np.zeros((height, width), bool)
    if tri.size == 0:
        return uvmap, covered
    lo, span = lo[tri].astype(np.int64), span[tri].astype(np.int64)
    counts = span[:, 0] * span[:, 1]
    owner = np.repeat(np.arange(tri.size), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = lo[owner, 0] + local % span[owner, 0]
    py = lo[owner, 1] + local // span[owner, 0]

    ta, tb, tc = a[tri], b[tri], c[tri]
    inv = 1.0 / det[tri]
    # Barycentric weights of a and b; c's is what is left.
    w_a = ((tb[:, 1] - tc[:, 1]) * inv, (tc[:, 0] - tb[:, 0]) * inv)
    w_b = ((tc[:, 1] - ta[:, 1]) * inv, (ta[:, 0] - tc[:, 0]) * inv)
    dx = px - tc[owner, 0]
    dy = py - tc[owner, 1]
    la = w_a[0][owner] * dx + w_a[1][owner] * dy
    lb = w_b[0][owner] * dx + w_b[1][owner] * dy
    lc = 1.0 - la - lb
    eps = -1e-7  # centres on a shared edge belong to both triangles: no cracks; the depth sort picks one
    inside = (la >= eps) & (lb >= eps) & (lc >= eps)
    owner, px, py, la, lb, lc = owner[inside], px[inside], py[inside], la[inside], lb[inside], lc[inside]
    t = triangles[tri[owner]]
    pixel = py * width + px
    # Most pixels have one candidate: they need no depth test. The rest (shared edges, and where the
    # nose or a turned cheek hides the surface behind) are sorted by pixel, then depth within a pixel:
    # depth rescaled into [0, 0.5) rides below the integer; the nearest comes first.
    shared = np.bincount(pixel, minlength=width * height)[pixel] > 1
    pick = np.flatnonzero(~shared)
    contested = np.flatnonzero(shared)
    if contested.size:
        tc_ = t[contested]
        z = la[contested] * vertices[tc_[:, 0], 2] + lb[contested] * vertices[tc_[:, 1], 2] + \
            lc[contested] * vertices[tc_[:, 2], 2]
        zr = z - z.min()
        key = pixel[contested] + zr * (0.5 / max(float(zr.max()), 1e-12))
        order = contested[np.argsort(key)]
        first = np.ones(order.size, bool)
        first[1:] = pixel[order[1:]] != pixel[order[:-1]]
        pick = np.concatenate([pick, order[first]])
    t = t[pick]
    la, lb, lc = la[pick], lb[pick], lc[pick]
    flat = uvmap.reshape(-1, 2)
    where = pixel[pick]
    for k in range(2):
        flat[where, k] = la * uv[t[:, 0], k] + lb * uv[t[:, 1], k] + lc * uv[t[:, 2], k]
    covered.reshape(-1)[where] = True
    return uvmap, covered


class MeshRenderer:
    """Renders a UV texture onto faces given their FaceMesh landmarks."""

    def __init__(self, canvas: UVCanvas, asset: Optional[MeshAsset] = None) -> None:
        self.asset = asset or load_asset()
        self.canvas = canvas
        self._uv_sign = np.sign(_uv_cross(self.asset.uv, self.asset.triangles))
        tuv = self.asset.uv[self.asset.triangles]  # per triangle: its UV box, for triangles_in
        self._uv_lo, self._uv_hi = tuv.min(1), tuv.max(1)

    def uv_map(self, landmarks: np.ndarray, width: int, height: int, triangles: Optional[np.ndarray] = None,
               pose: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        verts = self.asset.extended_vertices(landmarks, pose)
        tris = self.asset.triangles if triangles is None else self.asset.triangles[triangles]
        sign = self._uv_sign if triangles is None else self._uv_sign[triangles]
        return rasterize_uv(verts, self.asset.uv, tris, width, height, sign)

    def triangles_in(self, texture: np.ndarray) -> np.ndarray:
        """Indices of the triangles whose UV box meets the texture's opaque part (the others need no raster)."""
        alpha = texture[..., 3] > 0
        rows, cols = np.any(alpha, 1), np.any(alpha, 0)
        if not rows.any():
            return np.zeros(0, np.int64)
        c = self.canvas
        u, v = c.axes()
        u_lo, u_hi = u[cols.argmax()], u[len(cols) - 1 - cols[::-1].argmax()]
        v_lo, v_hi = v[rows.argmax()], v[len(rows) - 1 - rows[::-1].argmax()]
        lo, hi = self._uv_lo, self._uv_hi
        keep = (hi[:, 0] >= u_lo) & (lo[:, 0] <= u_hi) & (hi[:, 1] >= v_lo) & (lo[:, 1] <= v_hi)
        return np.flatnonzero(keep)

    def render(self, landmarks: np.ndarray, texture: np.ndarray, width: int, height: int,
               pose: Optional[np.ndarray] = None) -> np.ndarray:
        """The texture on the face: `[H, W, 4]` float32 premultiplied RGB + alpha, 0 where no mask."""
        uvmap, _ = self.uv_map(landmarks, width, height, self.triangles_in(texture), pose)
        return sample_texture(texture, uvmap, self.canvas)


def sample_texture(texture: np.ndarray, uvmap: np.ndarray, canvas: UVCanvas) -> np.ndarray:
    """Look the (premultiplied) texture up at every pixel's UV, bilinearly."""
    x, y = canvas.texel(uvmap)
    return cv2.remap(texture, x.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
