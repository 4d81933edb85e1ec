"""Turning whatever image bytes a dataset holds into a clean RGB JPEG of the training size.

Odd inputs (CMYK, 16-bit, grey, palette, alpha, EXIF-rotated) are converted, never passed on: every
decoder downstream (DALI's, PIL's, OpenCV's) then sees a plain baseline RGB JPEG and agrees on its pixels.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import Callable, Optional

import cv2
import numpy as np
import pyspng
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

# Large crops of whole photos are legitimate; decompression bombs are still refused, with a clear reason.
Image.MAX_IMAGE_PIXELS = 1 << 28
cv2.setNumThreads(1)

RESIZE_MODES = ("crop", "stretch", "pad")


class ImageRejected(Exception):
    """The bytes cannot become a training image; `reason` is the short word logged in skipped.tsv."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _exif_orientation(img: Image.Image) -> int:
    # PIL's PNG getexif() decodes the whole image to look for a late eXIf chunk; without an early one
    # (the only kind writers put there in practice) a PNG has no orientation to apply.
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not cost the image
        return 1


def decode_rgb(data: bytes, notes: Optional[list] = None) -> np.ndarray:
    """Decode any PIL-readable image to an upright HxWx3 uint8 RGB array; note each conversion made."""
    notes = notes if notes is not None else []
    if not data:
        raise ImageRejected("empty file")
    check_pixels(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except UnidentifiedImageError:
        raise ImageRejected("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected("corrupt image", str(e)) from None
    if getattr(img, "n_frames", 1) > 1:
        notes.append("first frame")
    if _exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
        notes.append("exif rotated")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F" or arr.dtype.kind == "f":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (np.nan_to_num(arr) - lo) * (255.0 / max(hi - lo, 1e-12))
        else:
            # 16-bit samples: keep the high byte, as libpng's strip-16 does.
            arr = np.asarray(arr, dtype=np.int64) >> 8 if arr.max() > 255 else arr
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        notes.append("16-bit to 8-bit")
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "CMYK":
        notes.append("cmyk to rgb")
    elif mode in ("L", "1", "LA"):
        notes.append("grey to rgb")
    elif mode in ("P", "PA"):
        notes.append("palette to rgb")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, as OpenCV's and DALI's decoders do with alpha dropped.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
        notes.append("alpha dropped")
    rgb = np.asarray(img.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageRejected("corrupt image", f"decoded to shape {rgb.shape}")
    return rgb


def resize_to(rgb: np.ndarray, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
    """Resize to (width, height): 'crop' covers then centre-crops, 'stretch' ignores the aspect ratio,
    'pad' fits inside and pads with black."""
    w, h = size
    ih, iw = rgb.shape[:2]
    if (iw, ih) == (w, h):
        return rgb
    if mode == "stretch":
        return _resize(rgb, w, h)
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, not {mode!r}")
    scale = max(w / iw, h / ih) if mode == "crop" else min(w / iw, h / ih)
    nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
    scaled = _resize(rgb, nw, nh)
    if mode == "crop":
        x0, y0 = (nw - w) // 2, (nh - h) // 2
        return np.ascontiguousarray(scaled[y0:y0 + h, x0:x0 + w])
    out = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0 = (w - nw) // 2, (h - nh) // 2
    out[y0:y0 + nh, x0:x0 + nw] = scaled
    return out


def _resize(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    shrinking = w * h < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Baseline 4:2:0 JPEG (what im2rec and insightface's packs hold), through libjpeg-turbo."""
    try:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
    except Exception as e:
        raise ImageRejected("encode failed", str(e)) from None


def jpeg_quality(data: bytes) -> Optional[int]:
    """The IJG quality a JPEG was written with, from its luminance quantisation table (None: not a JPEG)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            tables = getattr(im, "quantization", None)
    except Exception:
        return None
    if not tables:
        return None
    q = np.asarray(tables[min(tables)], dtype=np.float64)
    # The IJG scale factor is the table over the standard table (order-free as a ratio of sums).
    scale = 100.0 * q.sum() / _IJG_LUMA_SUM
    quality = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
    return int(np.clip(round(quality), 1, 100))


# Sum of the IJG standard luminance table (ITU T.81 Annex K, Table K.1).
_IJG_LUMA_SUM = 3688.0


def encode_png(rgb: np.ndarray) -> bytes:
    """8-bit RGB PNG of an HxWx3 uint8 array, lossless, at about 2/3 of libpng's CPU through OpenCV.

    One filter for every row (Up: faces change slowly downwards) instead of libpng's per-row search,
    and zlib's fastest level with run-length matching; the files come out a little smaller than OpenCV's.
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"encode_png takes an HxWx3 uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    flat = rgb.reshape(h, w * 3)
    rows = np.empty((h, w * 3 + 1), np.uint8)
    rows[0, 0] = 0  # filter None: no row above
    rows[0, 1:] = flat[0]
    rows[1:, 0] = 2  # filter Up: the byte minus the one above, modulo 256
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = z.compress(rows.data) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, adaptive filters, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def encode_image(rgb: np.ndarray, suffix: str, quality: int = 95) -> bytes:
    """RGB uint8 `[H, W, 3]` as the file type its suffix names ('.png', '.jpg', or any OpenCV writes)."""
    suffix = suffix.lower()
    if suffix == ".png":
        return encode_png(rgb)
    if suffix in (".jpg", ".jpeg"):
        return encode_jpeg(rgb, quality)
    ok, buf = cv2.imencode(suffix, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageRejected("encode failed", f"OpenCV cannot write {suffix}")
    return buf.tobytes()


def header_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from the file's header alone (PNG IHDR, JPEG SOF, else PIL's header parse),
    or None when the header does not tell."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack_from(">II", data, 16)
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 <= len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
                pos += 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                h, w = struct.unpack_from(">HH", data, pos + 5)
                return w, h
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError:
        return (Image.MAX_IMAGE_PIXELS + 1, 1)
    except Exception:
        return None


def check_pixels(data: bytes) -> None:
    """Refuse a decompression bomb from its header, before any decoder allocates its pixels: every decode
    path (libspng, libjpeg-turbo, OpenCV, PIL) goes through here, with PIL's limit as the one limit."""
    size = header_size(data)
    if size is not None and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        raise ImageRejected("too large", f"{size[0]}x{size[1]} pixels exceed the limit of "
                                         f"{Image.MAX_IMAGE_PIXELS}")


def decode_any(data: bytes) -> Optional[np.ndarray]:
    """Any image OpenCV reads as upright HxWx3 RGB uint8 (libspng for plain 8-bit RGB PNG, which gives
    the same pixels at half the cost), or None when it does not decode or is over the pixel limit."""
    try:
        check_pixels(data)
    except ImageRejected:
        return None
    if _plain_png(data):
        rgb = decode_fast(data, "PNG")
        if rgb is not None:
            return rgb
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if arr is None else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _plain_png(data: bytes) -> bool:
    """8-bit RGB PNG without an orientation chunk, read from the header: the fast path can decode it."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 33 or data[12:16] != b"IHDR":
        return False
    if data[24] != 8 or data[25] != 2:  # bit depth 8, colour type 2 (RGB)
        return False
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            return True
        if kind == b"eXIf":
            return False
        pos += 12 + length
    return False


def _probe(data: bytes) -> Optional[Image.Image]:
    """PIL's header-only look at the bytes (no pixel decoding), or None when PIL cannot tell."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception:
        return None


def _decodes(img: Image.Image) -> bool:
    # PIL refuses truncated JPEG data where OpenCV would quietly return a half-grey image.
    try:
        img.load()
        return True
    except Exception:
        return False


def decode_fast(data: bytes, kind: str) -> Optional[np.ndarray]:
    """libspng / libjpeg-turbo decode of plain 8-bit RGB PNG or JPEG, or None to take the careful path."""
    try:
        if kind == "PNG":
            arr = pyspng.load(data)
        else:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:
        return None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        return None
    return arr


def prepare_image(
    data: bytes,
    size: tuple[int, int] = (112, 112),
    quality: int = 95,
    resize_mode: str = "crop",
    transform: Optional[Callable[[np.ndarray], Optional[np.ndarray]]] = None,
) -> tuple[bytes, list[str]]:
    """The JPEG to store for one input image, and the conversions made (for the manifest's counts).

    A baseline RGB or grey JPEG already at `size` and upright is stored as it is. `transform` (face
    alignment) maps the decoded RGB image to a new one, or None when it finds no face.
    """
    notes: list[str] = []
    if not data:
        raise ImageRejected("empty file")
    check_pixels(data)
    rgb = decode_fast(data, "PNG") if _plain_png(data) else None
    if rgb is None:
        probe = _probe(data)
        upright_jpeg = (probe is not None and probe.format == "JPEG" and probe.mode in ("RGB", "L")
                        and _exif_orientation(probe) == 1)
        if upright_jpeg and transform is None and probe.size == tuple(size) and _decodes(probe):
            return data, ["passthrough"]
        if upright_jpeg and probe.mode == "RGB":
            rgb = decode_fast(data, "JPEG")
    if rgb is None:
        rgb = decode_rgb(data, notes)
    if transform is not None:
        rgb = transform(rgb)
        if rgb is None:
            raise ImageRejected("no face found")
        notes.append("aligned")
    if rgb.shape[1] != size[0] or rgb.shape[0] != size[1]:
        rgb = resize_to(rgb, size, resize_mode)
        notes.append("resized")
    return encode_jpeg(rgb, quality), notes


def decode_jpeg_rgb(data: bytes) -> np.ndarray:
    """Decode a stored training image (our own JPEG) to RGB uint8; raises ImageRejected on corruption."""
    check_pixels(data)
    try:
        # strict: libjpeg-turbo's warnings (a truncated stream) are errors, not a half-grey image
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except Exception:
        pass
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # PNG or other stored formats
    if arr is None or data[:3] == b"\xff\xd8\xff":
        raise ImageRejected("corrupt image", f"{len(data)} bytes do not decode")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
