"""trainer.eval.embedding: pixel normalisation, the flip test, eval mode, and embed_dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests._eval_helpers import SmallConv
from trainer.eval import embedding as V
from trainer.eval.images import VerificationError


class ChannelMeans(nn.Module):
    """A model whose embedding is knowable by hand: per channel, the mean of the left and the right half of
    the normalised image, plus a constant (so that no embedding is zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[3] // 2
        return torch.cat([x[..., :w].mean((2, 3)), x[..., w:].mean((2, 3)), torch.ones(len(x), 1)], dim=1)


# ---------------------------------------------------------------------------------------- embeddings

def test_embeddings_normalise_pixels_and_sum_the_mirror_image():
    img = np.zeros((1, 112, 112, 3), np.uint8)
    img[:, :, :56] = 255  # left half white, right half black
    emb = V.embed_images(ChannelMeans(), img, "cpu", flip=False)
    # (255 - 127.5) / 127.5 = 1 and (0 - 127.5) / 127.5 = -1: left means 1, right means -1.
    assert np.allclose(emb.embeddings[0], [1, 1, 1, -1, -1, -1, 1])
    flipped = V.embed_images(ChannelMeans(), img, "cpu", flip=True)
    assert np.allclose(flipped.embeddings[0], [0, 0, 0, 0, 0, 0, 2])
    assert flipped.xnorm == pytest.approx(np.sqrt(7))


def test_embed_restores_training_mode_and_uses_eval_mode():
    model = SmallConv().train()
    x = np.random.default_rng(0).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    a = V.embed_images(model, x, "cpu", batch_size=4, flip=False).embeddings
    assert model.training
    b = V.embed_images(model, x[:1], "cpu", flip=False).embeddings  # batch of one: fine in eval mode
    assert np.allclose(a[:1], b, atol=1e-5)


def test_non_finite_embeddings_are_an_error_not_a_score():
    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 4), float("nan"))

    with pytest.raises(FloatingPointError, match="NaN"):
        V.embed_images(Broken(), np.zeros((2, 112, 112, 3), np.uint8), "cpu")


class _Crops(torch.utils.data.Dataset):
    """uint8 crops with two columns: a label and a note string."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], 10 + i, f"image {i}"


def test_embed_dataset_equals_embed_images_normalised_and_keeps_the_columns_in_order():
    x = np.random.default_rng(1).integers(0, 256, (7, 112, 112, 3), dtype=np.uint8)
    model = SmallConv()
    ref = V.embed_images(model, x, "cpu", batch_size=3).embeddings
    emb, (labels, notes) = V.embed_dataset(model, _Crops(x), "cpu", batch_size=3, workers=0, progress=False)
    assert emb.dtype == np.float32 and emb.shape == ref.shape
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert np.allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    assert labels.tolist() == list(range(10, 17)) and notes.tolist() == [f"image {i}" for i in range(7)]
    raw, _ = V.embed_dataset(model, _Crops(x), "cpu", batch_size=4, normalize=False, workers=0,
                             progress=False)
    assert np.allclose(raw, ref, atol=1e-5)
    with pytest.raises(VerificationError, match="no images"):
        V.embed_dataset(model, _Crops(x[:0]), "cpu", workers=0, progress=False)
