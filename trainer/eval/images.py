"""Images to embed: the 112x112 crop size, the file types read, and reading or aligning one face."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.imageio import ImageRejected, decode_rgb, resize_to

IMAGE_SIZE = (112, 112)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".gif", ".webp", ".tif", ".tiff")


class VerificationError(ValueError):
    """A verification set cannot be read; the message says which file and why."""



def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB (grey, palette, 16-bit and CMYK images converted)."""
    return decode_rgb(data)


def face_crop(rgb: np.ndarray, align: bool = False,
              size: tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, bool]:
    """The 112x112 face to embed, and whether alignment failed. With `align` the face is detected and
    warped to the ArcFace template (pipeline.align); where no face is found, and without `align`, an
    image of another size is resized (short side, centre crop) as insightface's `.bin` loader does."""
    failed = False
    if align:
        from pipeline.align import align_face  # mediapipe loads only when asked for

        crop = align_face(rgb, size=size[0])
        if crop is not None:
            return np.ascontiguousarray(crop), False
        failed = True
    if rgb.shape[:2] != (size[1], size[0]):
        rgb = resize_to(rgb, size, "crop")
    return np.ascontiguousarray(rgb), failed


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VerificationError(f"cannot read image {path}: {e.strerror}") from None
    try:
        return decode_image(data)
    except ImageRejected as e:
        raise VerificationError(f"image {path}: {e}") from None

