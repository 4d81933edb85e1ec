"""FaceMesh landmarks for the crops of a training set, where a miss is not an option.

Aligned crops (MS1M, Glint360K, WebFace, and `pack --align` output) put every face on the ArcFace
5-point template. FaceMesh still misses some of them (tight crops, profiles, occlusions), so:
1. FaceMesh's landmark model in the region where the template puts the face (no detector and no
   MediaPipe graph: the model alone under LiteRT, under half the CPU of MediaPipe's solution wrapper),
   then the whole FaceMesh on the crop and on padded copies (`pipeline.landmarks.FaceMeshDetector`);
2. a result whose 5 points are far from the template is treated as a miss (a face in the background);
3. the last resort is MediaPipe's canonical (mean) mesh fitted to the template by a similarity
   transform, recorded as a fallback so that users can filter those images out.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import cv2
import numpy as np

from pipeline.landmarks import (
    ARCFACE_ROI,
    LEFT_BROW,
    LEFT_EYE,
    RIGHT_BROW,
    RIGHT_EYE,
    FaceMeshDetector,
    arcface_template,
    five_points,
    landmarks_roi,
    similarity_transform,
    template_rms,
)

from .facemesh_asset import NUM_LANDMARKS, load_asset

# A detection whose 5 points are further than this (share of the crop's width, RMS) from the template is
# not the aligned face. The furthest real face in glint24 is at 0.11 (a profile).
MAX_TEMPLATE_RMS = 0.2
# How far (share of the crop) a face's own region may be from the template's before it is read again.
# Every glint24 crop it catches is a head turned (its x centre moved), a sixth of them. Not higher: at
# 0.15 (0.4 ms of CPU per crop less) the profiles at 0.10-0.15 keep their first read, whose far-side
# points lie off the face, in the background; the second read puts them back on the face.
ROI_SHIFT = 0.1


def eye_keep_out(landmarks: np.ndarray, height: int, width: int, margin: float = 0.03) -> np.ndarray:
    """`[H, W]` float32, 1 over each eye and brow (their landmarks' hull grown by `margin` of the crop).

    The mask's shape keeps its distance from the eyes in UV; this is the guarantee in the image, for the
    faces where foreshortening (a head tilted down) or the 2D spline squeezes that distance away.
    """
    out = np.zeros((height, width), np.uint8)
    fixed = np.round(landmarks[_EYE_GROUP_IDS, :2] * 4).astype(np.int32)  # 2 bits of sub-pixel precision
    for group in _EYE_GROUP_SLICES:
        cv2.fillConvexPoly(out, cv2.convexHull(fixed[group]), 1, cv2.LINE_8, 2)
    grow = max(1, int(round(margin * max(height, width))))
    out = cv2.dilate(out, _disc(grow))
    return out.astype(np.float32)


_EYE_GROUPS = (RIGHT_EYE, LEFT_EYE, RIGHT_BROW, LEFT_BROW)
_EYE_GROUP_IDS = np.concatenate([np.array(g) for g in _EYE_GROUPS])
_EYE_GROUP_SLICES = tuple(slice(sum(map(len, _EYE_GROUPS[:i])), sum(map(len, _EYE_GROUPS[:i + 1])))
                          for i in range(len(_EYE_GROUPS)))


@lru_cache(maxsize=8)
def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


@lru_cache(maxsize=4)
def mean_mesh_on_template(size: int = 112) -> np.ndarray:
    """The canonical face mesh placed on the ArcFace template of a `size` crop: `[468, 3]` (x, y, z) pixels,
    z smaller = nearer, as FaceMesh reports."""
    canon = load_asset().vertices[:NUM_LANDMARKS]
    frontal = np.stack([canon[:, 0], -canon[:, 1], -canon[:, 2]], 1)  # image axes: y down, z away
    m = similarity_transform(five_points(frontal), arcface_template(size))
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    xy = frontal[:, :2] @ m[:, :2].T + m[:, 2]
    z = frontal[:, 2] * scale
    return np.concatenate([xy, (z - z.mean())[:, None]], 1)


class CropLandmarker:
    """Landmarks `[468, 3]` for face crops, with the template fallback for aligned crops.

    `aligned=False` is for crops that do not share the template: no plausibility check and no
    fallback, so a crop without a detectable face gives None.
    """

    def __init__(self, aligned: bool = True, detector: Optional[FaceMeshDetector] = None) -> None:
        self.aligned = aligned
        self.detector = detector or FaceMeshDetector()

    def close(self) -> None:
        self.detector.close()

    def __call__(self, rgb: np.ndarray) -> tuple[Optional[np.ndarray], bool]:
        """(landmarks or None, fallback used)."""
        h, w = rgb.shape[:2]
        accept = None
        if self.aligned:
            if h != w:
                raise ValueError(f"aligned crops are square; got {w}x{h} (use aligned=False)")
            limit = MAX_TEMPLATE_RMS * w
            accept = lambda pts: template_rms(five_points(pts), w) <= limit  # noqa: E731
        if self.aligned:
            # The face is where the template puts it: FaceMesh's landmark model alone, in that region.
            points = self.detector.process_roi(rgb)
            if points is not None:
                # A face turned or tilted away from the template's region is read again in the region
                # its own landmarks give, as FaceMesh's tracking would on the next frame.
                roi = landmarks_roi(points, w, h)
                cx, cy, side = ARCFACE_ROI
                if abs(roi[0] - cx) > ROI_SHIFT or abs(roi[1] - cy) > ROI_SHIFT or abs(roi[2] / side - 1) > 2 * ROI_SHIFT:
                    points = self.detector.process_roi(rgb, roi)
            if points is not None and accept(points):
                return points, False
        points, _ = self.detector.detect(rgb, accept=accept)
        if points is not None:
            return points, False
        if not self.aligned:
            return None, False
        return mean_mesh_on_template(w).copy(), True
