"""Face alignment for `pack --align`: find the face in a raw photo, estimate its 5 points from FaceMesh and
warp it to the ArcFace 112x112 template (the crop every aligned training set shares).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .landmarks import FaceMeshDetector, as_rgb, five_points, warp_to_template

# Photos smaller than this are upscaled for a second try: FaceMesh's detector misses small, tight faces.
UPSCALE_TO = 256

_DETECTOR: Optional[FaceMeshDetector] = None


def _detector() -> FaceMeshDetector:
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = FaceMeshDetector()
    return _DETECTOR


def _plausible(points: np.ndarray) -> bool:
    five = five_points(points)
    return float(np.hypot(*(five[1] - five[0]))) >= 4.0


def align_face(rgb: np.ndarray, size: int = 112) -> Optional[np.ndarray]:
    """The `size` x `size` RGB crop aligned to the ArcFace template, or None when no face is found.

    Grey input is returned as 3 equal channels.
    """
    points = find_five_points(rgb)
    if points is None:
        return None
    return warp_to_template(as_rgb(rgb), points, size)


def find_five_points(rgb: np.ndarray) -> Optional[np.ndarray]:
    """The 5 ArcFace points `[5, 2]` of the most confident face in a photo, or None."""
    points, _ = _detector().detect(rgb, accept=_plausible)
    if points is None:
        # Small photos (ORL's 92x112 and the like): the detector needs more pixels per face.
        h, w = rgb.shape[:2]
        if max(h, w) < UPSCALE_TO:
            scale = UPSCALE_TO / max(h, w)
            big = cv2.resize(np.asarray(rgb), None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            points, _ = _detector().detect(big, accept=_plausible)
            if points is not None:
                points[:, :2] = (points[:, :2] + 0.5) / scale - 0.5
    if points is None:
        return None
    return five_points(points)
