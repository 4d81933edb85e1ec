"""Face alignment for `pack --align`: the shared landmark code, align_face on raw photos, and the pack."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.align import align_face
from pipeline.landmarks import (
    ARCFACE_112,
    FaceMeshDetector,
    five_points,
    similarity_transform,
    template_rms,
    warp_to_template,
)
from pipeline.manifest import load_manifest

from .conftest import run_cli


def test_similarity_transform_recovers_a_known_map():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    a, s, t = np.radians(23.0), 1.7, np.array([12.0, -4.0])
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = similarity_transform(src, src @ rot.T + t)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)
    mirrored = src * [-1, 1]
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0  # never a reflection


def test_warp_puts_points_on_the_template():
    img = np.zeros((300, 400, 3), np.uint8)
    pts = ARCFACE_112 * 2.0 + [120, 40]
    out = warp_to_template(img, pts)
    assert out.shape == (112, 112, 3)
    m = similarity_transform(pts, ARCFACE_112)
    np.testing.assert_allclose(pts @ m[:, :2].T + m[:, 2], ARCFACE_112, atol=1e-9)


def _yale(shared_data, names):
    return [np.asarray(Image.open(shared_data / "yale" / n).convert("L")) for n in names]


@pytest.fixture(scope="module")
def detector():
    d = FaceMeshDetector()
    yield d
    d.close()


def test_align_face_on_raw_photos_lands_on_the_template(shared_data, detector):
    """Yale (grey 320x243, whole head) and ORL (92x112 tight crops): after alignment, FaceMesh finds the
    5 points where the ArcFace template puts them."""
    photos = _yale(shared_data, ["subject02.normal", "subject05.happy", "subject09.leftlight", "subject13.glasses"])
    photos += [np.asarray(Image.open(shared_data / "orl" / s / "3.pgm")) for s in ("s1", "s17", "s33")]
    for photo in photos:
        crop = align_face(photo)
        assert crop is not None and crop.shape == (112, 112, 3) and crop.dtype == np.uint8
        points, _ = detector.detect(crop)
        assert points is not None
        assert template_rms(five_points(points)) < 4.0


def test_align_face_finds_no_face_in_non_faces():
    rng = np.random.default_rng(0)
    assert align_face(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) is None
    assert align_face(np.full((200, 200), 128, np.uint8)) is None


def test_detector_pads_tight_crops(shared_data, detector):
    """An ORL face fills its frame; the padded retries still find it."""
    img = np.asarray(Image.open(shared_data / "orl" / "s1" / "1.pgm"))
    tight = img[10:100, 5:87]
    points, attempt = detector.detect(tight)
    assert points is not None
    assert (points[:, 0].min() > -15) and (points[:, 0].max() < tight.shape[1] + 15)


@pytest.mark.slow
def test_pack_align_counts_faces_and_skips(shared_data, tmp_path):
    src = tmp_path / "yale"
    for subject in ("subject01", "subject02"):
        (src / subject).mkdir(parents=True)
        for cond in ("normal", "happy", "sad"):
            shutil.copy(shared_data / "yale" / f"{subject}.{cond}", src / subject / f"{cond}.gif")
    cv2.imwrite(str(src / "subject02" / "wall.png"), np.full((243, 320, 3), 90, np.uint8))
    out = tmp_path / "data"
    run_cli("pipeline", "pack", str(src), "--out", str(out), "--align", "--workers", "1", "--no-progress")
    m = load_manifest(out)
    assert m["num_images"] == 6 and m["aligned"]
    assert m["skipped"]["by_reason"] == {"no face found": 1}


def test_landmark_model_in_the_template_region_agrees_with_full_facemesh(glint24, detector):
    """The detector-free pass that maskgen uses on aligned crops lands where the full FaceMesh does."""
    from pipeline.landmarks import ARCFACE_ROI, landmarks_roi

    crops = [cv2.cvtColor(cv2.imread(str(sorted(p.glob("*.png"))[0])), cv2.COLOR_BGR2RGB)
             for p in sorted(glint24.iterdir())[:6]]
    for crop in crops:
        fast = detector.process_roi(crop)
        full, _ = detector.detect(crop)
        assert fast is not None and full is not None
        assert np.sqrt(((fast[:, :2] - full[:, :2]) ** 2).sum(1)).mean() < 3.0
        cx, cy, side = landmarks_roi(full, 112, 112)
        assert abs(cx - ARCFACE_ROI[0]) < 0.25 and abs(cy - ARCFACE_ROI[1]) < 0.1 and abs(side / ARCFACE_ROI[2] - 1) < 0.2
    assert detector.process_roi(np.full((112, 112, 3), 128, np.uint8)) is None
