"""How well a mask sits: the share of lower-face landmarks it covers, and whether it touches eyes or brows.

Landmarks are FaceMesh points of the unmasked face; a landmark is covered where the mask's alpha there
(bilinear) is at least `COVERED`, and an eye or brow landmark leaks where alpha exceeds `LEAK`.
"""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.landmarks import LEFT_BROW, LEFT_EYE, RIGHT_BROW, RIGHT_EYE

NOSE = (1, 4, 5, 19, 94, 2, 98, 327, 129, 358, 48, 278, 64, 294)  # tip and wings
MOUTH = (0, 17, 61, 291, 37, 267, 84, 314, 40, 270, 91, 321, 13, 14, 78, 308)
CHIN = (152, 175, 199, 200, 148, 377, 171, 396)
CHEEKS = (205, 425, 50, 280, 36, 266, 187, 411, 207, 427, 216, 436)
LOWER_FACE = NOSE + MOUTH + CHIN + CHEEKS
# What a mask worn below the nose is meant to cover: below the nostrils.
BELOW_NOSE = MOUTH + CHIN + (207, 427, 216, 436)
EYES_BROWS = RIGHT_EYE + LEFT_EYE + RIGHT_BROW + LEFT_BROW
COVERED = 0.5
LEAK = 0.1


def sample(alpha: np.ndarray, landmarks: np.ndarray, ids) -> np.ndarray:
    """alpha at the landmarks `ids` (bilinear; 0 outside the image)."""
    pts = landmarks[list(ids), :2].astype(np.float32)
    out = cv2.remap(alpha.astype(np.float32), pts[:, :1].reshape(-1, 1), pts[:, 1:].reshape(-1, 1),
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.ravel()


def inside(shape: tuple, landmarks: np.ndarray, ids) -> np.ndarray:
    """Which of the landmarks `ids` lie in an image of `shape` (a crop often cuts the chin off)."""
    h, w = shape[:2]
    xy = landmarks[list(ids), :2]
    return (xy[:, 0] >= 0) & (xy[:, 0] <= w - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= h - 1)


def coverage(alpha: np.ndarray, landmarks: np.ndarray, ids=LOWER_FACE) -> float:
    """Share of the landmarks `ids` inside the image that the mask covers (nan when none is inside)."""
    seen = inside(alpha.shape, landmarks, ids)
    if not seen.any():
        return float("nan")
    return float((sample(alpha, landmarks, ids)[seen] >= COVERED).mean())


def leaks(alpha: np.ndarray, landmarks: np.ndarray, ids=EYES_BROWS) -> int:
    """How many eye and brow landmarks the mask touches."""
    return int((sample(alpha, landmarks, ids) > LEAK).sum())


def changed_region(original: np.ndarray, edited: np.ndarray, threshold: int = 24) -> np.ndarray:
    """Where an edit changed the image, as a 0/1 float mask with holes filled (for tools that do not give
    an alpha): pixels whose channels moved by more than `threshold`, closed, and everything enclosed."""
    diff = cv2.absdiff(original, edited)
    if diff.ndim == 3:
        diff = diff.max(axis=2)
    changed = (diff > threshold).astype(np.uint8)
    changed = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    contours, _ = cv2.findContours(changed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(changed)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(np.float32)
