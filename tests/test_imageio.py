"""The image codecs of pipeline.imageio that other stages write files with: lossless and read back alike
by every decoder the project and its users have."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pyspng
import pytest
from PIL import Image

from pipeline.imageio import decode_any, encode_image, encode_png


def _real_crops(glint24, n: int = 12) -> list[np.ndarray]:
    files = sorted(glint24.rglob("*.png"))[:: max(1, len(sorted(glint24.rglob("*.png"))) // n)][:n]
    return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]


def test_encode_png_is_lossless_for_libspng_libpng_and_pil(glint24):
    rng = np.random.default_rng(0)
    images = _real_crops(glint24) + [
        rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),  # noise: nothing to compress, odd sizes
        np.zeros((1, 1, 3), np.uint8),
        np.full((1, 9, 3), 255, np.uint8),
        rng.integers(0, 256, (9, 1, 3), dtype=np.uint8),
        np.asfortranarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),  # not C-contiguous
    ]
    for rgb in images:
        data = encode_png(rgb)
        assert np.array_equal(pyspng.load(data), rgb)
        assert np.array_equal(cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                           cv2.COLOR_BGR2RGB), rgb)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # chunk CRCs and structure
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgb)


def test_encode_png_refuses_what_it_cannot_write():
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.uint16),
                np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError):
            encode_png(bad)


def test_decode_any_gives_opencvs_pixels_for_every_kind_of_file(glint24):
    rgb = _real_crops(glint24, 1)[0]
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    files = [cv2.imencode(".png", bgr)[1].tobytes(), encode_png(rgb), cv2.imencode(".jpg", bgr)[1].tobytes(),
             cv2.imencode(".png", grey)[1].tobytes(), cv2.imencode(".bmp", bgr)[1].tobytes(),
             cv2.imencode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))[1].tobytes(),
             cv2.imencode(".png", (bgr.astype(np.uint16) * 257))[1].tobytes()]
    for data in files:
        want = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        got = decode_any(data)
        assert got is not None and got.dtype == np.uint8 and got.shape == want.shape
        assert np.array_equal(got, want)
    assert decode_any(b"not an image") is None
    assert decode_any(files[1][: len(files[1]) // 2]) is None  # truncated


def test_encode_image_writes_the_type_its_suffix_names(glint24):
    rgb = _real_crops(glint24, 1)[0]
    assert encode_image(rgb, ".PNG")[:8] == b"\x89PNG\r\n\x1a\n"
    jpg = encode_image(rgb, ".jpg", quality=90)
    assert jpg[:3] == b"\xff\xd8\xff"
    assert np.abs(decode_any(jpg).astype(int) - rgb).mean() < 4
    bmp = encode_image(rgb, ".bmp")
    assert bmp[:2] == b"BM" and np.array_equal(decode_any(bmp), rgb)


def _count_decoders(monkeypatch) -> list:
    import pipeline.imageio as imageio

    calls = []
    real_png, real_jpeg = imageio.pyspng.load, imageio.simplejpeg.decode_jpeg
    monkeypatch.setattr(imageio.pyspng, "load", lambda *a, **k: calls.append("png") or real_png(*a, **k))
    monkeypatch.setattr(imageio.simplejpeg, "decode_jpeg",
                        lambda *a, **k: calls.append("jpeg") or real_jpeg(*a, **k))
    return calls


@pytest.mark.parametrize("kind", ["rgb png", "grey png", "rgb jpeg", "grey jpeg"])
def test_pixel_limit_is_checked_from_the_header_on_every_decode_path(kind, monkeypatch):
    """Issue O.8: an 8-bit RGB PNG (and an RGB JPEG) used to reach libspng / libjpeg-turbo whatever its size."""
    from pipeline import imageio

    rgb = np.random.default_rng(0).integers(0, 255, (120, 100, 3), dtype=np.uint8)
    img = Image.fromarray(rgb if "rgb" in kind else rgb[:, :, 0])
    buf = io.BytesIO()
    img.save(buf, "PNG" if "png" in kind else "JPEG")
    data = buf.getvalue()
    assert imageio.header_size(data) == (100, 120)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 120 - 1)
    calls = _count_decoders(monkeypatch)
    with pytest.raises(imageio.ImageRejected) as e:
        imageio.prepare_image(data)
    assert e.value.reason == "too large" and "100x120" in e.value.detail
    with pytest.raises(imageio.ImageRejected):
        imageio.decode_jpeg_rgb(data)
    with pytest.raises(imageio.ImageRejected):
        imageio.decode_rgb(data)
    assert decode_any(data) is None
    assert calls == []  # no decoder was handed the pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 120)
    jpeg, _ = imageio.prepare_image(data)
    assert imageio.header_size(jpeg) == (112, 112)


def test_header_of_a_huge_png_is_read_without_its_pixels():
    from pipeline import imageio

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + imageio._png_chunk(b"IHDR", ihdr)
            + imageio._png_chunk(b"IDAT", zlib.compress(b"\0" * 60001)) + imageio._png_chunk(b"IEND", b""))
    with pytest.raises(imageio.ImageRejected, match="20000x20000"):
        imageio.prepare_image(data)
