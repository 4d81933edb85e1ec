"""Face landmarks shared by `pack --align` and `maskgen`: MediaPipe FaceMesh, its 5 ArcFace points, and
the similarity warp to the ArcFace template.

FaceMesh gives 468 points in the vertex order of MediaPipe's canonical face mesh. Points are returned in
OpenCV's pixel convention (the centre of pixel (0, 0) is (0.0, 0.0)), with z in the same pixel scale,
smaller z being nearer the camera, as MediaPipe defines it.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Sequence

import cv2
import numpy as np

from pipeline.native_stderr import quiet_native_logs, without_known_chatter

# The 5-point template of ArcFace's 112x112 crops (insightface's `arcface_dst`): eye centres, nose tip and
# mouth corners, in image order (the subject's right eye first).
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# Landmark groups of the 468-point mesh (MediaPipe's face_mesh_connections, as vertex sets).
RIGHT_EYE = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
LEFT_EYE = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
RIGHT_BROW = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
LEFT_BROW = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
# The face outline, clockwise in the image from the top of the forehead.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
NOSE_TIP = 4
MOUTH_RIGHT, MOUTH_LEFT = 61, 291  # the subject's right corner is on the image's left
_RIGHT_EYE_IDS, _LEFT_EYE_IDS = np.array(RIGHT_EYE), np.array(LEFT_EYE)
_NOSE_MOUTH_IDS = np.array([NOSE_TIP, MOUTH_RIGHT, MOUTH_LEFT])

# FaceMesh's mouth corners (61/291) sit higher than the mouth corners of the detectors that the ArcFace
# template was made with. Mean offsets from FaceMesh's points to the template, measured on the 941 glint24
# crops (ArcFace-aligned) where FaceMesh finds a face, in units of the inter-ocular distance along the
# face's own axes (x: eye to eye, y: down the face).
_FIVE_POINT_BIAS = np.array([[0.008, -0.004], [0.020, -0.001], [0.014, -0.016], [0.015, 0.086], [0.007, 0.091]])


# Where FaceMesh's own tracking would put its region of interest on an ArcFace-aligned crop (the box of
# its landmarks, 1.5 times as large, squared): mean centre and side as shares of the crop, measured on
# the glint24 crops (centre x 0.501 +- 0.080, y 0.609 +- 0.015, side 1.219 +- 0.044). Landmarks read in
# this fixed region differ from FaceMesh's detector-driven ones by 1.05 px on average (112 px crops).
ARCFACE_ROI = (0.501, 0.609, 1.219)

# FaceMesh's landmark model (MediaPipe's bundled face_landmark.tflite: a 192x192 RGB tensor in [0, 1] in,
# 468 points in tensor pixels and a face-presence logit out) run directly by LiteRT, as MediaPipe's
# FaceLandmarkCpu subgraph runs it, minus the graph: a crop costs 1.2-1.3 ms of CPU against 2.0-2.1
# through a lean MediaPipe graph of the same model. One XNNPACK thread: worker processes are the
# parallelism, and extra threads per model only spin against them on busy cores.
LANDMARK_MODEL = ("modules", "face_landmark", "face_landmark.tflite")  # inside the mediapipe package
LANDMARK_INPUT = 192
FACE_SCORE = 0.5  # FaceLandmarkCpu's threshold on the sigmoid face score


def import_mediapipe(*modules: str) -> list:
    """The named mediapipe modules, without running `mediapipe/__init__.py` when mediapipe is not loaded yet.

    That file imports every solution and task API, matplotlib and sounddevice with them: about 0.7 s of
    CPU in each worker process, for nothing the landmarks need. The packages `mediapipe` and
    `mediapipe.python.solutions` are registered without running their __init__; the first attribute
    another user looks up on either runs it then (PEP 562), so `import mediapipe as mp; mp.solutions...`
    elsewhere in the process still works.
    """
    import importlib
    import sys

    if importlib.util.find_spec("mediapipe") is None:  # the `mask` extra
        raise ImportError("face landmarks need mediapipe==0.10.21 (pip install 'facetrain[mask]')")
    quiet_native_logs()  # MediaPipe's C++ logging: warnings and up only
    for name in ("mediapipe", "mediapipe.python.solutions"):
        if name not in sys.modules:
            _register_without_init(name)
    return [importlib.import_module(m) for m in modules]


def worker_context():
    """The multiprocessing context for landmark workers: "fork" while this process has loaded no MediaPipe,
    else "spawn".

    A forked worker starts at once with the parent's numpy and OpenCV already imported (about 0.3 s of
    CPU less per worker than a spawned one, 7% of masking all 942 glint24 crops on 2 cores); each worker
    builds its own graph after the fork. MediaPipe's graphs and threads do not survive a fork, so a
    parent that has loaded it (a preview, a test, a notebook) spawns its workers instead.
    """
    import multiprocessing as mp
    import sys

    loaded = any(name == "mediapipe" or name.startswith("mediapipe.") for name in sys.modules)
    return mp.get_context("fork" if not loaded and "fork" in mp.get_all_start_methods() else "spawn")


def _register_without_init(name: str) -> None:
    import sys

    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module

    def complete(attr: str):
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, attr)

    module.__getattr__ = complete
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def mediapipe_model(*parts: str) -> str:
    """Path of a model file bundled in the mediapipe wheel, found without importing mediapipe."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face landmarks need mediapipe==0.10.21 (pip install 'facetrain[mask]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: mediapipe 0.10.21 bundles it, 1.x does not")
    return path


class RoiLandmarker:
    """FaceMesh's landmark model in a known square region of an image: no face detector and no MediaPipe
    graph, only the model under LiteRT.

    The region is cut as MediaPipe's ImageToTensorCalculator cuts it (the rectangle's corners onto the
    tensor's corners, bilinear, edge pixels replicated) and the points are projected back as its
    LandmarkProjectionCalculator does, so the landmarks are FaceLandmarkCpu's to within 0.05 px.
    """

    def __init__(self, num_threads: int = 1) -> None:
        quiet_native_logs()
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise ImportError("face landmarks need ai-edge-litert (pip install 'facetrain[mask]')") from e
        with without_known_chatter():  # "Created TensorFlow Lite XNNPACK delegate", once per process
            self._model = Interpreter(model_path=mediapipe_model(*LANDMARK_MODEL), num_threads=num_threads)
            self._model.allocate_tensors()
        (inp,) = self._model.get_input_details()
        if tuple(inp["shape"]) != (1, LANDMARK_INPUT, LANDMARK_INPUT, 3):
            raise ValueError(f"unexpected FaceMesh landmark model input {tuple(inp['shape'])}")
        self._input = self._model.tensor(inp["index"])
        outs = {int(np.prod(d["shape"])): d["index"] for d in self._model.get_output_details()}
        self._points, self._score = outs[468 * 3], outs[1]

    def close(self) -> None:
        self._model = self._input = None

    def __call__(self, rgb: np.ndarray, roi: tuple[float, float, float] = ARCFACE_ROI) -> Optional[np.ndarray]:
        """`[468, 3]` points for the square region `roi` (centre x, y and side as shares of the image's
        width, height and larger side), or None when the model's face score is under 0.5."""
        rgb = as_rgb(rgb)
        h, w = rgb.shape[:2]
        cx, cy, side = roi
        side_px = side * max(h, w)
        x0, y0 = cx * w - side_px / 2, cy * h - side_px / 2
        k = LANDMARK_INPUT / side_px  # image pixels -> tensor pixels
        # Edge pixels repeated beyond the image, as MediaPipe's crop does. Padding first and warping
        # inside the padded image gives the same bytes as warpAffine's own BORDER_REPLICATE at 60% of
        # its cost (OpenCV's border path interpolates pixel by pixel).
        pad = max(0, math.ceil(max(-x0, -y0, x0 + side_px - w, y0 + side_px - h)) + 2)
        src = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else rgb
        crop = cv2.warpAffine(src, np.array([[k, 0.0, -(x0 + pad) * k], [0.0, k, -(y0 + pad) * k]]),
                              (LANDMARK_INPUT, LANDMARK_INPUT), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT)
        np.multiply(crop, np.float32(1 / 255), out=self._input()[0], casting="unsafe")
        self._model.invoke()
        logit = float(self._model.get_tensor(self._score).reshape(-1)[0])
        if logit < np.log(FACE_SCORE / (1 - FACE_SCORE)):  # sigmoid(logit) < FACE_SCORE
            return None
        points = self._model.get_tensor(self._points).reshape(468, 3).astype(np.float64) / k
        points[:, 0] += x0 - 0.5  # tensor corners are image edges; pixel centres sit 0.5 inside
        points[:, 1] += y0 - 0.5
        return points


def landmarks_roi(points: np.ndarray, width: int, height: int) -> tuple[float, float, float]:
    """The region FaceMesh's tracking derives from landmarks: their box, 1.5 times as large, squared;
    as (centre x, centre y, side) shares of the image's larger side."""
    lo, hi = points[:, :2].min(0) + 0.5, points[:, :2].max(0) + 0.5
    side = 1.5 * float((hi - lo).max()) / max(width, height)
    return float((lo[0] + hi[0]) / 2 / width), float((lo[1] + hi[1]) / 2 / height), side


def five_points(mesh: np.ndarray) -> np.ndarray:
    """The ArcFace 5 points `[5, 2]` (eye centres, nose tip, mouth corners) from FaceMesh points `[468, >=2]`."""
    xy = np.asarray(mesh, dtype=np.float64)[:, :2]
    pts = np.empty((5, 2))
    pts[0] = xy[_RIGHT_EYE_IDS].mean(0)
    pts[1] = xy[_LEFT_EYE_IDS].mean(0)
    pts[2:] = xy[_NOSE_MOUTH_IDS]
    ex = pts[1] - pts[0]
    iod = float(np.hypot(*ex))
    if iod < 1e-6:
        return pts
    ex /= iod
    ey = np.array([-ex[1], ex[0]])
    return pts + iod * (_FIVE_POINT_BIAS[:, :1] * ex + _FIVE_POINT_BIAS[:, 1:] * ey)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares rotation + uniform scale + translation `[2, 3]` taking `src` to `dst` (Umeyama 1991)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # never a reflection
        fix[1, 1] = -1
    rot = u @ fix @ vt
    var = (s ** 2).sum() / len(src)
    scale = float((sig * np.diag(fix)).sum() / var) if var > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def arcface_template(size: int = 112) -> np.ndarray:
    """The template scaled to a square crop of `size` pixels."""
    return ARCFACE_112 * (size / 112.0)


def warp_to_template(rgb: np.ndarray, points5: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp an image so that its 5 points land on the ArcFace template: `[size, size, C]` uint8.

    Outside the photo is black, as in insightface's crops (MS1M, Glint360K).
    """
    m = similarity_transform(points5, arcface_template(size))
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def template_rms(points5: np.ndarray, size: int = 112) -> float:
    """RMS distance (pixels) of 5 points from the template of a `size` crop: how far from aligned they are."""
    return float(np.sqrt(((np.asarray(points5) - arcface_template(size)) ** 2).sum(1).mean()))


class FaceMeshDetector:
    """MediaPipe FaceMesh on still images, with retries on padded copies for tight crops.

    The detector inside FaceMesh misses faces that fill the frame; a border around the image gives it the
    context it was trained with. One instance per process: MediaPipe graphs are not shared across forks.
    Each graph (the whole FaceMesh, the landmark model alone) is built the first time it is used.
    """

    def __init__(self, min_confidence: float = 0.5, pads: Sequence[float] = (0.0, 0.25, 0.5, 1.0)) -> None:
        # Fails now, with the reason, when the `mask` extra is missing; nothing is imported until a
        # graph is needed (mediapipe's bindings cost 40 ms of CPU per worker, most never need them).
        mediapipe_model(*LANDMARK_MODEL)
        if importlib.util.find_spec("ai_edge_litert") is None:
            raise ImportError("face landmarks need ai-edge-litert (pip install 'facetrain[mask]')")
        self.min_confidence = min_confidence
        self._mesh = None
        self._roi: Optional[RoiLandmarker] = None
        self.pads = tuple(pads)

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None
        if self._roi is not None:
            self._roi.close()
            self._roi = None

    def process_roi(self, rgb: np.ndarray, roi: tuple[float, float, float] = ARCFACE_ROI) -> Optional[np.ndarray]:
        """FaceMesh's landmark model alone, in a known square region (centre x, y and side as shares of
        the image width/height): no face detector, so less than half the cost. None when the model's
        face-presence score says there is no face there."""
        if self._roi is None:
            self._roi = RoiLandmarker()
        return self._roi(rgb, roi)

    def __enter__(self) -> "FaceMeshDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def process(self, rgb: np.ndarray) -> Optional[np.ndarray]:
        """One FaceMesh pass: `[468, 3]` float64 points, or None when it finds no face."""
        rgb = as_rgb(rgb)
        h, w = rgb.shape[:2]
        if self._mesh is None:
            # The graph's absl warnings come while it is built and on its first image.
            with without_known_chatter():
                (face_mesh,) = import_mediapipe("mediapipe.python.solutions.face_mesh")
                self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                refine_landmarks=False,
                                                min_detection_confidence=self.min_confidence)
                result = self._mesh.process(rgb)
        else:
            result = self._mesh.process(rgb)
        if not result.multi_face_landmarks:
            return None
        lm = result.multi_face_landmarks[0].landmark
        pts = np.array([(p.x, p.y, p.z) for p in lm], dtype=np.float64)
        # Normalised [0, 1] coordinates put pixel centres at (i + 0.5) / size; z is scaled like x.
        return pts * (w, h, w) - (0.5, 0.5, 0.0)

    def detect(self, rgb: np.ndarray, accept=None) -> tuple[Optional[np.ndarray], int]:
        """FaceMesh with retries on padded copies: (points `[468, 3]` or None, the attempt that worked).

        `accept(points) -> bool` rejects implausible results (then the next padding is tried).
        """
        rgb = as_rgb(rgb)
        h, w = rgb.shape[:2]
        fill = tuple(int(v) for v in np.median(rgb.reshape(-1, 3), axis=0))
        for attempt, pad in enumerate(self.pads):
            p = int(round(pad * max(h, w)))
            img = rgb if p == 0 else cv2.copyMakeBorder(rgb, p, p, p, p, cv2.BORDER_CONSTANT, value=fill)
            pts = self.process(img)
            if pts is None:
                continue
            pts[:, :2] -= p
            if accept is None or accept(pts):
                return pts, attempt
        return None, -1


def as_rgb(img: np.ndarray) -> np.ndarray:
    """A contiguous 3-channel uint8 view of a grey or RGB(A) image."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {img.shape}")
    return np.ascontiguousarray(img)
