"""One face in, one masked face out: landmarks, a mask drawn from the image's random stream, rendered in
2D or 3D, composited to match the crop. Used by `maskgen build`, `maskgen folder`, the preview and bench.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .composite import composite, measure
from .facemesh_asset import head_yaw
from .landmarks import CropLandmarker, eye_keep_out
from .render3d import MeshRenderer
from .seeds import image_rng
from .shapes import MASK_TYPES, MaskShape, draw_shape
from .textures import Style, UVCanvas, draw_style, render_texture
from .warp2d import SplineWarper

MODES = ("2d", "3d")  # label codes 1, 2 (0: no mask)
MODE_CHOICES = ("2d", "3d", "mixed")
# Share of masks worn over the nose bridge; the rest sit below the nose, as people wear them too.
NOSE_COVERED = 0.85
# A flat warp cannot fold a mask around a head turned further than this (the far cheek slides behind the
# nose); such faces get the 3D renderer, and their label says so. About 1 in 12 glint24 faces.
MAX_2D_YAW = 35.0
# Images a worker masks together (`Masker.mask_many`) and hands back at once.
MASK_BATCH = 8


@dataclass(frozen=True)
class MaskSpec:
    """Everything drawn for one image."""

    kind: str
    mode: str
    shape: MaskShape
    style: Style

    @property
    def colour255(self) -> tuple[int, int, int]:
        return tuple(int(round(c * 255)) for c in self.style.colour)


def draw_spec(rng: np.random.Generator, mode: str = "mixed", types: Sequence[str] = MASK_TYPES,
              nose_covered: float = NOSE_COVERED) -> MaskSpec:
    if mode not in MODE_CHOICES:
        raise ValueError(f"mode must be one of {MODE_CHOICES}, not {mode!r}")
    kind = types[int(rng.integers(len(types)))]
    chosen = MODES[int(rng.integers(2))] if mode == "mixed" else mode
    shape = draw_shape(kind, rng, nose_covered=bool(rng.random() < nose_covered))
    return MaskSpec(kind, chosen, shape, draw_style(kind, rng))


@dataclass
class MaskResult:
    image: np.ndarray  # uint8 RGB
    alpha: np.ndarray  # float32 [H, W] mask coverage
    landmarks: np.ndarray  # [468, 3] the landmarks the mask was fitted to
    spec: MaskSpec
    fallback: bool
    meta: dict = field(default_factory=dict)


def skip_reason(result: MaskResult | Exception | None) -> Optional[str]:
    """Why `Masker.mask_batch` gave no masked image for one input (the one-line reason that manifests and
    maskgen-meta.jsonl record), or None where it gave one."""
    if result is None:
        return "no face found"
    if isinstance(result, Exception):
        return f"{type(result).__name__}: {result}"
    return None


@dataclass(kw_only=True)
class MaskingOptions:
    """How masks are drawn and by how many processes: what `maskgen build` and `maskgen folder` share."""

    mode: str = "mixed"
    seed: int = 0
    types: Sequence[str] = MASK_TYPES
    nose_covered: float = NOSE_COVERED
    aligned: bool = True
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True

    def masker_args(self) -> tuple:
        """`Masker(*args)` for each worker process (a picklable tuple: the masker itself is not)."""
        return (self.mode, tuple(self.types), self.aligned, self.nose_covered)


class Masker:
    """Masks face crops. One per process (it holds a MediaPipe graph)."""

    def __init__(self, mode: str = "mixed", types: Sequence[str] = MASK_TYPES, aligned: bool = True,
                 nose_covered: float = NOSE_COVERED, landmarker: Optional[CropLandmarker] = None) -> None:
        bad = [t for t in types if t not in MASK_TYPES]
        if bad or not types:
            raise ValueError(f"mask types must be among {MASK_TYPES}, got {list(types)}")
        if mode not in MODE_CHOICES:
            raise ValueError(f"mode must be one of {MODE_CHOICES}, not {mode!r}")
        self.mode, self.types, self.nose_covered = mode, tuple(types), nose_covered
        self.landmarker = landmarker or CropLandmarker(aligned=aligned)
        self._painters: dict[int, tuple[UVCanvas, MeshRenderer, SplineWarper]] = {}

    def close(self) -> None:
        self.landmarker.close()

    def _painter(self, size: int):
        if size not in self._painters:
            canvas = UVCanvas.for_size(size)
            self._painters[size] = (canvas, MeshRenderer(canvas), SplineWarper(canvas))
        return self._painters[size]

    def draw(self, rng: np.random.Generator) -> MaskSpec:
        return draw_spec(rng, self.mode, self.types, self.nose_covered)

    def mask_many(self, images: Sequence[np.ndarray],
                  rngs: Sequence[np.random.Generator]) -> list[Optional[MaskResult]]:
        """`mask` for several images, the landmarks of all of them first: the same results, at 10-15% less
        CPU per crop, because the landmark model's weights stay in the CPU's caches between its runs."""
        found = [self.landmarker(rgb) for rgb in images]
        return [None if points is None else self.mask(rgb, rng, landmarks=points, fallback=fallback)
                for rgb, rng, (points, fallback) in zip(images, rngs, found)]

    def mask_batch(self, images: Sequence[np.ndarray], seeds: Sequence[int]
                   ) -> list[MaskResult | Exception | None]:
        """`mask_many` with each image's stream from its seed, where an image whose masking raises costs
        only itself: the batch is then redone one image at a time and that image gets its exception.

        A multi-hour build must not end, nor lose the rest of a batch, over one bad image."""
        try:
            return self.mask_many(images, [image_rng(seed) for seed in seeds])
        except Exception:
            out: list[MaskResult | Exception | None] = []
            for rgb, seed in zip(images, seeds):
                try:
                    out.append(self.mask(rgb, image_rng(seed)))  # a fresh stream: the failed pass drew from one
                except Exception as e:
                    out.append(e)
            return out

    def mask(self, rgb: np.ndarray, rng: np.random.Generator, spec: Optional[MaskSpec] = None,
             landmarks: Optional[np.ndarray] = None, fallback: bool = False) -> Optional[MaskResult]:
        """Mask one RGB uint8 image; None when it has no face and is not an aligned crop.

        `landmarks` (with `fallback`: whether they are the template's) skips the landmark pass."""
        if landmarks is None:
            landmarks, fallback = self.landmarker(rgb)
            if landmarks is None:
                return None
        spec = spec or self.draw(rng)
        h, w = rgb.shape[:2]
        canvas, mesh, spline = self._painter(max(h, w))
        texture = render_texture(spec.shape, spec.style, canvas)
        pose = mesh.asset.pose(landmarks)
        yaw = head_yaw(pose)
        mode = "3d" if spec.mode == "3d" or abs(yaw) > MAX_2D_YAW else "2d"
        if mode == "3d":
            layer = mesh.render(landmarks, texture, w, h, pose)
        else:
            layer = spline.render(landmarks, texture, w, h)
        stats = measure(rgb)
        image, alpha = composite(rgb, layer, rng, stats, eye_keep_out(landmarks, h, w))
        meta = {
            "mask_type": spec.kind,
            "mode": mode,
            "mode_drawn": spec.mode,
            "yaw": round(yaw, 1),
            "fallback": fallback,
            "colour": list(spec.colour255),
            "pattern": spec.style.pattern,
            "nose_covered": spec.shape.nose_covered,
            "grey": stats.grey,
            "blur": round(stats.blur, 3),
            "noise": round(stats.noise, 4),
        }
        return MaskResult(image, alpha, landmarks, spec, fallback, meta)
