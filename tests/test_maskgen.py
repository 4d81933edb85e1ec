"""maskgen's parts: the mesh asset, shapes, textures, the rasteriser, the spline, compositing, and the
mask quality on real aligned crops (coverage of the lower face, no eye or brow touched)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from maskgen import quality
from maskgen.composite import composite, estimate_blur, estimate_noise, is_grey, lighting_field, measure
from maskgen.facemesh_asset import (
    ASSET,
    NUM_LANDMARKS,
    build_asset,
    fit_affine3d,
    head_yaw,
    load_asset,
    read_canonical_pbtxt,
)
from maskgen.landmarks import mean_mesh_on_template
from maskgen.render3d import MeshRenderer, rasterize_uv
from maskgen.shapes import MASK_TYPES, draw_shape, eye_safe_v
from maskgen.textures import PATTERNS, Style, UVCanvas, draw_style, render_texture
from maskgen.warp2d import SplineWarper, ThinPlateSpline
from pipeline.landmarks import ARCFACE_112, five_points


# ---------------------------------------------------------------------------------------------- asset
def test_asset_matches_mediapipe_geometry(shared_data):
    """The shipped asset is what the builder makes from MediaPipe's file (no hand edits)."""
    pbtxt = shared_data / "mediapipe_face_geometry" / "geometry_pipeline_metadata_landmarks.pbtxt"
    rebuilt = build_asset(*read_canonical_pbtxt(pbtxt))
    shipped = json.loads(ASSET.read_text())
    assert shipped["triangles"] == rebuilt["triangles"]
    np.testing.assert_allclose(shipped["vertices"], rebuilt["vertices"], atol=1e-6)
    np.testing.assert_allclose(shipped["uv"], rebuilt["uv"], atol=1e-6)
    assert (ASSET.parent / "NOTICE").read_text().count("Apache License") == 1


def test_asset_extension_is_consistent():
    a = load_asset()
    assert a.vertices.shape == a.uv.shape[:1] + (3,) and len(a.vertices) > NUM_LANDMARKS
    # Every triangle, the added ones too, has the same winding in UV: the renderer's culling relies on it.
    t = a.triangles
    uv = a.uv
    cross = ((uv[t[:, 1]] - uv[t[:, 0]])[:, 0] * (uv[t[:, 2]] - uv[t[:, 0]])[:, 1]
             - (uv[t[:, 1]] - uv[t[:, 0]])[:, 1] * (uv[t[:, 2]] - uv[t[:, 0]])[:, 0])
    assert (cross < 0).all()
    # The extension lies outside the face: below the chin and beyond the cheeks in UV.
    ext = uv[NUM_LANDMARKS:]
    assert ext[:, 1].max() > uv[152, 1] + 0.05
    assert ext[:, 0].min() < uv[234, 0] - 0.05 and ext[:, 0].max() > uv[454, 0] + 0.05
    # Extension vertices follow the face: for the canonical mesh itself they are where the asset says.
    np.testing.assert_allclose(a.extended_vertices(a.vertices[:NUM_LANDMARKS]), a.vertices, atol=1e-6)


def test_affine_fit_and_yaw():
    a = load_asset()
    canon = a.vertices[:NUM_LANDMARKS]
    for deg in (0.0, 20.0, -40.0):
        r = np.radians(deg)
        rot = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
        img = canon @ rot.T * np.array([3.0, -3.0, -3.0]) + [56, 60, 0]  # image axes: y down, z away
        assert abs(head_yaw(a.pose(img)) - deg) < 0.5
        np.testing.assert_allclose(fit_affine3d(canon, img)[:, 3], [56, 60, 0], atol=1e-6)


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", MASK_TYPES)
def test_shapes_stay_clear_of_the_eyes(kind):
    a = load_asset()
    from pipeline.landmarks import LEFT_BROW, LEFT_EYE, RIGHT_BROW, RIGHT_EYE

    eyes = a.uv[list(RIGHT_EYE + LEFT_EYE + RIGHT_BROW + LEFT_BROW)]
    for i in range(20):
        rng = np.random.default_rng(i)
        shape = draw_shape(kind, rng, nose_covered=bool(i % 2))
        top = shape.top_at(eyes[:, 0])
        assert (top >= eyes[:, 1] + 0.04).all()
        # Over the nose: the bridge for a worn-high mask, under the nose tip otherwise.
        assert shape.top_at(np.array([0.5]))[0] < a.uv[4, 1] if i % 2 else shape.top_at(np.array([0.5]))[0] > a.uv[4, 1]
        # Below the chin.
        assert shape.bottom_at(np.array([0.5]))[0] > a.uv[152, 1]
    assert np.isneginf(eye_safe_v(np.array([-0.3]))).all()


def test_draw_shape_rejects_unknown_type():
    with pytest.raises(ValueError, match="mask type"):
        draw_shape("gas", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- textures
@pytest.mark.parametrize("kind", MASK_TYPES)
def test_textures_deterministic_and_premultiplied(kind):
    canvas = UVCanvas.for_size(112)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    tex_a = render_texture(draw_shape(kind, rng_a), draw_style(kind, rng_a), canvas)
    tex_b = render_texture(draw_shape(kind, rng_b), draw_style(kind, rng_b), canvas)
    np.testing.assert_array_equal(tex_a, tex_b)
    assert tex_a.shape == (canvas.height, canvas.width, 4) and tex_a.dtype == np.float32
    alpha = tex_a[..., 3]
    assert alpha.min() >= 0 and alpha.max() <= 1 and (alpha == 1).mean() > 0.3 and (alpha == 0).mean() > 0.1
    assert (tex_a[..., :3] <= alpha[..., None] + 1e-5).all()  # premultiplied: no colour where no mask
    # Feathered: the edge has partial coverage, but only a thin band of it.
    partial = (alpha > 0.02) & (alpha < 0.98)
    assert 0 < partial.mean() < 0.08


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cloth_patterns_differ_from_plain(pattern):
    canvas = UVCanvas.for_size(112)
    shape = draw_shape("cloth", np.random.default_rng(1))
    plain = render_texture(shape, Style((0.2, 0.4, 0.6), "plain", (0.9, 0.9, 0.1), seed=3), canvas)
    printed = render_texture(shape, Style((0.2, 0.4, 0.6), pattern, (0.9, 0.9, 0.1), (0.8, 0.1, 0.1), seed=3),
                             canvas)
    inside = plain[..., 3] > 0.99
    diff = np.abs(printed[..., :3] - plain[..., :3]).max(-1)[inside]
    if pattern == "plain":
        assert diff.max() < 1e-6
    else:
        assert (diff > 0.2).mean() > 0.05  # a print covers a real share of the mask


# ---------------------------------------------------------------------------------------------- rasteriser
def _brute_force_uv(verts, uv, tris, w, h):
    out = np.full((h, w, 2), np.nan)
    depth = np.full((h, w), np.inf)
    for t in tris:
        (ax, ay), (bx, by), (cx, cy) = verts[t, :2]
        det = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        uvdet = ((uv[t[1]] - uv[t[0]])[0] * (uv[t[2]] - uv[t[0]])[1]
                 - (uv[t[1]] - uv[t[0]])[1] * (uv[t[2]] - uv[t[0]])[0])
        if abs(det) < 1e-12 or np.sign(det) != np.sign(uvdet):
            continue
        for y in range(h):
            for x in range(w):
                la = ((by - cy) * (x - cx) + (cx - bx) * (y - cy)) / det
                lb = ((cy - ay) * (x - cx) + (ax - cx) * (y - cy)) / det
                lc = 1 - la - lb
                if min(la, lb, lc) < -1e-7:
                    continue
                z = la * verts[t[0], 2] + lb * verts[t[1], 2] + lc * verts[t[2], 2]
                if z < depth[y, x]:
                    depth[y, x] = z
                    out[y, x] = la * uv[t[0]] + lb * uv[t[1]] + lc * uv[t[2]]
    return out


def test_rasterizer_matches_brute_force_with_depth_and_culling():
    rng = np.random.default_rng(0)
    w = h = 24
    verts = np.concatenate([rng.uniform(-2, w + 2, (30, 2)), rng.uniform(-5, 5, (30, 1))], 1)
    uv = rng.uniform(0, 1, (30, 2))
    tris = np.array([rng.choice(30, 3, replace=False) for _ in range(40)])
    got, covered = rasterize_uv(verts, uv, tris, w, h)
    want = _brute_force_uv(verts, uv, tris, w, h)
    np.testing.assert_array_equal(covered, ~np.isnan(want[..., 0]))
    np.testing.assert_allclose(got[covered], want[covered], atol=1e-5)
    assert 0.2 < covered.mean() < 1.0  # the case exercises culling (some back faces) and coverage


def test_rasterizer_leaves_no_cracks_between_triangles():
    # A square of two triangles sharing a diagonal through pixel centres.
    verts = np.array([[2.0, 2, 0], [10, 2, 0], [10, 10, 0], [2, 10, 0]])
    uv = np.array([[0.0, 0], [1, 0], [1, 1], [0, 1]])
    tris = np.array([[0, 1, 2], [0, 2, 3]])
    sign = np.sign(((uv[1] - uv[0])[0] * (uv[2] - uv[0])[1] - (uv[1] - uv[0])[1] * (uv[2] - uv[0])[0]))
    if sign < 0:
        tris = tris[:, ::-1]
    _, covered = rasterize_uv(verts, uv, tris, 12, 12)
    assert covered[2:11, 2:11].all() and covered.sum() == 81


def test_mesh_render_is_occluded_by_nearer_surfaces():
    """A head turned 50 degrees: the nose covers part of the far cheek, and the nearer surface wins."""
    a = load_asset()
    canon = a.vertices[:NUM_LANDMARKS]
    renderer = MeshRenderer(UVCanvas.for_size(112))
    r = np.radians(50.0)
    rot = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    img = canon @ rot.T * np.array([4.0, -4.0, -4.0]) + [56, 56, 0]
    uvmap, covered = renderer.uv_map(img, 112, 112)
    # Without the depth test the far cheek (also facing the camera) would show through the nose.
    verts = a.extended_vertices(img)
    flat = verts.copy()
    flat[:, 2] = -verts[:, 2]  # reversed depth: the farthest surface wins instead
    far, _ = rasterize_uv(flat, a.uv, a.triangles, 112, 112)
    differ = covered & (np.abs(uvmap - far).max(-1) > 0.05)
    assert differ.sum() > 20  # surfaces do overlap in this view
    # Where they overlap, the renderer shows the nose (u near the midline), the reversed test the cheek.
    assert np.abs(uvmap[differ, 0] - 0.5).mean() < np.abs(far[differ, 0] - 0.5).mean() - 0.05
    for i in (4, 1, 5):  # nose tip and ridge show themselves
        x, y = np.round(img[i, :2]).astype(int)
        assert covered[y, x] and np.abs(uvmap[y, x] - a.uv[i]).max() < 0.03


# ---------------------------------------------------------------------------------------------- spline
def test_thin_plate_spline_interpolates_and_keeps_affine_maps():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (40, 2))
    dst = rng.uniform(0, 1, (40, 2))
    tps = ThinPlateSpline(src, dst)
    np.testing.assert_allclose(tps(src), dst, atol=1e-6)
    affine = np.array([[0.01, 0.002], [-0.003, 0.02]])
    tps = ThinPlateSpline(src, src @ affine.T + [0.3, 0.1])
    probe = rng.uniform(-50, 150, (20, 2))
    np.testing.assert_allclose(tps(probe), probe @ affine.T + [0.3, 0.1], atol=1e-6)


def test_spline_warp_puts_landmarks_at_their_uv():
    mesh = mean_mesh_on_template(112)
    warper = SplineWarper(UVCanvas.for_size(112))
    uvmap = warper.uv_map(mesh, 112, 112)
    a = load_asset()
    for i in (4, 61, 291, 199, 145, 374):  # control points, read back through the interpolated grid
        x, y = np.round(mesh[i, :2]).astype(int)
        assert np.abs(uvmap[y, x] - a.uv[i]).max() < 0.03


# ---------------------------------------------------------------------------------------------- compositing
def _edge_image(sigma: float) -> np.ndarray:
    img = np.zeros((112, 112), np.float32)
    img[:, 56:] = 0.8
    img[40:70, 20:90] = 0.4
    img += 0.1
    return cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0 else img


@pytest.mark.parametrize("sigma", [0.8, 1.5, 2.5])
def test_blur_estimate_recovers_gaussian_sigma(sigma):
    assert abs(estimate_blur(_edge_image(sigma)) - sigma) < 0.3 * sigma


def test_noise_estimate_recovers_sigma():
    rng = np.random.default_rng(0)
    for s in (0.01, 0.03):
        img = _edge_image(1.0) + rng.normal(0, s, (112, 112)).astype(np.float32)
        assert abs(estimate_noise(img) - s) < 0.3 * s
    assert estimate_noise(_edge_image(1.0)) < 0.004


def test_lighting_field_follows_a_gradient_and_ignores_the_mouth():
    x = np.linspace(0.2, 0.8, 112, dtype=np.float32)
    lum = np.repeat(x[None, :], 112, 0).copy()
    lum[70:85, 40:70] = 0.02  # a dark open mouth
    alpha = np.zeros((112, 112), np.float32)
    alpha[55:105, 15:97] = 1
    field, ref = lighting_field(lum, alpha)
    np.testing.assert_allclose(field[60:100, 20:90], lum[60:100, 20:90] * 0 + x[20:90], atol=0.03)
    assert abs(ref - x[15:97].mean()) < 0.03


def test_composite_grey_photo_gets_grey_mask_and_keeps_the_rest(glint_crops):
    rgb = glint_crops[0]
    grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    layer = np.zeros((112, 112, 4), np.float32)
    layer[60:100, 25:90] = [0.9, 0.2, 0.3, 1.0]  # a red mask, premultiplied
    out, alpha = composite(grey, layer, np.random.default_rng(0))
    assert is_grey(out) and is_grey(grey) and not is_grey(rgb)
    assert np.abs(out[70:90, 40:75].astype(int) - grey[70:90, 40:75]).mean() > 10
    # Far from the mask the photo is untouched (the shadow and feathering stay near the edge).
    np.testing.assert_array_equal(out[:40], grey[:40])
    out_rgb, _ = composite(rgb, layer, np.random.default_rng(0))
    r, g, b = out_rgb[70:90, 40:75].reshape(-1, 3).mean(0)
    assert r > g + 40 and r > b + 40


# glint24's black-and-white and toned Hugh Laurie crops: near grey (3376, 3393, JPEG chroma noise and a
# slight cast) and a warm duotone (3386); 3387 is a colour photo of low saturation.
ONE_HUE = ("Hugh Laurie/3376.png", "Hugh Laurie/3393.png", "Hugh Laurie/3386.png")
COLOUR = ("Hugh Laurie/3387.png", "Mark Ruffalo/6290.png")


def _chroma_from(rgb: np.ndarray, ref: np.ndarray, where: np.ndarray) -> float:
    """95th percentile, over `where`, of the CIELAB chroma distance of `rgb` from `ref`'s mean chroma."""
    ab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)[..., 1:].astype(np.float32)
    centre = cv2.cvtColor(ref, cv2.COLOR_RGB2Lab)[..., 1:].reshape(-1, 2).astype(np.float32).mean(0)
    return float(np.percentile(np.hypot(*(ab[where] - centre).T), 95))


def test_chroma_spread_is_opencvs_cielab_on_every_glint24_crop(glint24):
    """The CIELAB computed here (no OpenCV tables to build per worker) gives OpenCV's 8-bit Lab within its
    rounding, and the same one-hue decision on every real crop."""
    from maskgen.composite import MONO_CHROMA, chroma_spread

    def opencv_spread(rgb):
        lab = cv2.cvtColor(np.ascontiguousarray(rgb[::2, ::2]), cv2.COLOR_RGB2Lab).reshape(-1, 3)[:, 1:]
        ab = lab.astype(np.float32) - lab.astype(np.float32).mean(0)
        return float(np.percentile(np.hypot(ab[:, 0], ab[:, 1]), 95, method="lower"))

    ours, theirs = [], []
    for path in sorted(glint24.rglob("*.png")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        ours.append(chroma_spread(rgb))
        theirs.append(opencv_spread(rgb))
    ours, theirs = np.array(ours), np.array(theirs)
    assert np.abs(ours - theirs).max() < 1.5
    np.testing.assert_array_equal(ours <= MONO_CHROMA, theirs <= MONO_CHROMA)
    assert 20 < (ours <= MONO_CHROMA).sum() < 100  # glint24 has a few dozen one-hue photos
    assert chroma_spread(np.full((8, 8, 3), 128, np.uint8)) < 1e-3


def test_one_hue_photos_get_masks_in_their_own_tint(masker, glint24):
    """Near-grey and toned real photos count as one-hued and get masks of their hue, whatever colour was
    drawn; colour photos keep the drawn colour."""
    from maskgen.masker import draw_spec

    def load(name):
        return cv2.cvtColor(cv2.imread(str(glint24 / name)), cv2.COLOR_BGR2RGB)

    for name in ONE_HUE:
        rgb = load(name)
        stats = measure(rgb)
        assert stats.grey, name
        for seed, kind in enumerate(MASK_TYPES):
            rng = np.random.default_rng(seed)
            result = masker.mask(rgb, rng, spec=draw_spec(rng, "3d", (kind,)))
            under = result.alpha > 0.9
            assert under.sum() > 500
            # The mask's chroma sits on the photo's (a blue or red mask would be 20-60 away).
            assert _chroma_from(result.image, rgb, under) < 6.0, (name, kind)
            assert is_grey(result.image)
    for name in COLOUR:
        assert not measure(load(name)).grey, name
    # A cold, saturated mask on the colour photo keeps its colour.
    rgb = load(COLOUR[0])
    layer = np.zeros((112, 112, 4), np.float32)
    layer[60:100, 25:90] = [0.2, 0.3, 0.9, 1.0]
    out, _ = composite(rgb, layer, np.random.default_rng(0))
    assert _chroma_from(out, rgb, np.s_[70:90, 40:75]) > 20


def test_measure_reports_grey_blur_noise(glint_crops):
    stats = measure(glint_crops[0])
    assert not stats.grey and 0.3 < stats.blur < 3.0 and 0 <= stats.noise < 0.05


# ---------------------------------------------------------------------------------------------- whole masks
def test_mean_mesh_fallback_sits_on_the_template():
    mesh = mean_mesh_on_template(112)
    assert mesh.shape == (NUM_LANDMARKS, 3)
    assert np.sqrt(((five_points(mesh) - ARCFACE_112) ** 2).sum(1).mean()) < 2.5


@pytest.mark.slow
def test_masks_cover_the_lower_face_and_never_the_eyes(masker, glint_crops):
    """Every type in both modes on real aligned crops: coverage of the lower-face landmarks and no eye or
    brow landmark touched (landmarks are FaceMesh's on the unmasked crop)."""
    from maskgen.masker import draw_spec

    covers, low_covers, leaks = [], [], 0
    for i, rgb in enumerate(glint_crops):
        marks, fallback = masker.landmarker(rgb)
        assert not fallback
        for j, kind in enumerate(MASK_TYPES):
            for mode in ("2d", "3d"):
                rng = np.random.default_rng([i, j])
                nose = (i + j) % 4 != 0
                spec = draw_spec(rng, mode, (kind,), nose_covered=float(nose))
                result = masker.mask(rgb, rng, spec=spec, landmarks=marks)
                assert result.image.shape == rgb.shape and result.image.dtype == np.uint8
                if nose:
                    covers.append(quality.coverage(result.alpha, marks, quality.LOWER_FACE))
                else:
                    low_covers.append(quality.coverage(result.alpha, marks, quality.BELOW_NOSE))
                leaks += quality.leaks(result.alpha, marks)
                changed = np.abs(result.image.astype(int) - rgb).max(-1) > 12
                assert changed[result.alpha > 0.9].mean() > 0.5  # the mask is really drawn
    assert np.mean(covers) >= 0.97 and np.min(covers) >= 0.85
    assert np.mean(low_covers) >= 0.95
    assert leaks == 0


def test_masker_is_deterministic_for_a_seed(masker, glint_crops):
    rgb = glint_crops[1]
    a = masker.mask(rgb, np.random.default_rng(7))
    b = masker.mask(rgb, np.random.default_rng(7))
    c = masker.mask(rgb, np.random.default_rng(8))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.meta == b.meta
    assert not np.array_equal(a.image, c.image)
    assert a.meta["mode"] in ("2d", "3d") and a.meta["mask_type"] in MASK_TYPES


def test_changed_region_fills_the_mask(glint_crops):
    rgb = glint_crops[0]
    edited = rgb.copy()
    cv2.ellipse(edited, (56, 85), (35, 20), 0, 0, 360, (20, 200, 20), -1)
    region = quality.changed_region(rgb, edited)
    assert region[85, 56] == 1 and region[10, 10] == 0
    assert abs(region.sum() - np.pi * 35 * 20) < 0.15 * np.pi * 35 * 20


def test_jpeg_quality_is_read_from_the_tables():
    from pipeline.imageio import jpeg_quality

    img = (np.random.default_rng(0).uniform(0, 255, (64, 64, 3))).astype(np.uint8)
    for q in (50, 75, 90, 95):
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        assert abs(jpeg_quality(buf.tobytes()) - q) <= 1
    png = cv2.imencode(".png", img)[1].tobytes()
    assert jpeg_quality(png) is None
    assert jpeg_quality(b"not an image") is None


_REFERENCE_LANDMARKS = """
import sys
import numpy as np
from google.protobuf import text_format
from mediapipe.framework import calculator_pb2
from mediapipe.framework.formats import rect_pb2
from mediapipe.python.solution_base import SolutionBase


crops = np.load(sys.argv[1])
config = text_format.Parse(
    'input_stream: "image" input_stream: "roi" output_stream: "face_landmarks" '
    'node { calculator: "FaceLandmarkCpu" input_stream: "IMAGE:image" input_stream: "ROI:roi" '
    'input_side_packet: "WITH_ATTENTION:with_attention" output_stream: "LANDMARKS:face_landmarks" }',
    calculator_pb2.CalculatorGraphConfig())
graph = SolutionBase(graph_config=config, side_inputs={"with_attention": False}, outputs=["face_landmarks"])
cx, cy, side = (float(v) for v in sys.argv[3:6])
rect = rect_pb2.NormalizedRect(x_center=cx, y_center=cy, width=side, height=side, rotation=0.0)
out = np.full((len(crops), 468, 3), np.nan)
for i, crop in enumerate(crops):
    marks = graph.process({"image": crop, "roi": rect}).face_landmarks
    if marks is not None:
        out[i] = [(p.x, p.y, p.z) for p in marks.landmark]
np.save(sys.argv[2], out)
"""


def test_litert_landmarks_equal_mediapipes_face_landmark_subgraph(glint_crops, tmp_path):
    """The landmark model under LiteRT gives FaceLandmarkCpu's landmarks (to 0.1 px: another resampler and
    another XNNPACK build than MediaPipe's), and its no-face.

    The reference is MediaPipe's subgraph through its solution wrapper, in a clean process (with the full
    `import mediapipe`, as MediaPipe's own solutions run it)."""
    import subprocess
    import sys

    from pipeline.landmarks import ARCFACE_ROI, RoiLandmarker

    crops = np.stack(glint_crops[:6] + [np.full((112, 112, 3), 128, np.uint8)])
    np.save(tmp_path / "crops.npy", crops)
    subprocess.run([sys.executable, "-c", _REFERENCE_LANDMARKS, str(tmp_path / "crops.npy"), str(tmp_path / "ref.npy"),
                    *map(str, ARCFACE_ROI)], check=True, capture_output=True)
    reference = np.load(tmp_path / "ref.npy")
    lean = RoiLandmarker()
    try:
        for crop, expected in zip(crops, reference):
            mine = lean(crop)
            if np.isnan(expected).all():
                assert mine is None
                continue
            np.testing.assert_allclose(mine, expected * 112 - (0.5, 0.5, 0.0), atol=0.1)
        assert mine is None and np.isnan(reference[-1]).all()  # the grey square has no face
        assert not np.isnan(reference[:-1]).any()
    finally:
        lean.close()


def test_workers_fork_only_while_no_mediapipe_is_loaded():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, '.')\n"
            "from pipeline.landmarks import worker_context, import_mediapipe\n"
            "a = worker_context().get_start_method()\n"
            "import_mediapipe('mediapipe.framework.formats.landmark_pb2')\n"
            "print(a, worker_context().get_start_method())")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fork", "spawn"]


def test_mask_many_gives_what_mask_gives_one_image_at_a_time(masker, glint_crops):
    """Landmarks of the whole batch first, then the masks: the same bytes, fallbacks and metadata."""
    blank = np.full((112, 112, 3), 128, np.uint8)  # no face: the template fallback
    images = glint_crops[:6] + [blank] + glint_crops[6:9]
    together = masker.mask_many(images, [np.random.default_rng(i) for i in range(len(images))])
    for i, (rgb, got) in enumerate(zip(images, together)):
        want = masker.mask(rgb, np.random.default_rng(i))
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.landmarks, want.landmarks)
        assert got.meta == want.meta and got.fallback == want.fallback
    assert together[6].fallback and not any(r.fallback for r in together[:6])
