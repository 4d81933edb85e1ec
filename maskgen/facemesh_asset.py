"""The mask's geometry: MediaPipe's canonical face mesh with its UV layout, extended below the jaw and
toward the ears (where a worn mask goes and the face mesh does not).

The asset `assets/face_mesh_uv.json` is derived from MediaPipe's canonical face geometry (Apache-2.0, see
assets/NOTICE). Rebuild it with
    python -m maskgen.facemesh_asset ../shared/data/mediapipe_face_geometry/geometry_pipeline_metadata_landmarks.pbtxt

Extension vertices are not fixed points: each one hangs off a vertex of the face outline (its anchor) by
an offset in canonical space, so that on a detected face it follows the anchor and the head's pose.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.landmarks import FACE_OVAL

ASSET = Path(__file__).resolve().parent / "assets" / "face_mesh_uv.json"
NUM_LANDMARKS = 468
# The open stretch of the face outline that the extension hangs off: temple (389) over the jaw and chin
# to the other temple (162). The forehead needs none.
EXTENSION_CHAIN = FACE_OVAL[6:31]
RINGS = 2
RING_CM = 1.0  # canonical units are centimetres
RING_UV = 0.06
CURL = 0.25  # each further ring bends back by this share of RING_CM: the surface wraps under the jaw


@dataclass(frozen=True)
class MeshAsset:
    """Vertices `[V, 3]` (canonical cm, y up, z toward the viewer), `uv` `[V, 2]` (v down), `triangles`
    `[T, 3]`; vertices from `NUM_LANDMARKS` on are extension vertices with `anchor` and `offset`."""

    vertices: np.ndarray
    uv: np.ndarray
    triangles: np.ndarray
    anchor: np.ndarray  # [E] landmark index each extension vertex hangs off
    offset: np.ndarray  # [E, 3] canonical offset from the anchor
    ring: np.ndarray  # [E] 1 = next to the outline, 2 = the next row out
    chain: np.ndarray  # [C] the outline vertices the rings follow, in order

    def pose(self, landmarks: np.ndarray) -> np.ndarray:
        """The best affine map `[3, 4]` from the canonical mesh to detected landmarks `[468, 3]`."""
        return (self._pose_solver @ landmarks).T

    @cached_property
    def _pose_solver(self) -> np.ndarray:
        # The canonical side of the least-squares fit never changes: its pseudo-inverse `[4, 468]` is
        # computed once, and each face's fit is one product (as `fit_affine3d`, to rounding).
        return affine_solver(self.vertices[:NUM_LANDMARKS])

    def extended_vertices(self, landmarks: np.ndarray, pose: Optional[np.ndarray] = None) -> np.ndarray:
        """All vertices `[V, 3]` for detected landmarks `[468, 3]`: extension vertices follow their anchor,
        their offsets carried by the linear part of the pose (`pose()`, computed when not given)."""
        lin = (self.pose(landmarks) if pose is None else pose)[:, :3]
        ext = landmarks[self.anchor] + self.offset @ lin.T
        return np.concatenate([landmarks, ext], axis=0)


def head_yaw(pose: np.ndarray) -> float:
    """The head's left-right turn in degrees (0 frontal) from its pose (`MeshAsset.pose`)."""
    forward = pose[:, 2]  # the canonical z axis (out of the face) in the image
    return float(np.degrees(np.arcsin(np.clip(forward[0] / max(np.linalg.norm(forward), 1e-12), -1, 1))))


def _homogeneous(points: np.ndarray) -> np.ndarray:
    return np.concatenate([points, np.ones((len(points), 1))], axis=1)


def affine_solver(src: np.ndarray) -> np.ndarray:
    """`[D + 1, N]`: for fixed source points `[N, D]`, `(affine_solver(src) @ dst).T` is `fit_affine3d`'s
    least-squares affine map to any `dst` `[N, K]`, one product per fit."""
    return np.linalg.pinv(_homogeneous(src))


def fit_affine3d(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine `[3, 4]` with dst ~= A @ [src, 1]."""
    sol, *_ = np.linalg.lstsq(_homogeneous(src), dst, rcond=None)
    return sol.T


@lru_cache(maxsize=1)
def load_asset(path: Optional[str] = None) -> MeshAsset:
    data = json.loads(Path(path or ASSET).read_text())
    return MeshAsset(
        vertices=np.asarray(data["vertices"], dtype=np.float64),
        uv=np.asarray(data["uv"], dtype=np.float64),
        triangles=np.asarray(data["triangles"], dtype=np.int64),
        anchor=np.asarray(data["extension"]["anchor"], dtype=np.int64),
        offset=np.asarray(data["extension"]["offset"], dtype=np.float64),
        ring=np.asarray(data["extension"]["ring"], dtype=np.int64),
        chain=np.asarray(data["extension"]["chain"], dtype=np.int64),
    )


def read_canonical_pbtxt(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices [468, 3], uv [468, 2], triangles [898, 3]) from geometry_pipeline_metadata_landmarks.pbtxt."""
    text = Path(path).read_text()
    vb = np.array([float(x) for x in re.findall(r"vertex_buffer:\s*([-+\d.eE]+)", text)])
    ib = np.array([int(x) for x in re.findall(r"index_buffer:\s*(\d+)", text)])
    if vb.size != NUM_LANDMARKS * 5 or ib.size % 3:
        raise ValueError(f"{path}: expected {NUM_LANDMARKS} x (x y z u v) vertices and triangles, got "
                         f"{vb.size} vertex values and {ib.size} indices")
    vb = vb.reshape(-1, 5)
    return vb[:, :3], vb[:, 3:], ib.reshape(-1, 3)


def _outward_uv_normals(uv_chain: np.ndarray, centre: np.ndarray) -> np.ndarray:
    tangent = np.gradient(uv_chain, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    flip = ((uv_chain - centre) * normal).sum(1) < 0
    normal[flip] *= -1
    return normal


def build_asset(vertices: np.ndarray, uv: np.ndarray, triangles: np.ndarray,
                chain: Sequence[int] = EXTENSION_CHAIN) -> dict:
    """The asset as a JSON-ready dict: the canonical mesh plus `RINGS` rows of extension vertices."""
    chain = np.asarray(chain)
    oval = set(FACE_OVAL)
    neighbours: dict[int, set] = {int(v): set() for v in chain}
    for tri in triangles:
        for a in tri:
            if int(a) in neighbours:
                neighbours[int(a)].update(int(b) for b in tri if int(b) not in oval)
    # Outward along the surface: away from the inner neighbours, i.e. the mesh continued past its edge.
    directions = []
    for v in chain:
        inner = vertices[sorted(neighbours[int(v)])].mean(0)
        d = vertices[v] - inner
        directions.append(d / np.linalg.norm(d))
    directions = np.array(directions)
    uv_normals = _outward_uv_normals(uv[chain], uv[:NUM_LANDMARKS].mean(0))
    back = np.array([0.0, 0.0, -1.0])

    anchor, offset, ring, ext_uv = [], [], [], []
    for r in range(1, RINGS + 1):
        for j, v in enumerate(chain):
            anchor.append(int(v))
            offset.append(RING_CM * (r * directions[j] + CURL * r * (r - 1) * back))
            ring.append(r)
            ext_uv.append(uv[v] + r * RING_UV * uv_normals[j])
    n, c = NUM_LANDMARKS, len(chain)

    def vid(r: int, j: int) -> int:
        return int(chain[j]) if r == 0 else n + (r - 1) * c + j

    all_uv = np.concatenate([uv, np.array(ext_uv)])
    tris = [list(map(int, t)) for t in triangles]
    ref_sign = np.sign(_uv_cross(all_uv, np.asarray(triangles)).sum())
    for r in range(RINGS):
        for j in range(c - 1):
            for t in ((vid(r, j), vid(r, j + 1), vid(r + 1, j + 1)), (vid(r, j), vid(r + 1, j + 1), vid(r + 1, j))):
                if np.sign(_uv_cross(all_uv, np.array([t]))[0]) != ref_sign:
                    t = (t[0], t[2], t[1])
                tris.append(list(t))
    return {
        "source": "MediaPipe canonical face geometry (google-ai-edge/mediapipe, "
                  "mediapipe/modules/face_geometry/data), Apache-2.0; extension rings added by maskgen",
        "vertices": np.round(np.concatenate([vertices, vertices[anchor] + np.array(offset)]), 6).tolist(),
        "uv": np.round(all_uv, 6).tolist(),
        "triangles": tris,
        "extension": {"anchor": anchor, "offset": np.round(np.array(offset), 6).tolist(), "ring": ring,
                      "chain": [int(v) for v in chain]},
    }


def _uv_cross(uv: np.ndarray, tris: np.ndarray) -> np.ndarray:
    a, b, c = uv[tris[:, 0]], uv[tris[:, 1]], uv[tris[:, 2]]
    return (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskgen.facemesh_asset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pbtxt", help="geometry_pipeline_metadata_landmarks.pbtxt")
    parser.add_argument("--out", default=str(ASSET))
    args = parser.parse_args(argv)
    try:
        asset = build_asset(*read_canonical_pbtxt(args.pbtxt))
    except (OSError, ValueError) as e:
        print(f"facemesh_asset: {e}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(asset, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}: {len(asset['vertices'])} vertices, {len(asset['triangles'])} triangles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
