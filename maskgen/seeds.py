"""Seeded randomness for maskgen: which images are masked and each masked image's own random stream.

Both depend on the seed and an image's id only, never on the order the images are listed or processed
in, so a re-run with more workers (or a folder listed in another order) masks the same images the same way.
"""
from __future__ import annotations

import numpy as np

_IMAGE_STREAM = 0x6D61736B  # "mask": the image's stream apart from any other use of the same seed


def seeded_key(seed: int, ids: np.ndarray, stream: int) -> np.ndarray:
    """A seeded pseudo-random 64-bit key per id (splitmix64), independent of the ids' order."""
    x = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9) % (1 << 64))
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def image_seeds(seed: int, ids: np.ndarray) -> list[int]:
    """One non-negative 63-bit seed per image id, for `image_rng`."""
    return (seeded_key(seed, np.asarray(ids), 4) >> np.uint64(1)).tolist()


def image_rng(image_seed: int) -> np.random.Generator:
    """The random stream everything drawn for one image (mask, style, grain) comes from."""
    return np.random.default_rng([image_seed, _IMAGE_STREAM])
