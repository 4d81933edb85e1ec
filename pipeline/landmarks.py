"""Face landmarks shared by `pack --align` and `maskgen`: MediaPipe FaceMesh, its 5 ArcFace points, and
the similarity warp to the ArcFace template.

FaceMesh gives 468 points in the vertex order of MediaPipe's canonical face mesh. Points are returned in
OpenCV's pixel convention (the centre of pixel (0, 0) is (0.0, 0.0)), with z in the same pixel scale,
smaller z being nearer the camera, as MediaPipe defines it.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import cv2
import numpy as np

# The 5-point template of ArcFace's 112x112 crops (insightface's `arcface_dst`): eye centres, nose tip and
# mouth corners, in image order (the subject's right eye first).
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# Landmark groups of the 468-point mesh (MediaPipe's face_mesh_connections, as vertex sets).
RIGHT_EYE = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
LEFT_EYE = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
RIGHT_BROW = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
LEFT_BROW = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267,
        269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)
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

# FaceMesh's landmark model alone, in a given region: what MediaPipe's FaceLandmarkCpu subgraph does
# (region to a 192x192 tensor in [0, 1], the model, sigmoid face score, landmarks projected back), minus
# its switch containers and gate. The graph runs on the calling thread (ApplicationThreadExecutor) and
# the model's XNNPACK delegate on one thread: worker processes are the parallelism, and extra threads
# per graph only hand work back and forth or spin against them (with 2 XNNPACK threads on 2 busy
# cores a crop cost 3x the CPU time). The score is read out and gated in Python.
_ROI_GRAPH = """
input_stream: "image"
input_stream: "roi"
output_stream: "landmarks"
output_stream: "score"
executor { type: "ApplicationThreadExecutor" }
node {
  calculator: "ImageToTensorCalculator"
  input_stream: "IMAGE:image"
  input_stream: "NORM_RECT:roi"
  output_stream: "TENSORS:input_tensors"
  options { [mediapipe.ImageToTensorCalculatorOptions.ext] {
    output_tensor_width: 192 output_tensor_height: 192 output_tensor_float_range { min: 0 max: 1 } } }
}
node {
  calculator: "InferenceCalculatorCpu"
  input_stream: "TENSORS:input_tensors"
  output_stream: "TENSORS:output_tensors"
  options { [mediapipe.InferenceCalculatorOptions.ext] {
    model_path: "mediapipe/modules/face_landmark/face_landmark.tflite"
    delegate { xnnpack { num_threads: 1 } } } }
}
node {
  calculator: "SplitTensorVectorCalculator"
  input_stream: "output_tensors"
  output_stream: "landmark_tensors"
  output_stream: "flag_tensor"
  options { [mediapipe.SplitVectorCalculatorOptions.ext] { ranges { begin: 0 end: 1 } ranges { begin: 1 end: 2 } } }
}
node {
  calculator: "TensorsToFloatsCalculator"
  input_stream: "TENSORS:flag_tensor"
  output_stream: "FLOAT:score"
  options { [mediapipe.TensorsToFloatsCalculatorOptions.ext] { activation: SIGMOID } }
}
node {
  calculator: "TensorsToLandmarksCalculator"
  input_stream: "TENSORS:landmark_tensors"
  output_stream: "NORM_LANDMARKS:roi_landmarks"
  options { [mediapipe.TensorsToLandmarksCalculatorOptions.ext] {
    num_landmarks: 468 input_image_width: 192 input_image_height: 192 } }
}
node {
  calculator: "LandmarkProjectionCalculator"
  input_stream: "NORM_LANDMARKS:roi_landmarks"
  input_stream: "NORM_RECT:roi"
  output_stream: "NORM_LANDMARKS:landmarks"
}
"""
FACE_SCORE = 0.5  # FaceLandmarkCpu's threshold on the sigmoid face score
_PB_STRIDE = 17  # bytes per serialised NormalizedLandmark with x, y, z only: 0a 0f 0d <x> 15 <y> 1d <z>


def import_mediapipe(*modules: str) -> list:
    """The named mediapipe modules, without running `mediapipe/__init__.py` when mediapipe is not loaded yet.

    That file imports every solution and task API, matplotlib and sounddevice with them: about 0.7 s of
    CPU in each worker process, for nothing the landmarks need. The packages `mediapipe` and
    `mediapipe.python.solutions` are registered without running their __init__; the first attribute
    another user looks up on either runs it then (PEP 562), so `import mediapipe as mp; mp.solutions...`
    elsewhere in the process still works.
    """
    import importlib
    import importlib.util
    import sys

    if importlib.util.find_spec("mediapipe") is None:  # the `mask` extra
        raise ImportError("face landmarks need mediapipe==0.10.21 (pip install 'facetrain[mask]')")
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging: warnings and up only
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
    import importlib.util
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


class RoiLandmarker:
    """FaceMesh's landmark model in a known square region of an image: no face detector, and none of the
    Python solution wrapper's per-call work (about 2.8 ms of CPU per 112x112 crop against 3.9 through
    `mp.solutions` on the same graph)."""

    def __init__(self) -> None:
        text_format, calculator_pb2, rect_pb2, graph_mod, resource_util, creator, getter, frame, raw_getter = \
            import_mediapipe(
                "google.protobuf.text_format", "mediapipe.framework.calculator_pb2",
                "mediapipe.framework.formats.rect_pb2", "mediapipe.python._framework_bindings.calculator_graph",
                "mediapipe.python._framework_bindings.resource_util", "mediapipe.python.packet_creator",
                "mediapipe.python.packet_getter", "mediapipe.python._framework_bindings.image_frame",
                "mediapipe.python._framework_bindings._packet_getter")
        # The calculators' option extensions must be in the protobuf pool before the graph text is parsed.
        import_mediapipe("mediapipe.calculators.tensor.image_to_tensor_calculator_pb2",
                         "mediapipe.calculators.tensor.inference_calculator_pb2",
                         "mediapipe.calculators.core.split_vector_calculator_pb2",
                         "mediapipe.calculators.tensor.tensors_to_floats_calculator_pb2",
                         "mediapipe.calculators.tensor.tensors_to_landmarks_calculator_pb2")
        import importlib.util

        # Model paths in the graph are relative to site-packages, as MediaPipe's own solutions set it.
        site = os.path.dirname(list(importlib.util.find_spec("mediapipe").submodule_search_locations)[0])
        resource_util.set_resource_dir(site)
        self._rect = rect_pb2.NormalizedRect
        self._creator, self._getter, self._raw, self._srgb = creator, getter, raw_getter, frame.ImageFormat.SRGB
        self._out: dict = {}
        self._graph = graph_mod.CalculatorGraph(
            graph_config=text_format.Parse(_ROI_GRAPH, calculator_pb2.CalculatorGraphConfig()))
        for stream in ("landmarks", "score"):
            self._graph.observe_output_stream(stream, lambda s, p: self._out.__setitem__(s, p))
        self._graph.start_run()
        self._ts = 0

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None

    def __call__(self, rgb: np.ndarray, roi: tuple[float, float, float] = ARCFACE_ROI) -> Optional[np.ndarray]:
        """`[468, 3]` points for the square region `roi` (centre x, y and side as shares of the image's
        width, height and larger side), or None when the model's face score is under 0.5."""
        rgb = as_rgb(rgb)
        h, w = rgb.shape[:2]
        cx, cy, side = roi
        rect = self._rect(x_center=cx, y_center=cy, width=side * max(h, w) / w, height=side * max(h, w) / h,
                          rotation=0.0)
        self._ts += 1
        self._out.clear()
        self._graph.add_packet_to_input_stream(
            "image", self._creator.create_image_frame(image_format=self._srgb, data=rgb).at(self._ts))
        self._graph.add_packet_to_input_stream("roi", self._creator.create_proto(rect).at(self._ts))
        self._graph.wait_until_idle()
        if self._getter.get_float(self._out["score"]) < FACE_SCORE:
            return None
        raw = self._raw._get_serialized_proto(self._out["landmarks"])
        return landmark_array(raw) * (w, h, w) - (0.5, 0.5, 0.0)


def landmark_array(raw: bytes) -> np.ndarray:
    """`[N, 3]` float64 (x, y, z) from a serialised NormalizedLandmarkList: read straight from its bytes
    when every landmark holds exactly x, y and z (MediaPipe's output here), otherwise through protobuf."""
    buf = np.frombuffer(raw, np.uint8)
    if buf.size % _PB_STRIDE == 0:
        rows = buf.reshape(-1, _PB_STRIDE)
        if (rows[:, :3] == (0x0A, 0x0F, 0x0D)).all() and (rows[:, 7] == 0x15).all() and (rows[:, 12] == 0x1D).all():
            values = np.ascontiguousarray(rows[:, 2:].reshape(-1, 3, 5)[:, :, 1:]).view("<f4")
            return values.reshape(-1, 3).astype(np.float64)
    (landmark_pb2,) = import_mediapipe("mediapipe.framework.formats.landmark_pb2")
    parsed = landmark_pb2.NormalizedLandmarkList.FromString(raw)
    return np.array([(p.x, p.y, p.z) for p in parsed.landmark], dtype=np.float64).reshape(-1, 3)


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
        import_mediapipe()  # fails now, with the reason, when mediapipe is missing
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
        if self._mesh is None:
            (face_mesh,) = import_mediapipe("mediapipe.python.solutions.face_mesh")
            self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                            min_detection_confidence=self.min_confidence)
        rgb = as_rgb(rgb)
        h, w = rgb.shape[:2]
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
