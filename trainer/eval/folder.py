"""The embeddings of every image of a folder, and the `.npz` files that hold them (written by
`python -m trainer.eval.embed`, read back by `python -m trainer.eval --distractors faces.npz`)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.atomic import atomic_write_bytes
from pipeline.manifest import sha256_file
from trainer.eval.embedding import embed_dataset
from trainer.eval.images import IMAGE_EXTENSIONS, IMAGE_SIZE, VerificationError, face_crop, read_image_file


def _walk_files(root: Path) -> list[str]:
    """Relative paths of the files under `root`, symlinked folders followed (each real folder once, so a
    link back up the tree ends there)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if (Path(folder) / f).is_file()]
    return found


def list_images(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files under `root` (sorted relative paths; symlinked files and folders followed), their
    labels and the class names: the label of an image is its top-level sub-folder's index, -1 for files
    in `root` itself."""
    root = Path(root)
    if not root.is_dir():
        raise VerificationError(f"{root}: not a folder")
    paths = sorted(p for p in _walk_files(root) if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
    classes = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[p.split("/", 1)[0]] if "/" in p else -1 for p in paths], dtype=np.int64)
    return paths, labels, classes


class _FolderImages(Dataset):
    """(crop uint8 [112, 112, 3], reason it is unusable or "") per image; decoded in loader workers."""

    def __init__(self, root: Path, paths: Sequence[str], align: bool) -> None:
        self.root, self.paths, self.align = root, paths, align

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        blank = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8)
        try:
            rgb = read_image_file(self.root / self.paths[i])
        except VerificationError as e:
            return blank, str(e).rsplit(": ", 1)[-1]
        if not self.align and rgb.shape[:2] != (IMAGE_SIZE[1], IMAGE_SIZE[0]):
            return blank, f"{rgb.shape[1]}x{rgb.shape[0]}, not an aligned face (use --align)"
        crop, failed = face_crop(rgb, self.align)
        return (blank, "no face found") if failed else (crop, "")


@dataclass
class FolderEmbeddings:
    embeddings: np.ndarray
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    skipped: list[str]  # "path\treason"


def embed_folder(model: torch.nn.Module, root: str | os.PathLike, device: str | torch.device,
                 batch_size: int = 64, flip: bool = True, align: bool = False, normalize: bool = True,
                 workers: int = 2, progress: bool = True) -> FolderEmbeddings:
    """Embed every image under `root`; unreadable or (with `align`) faceless images are left out and
    listed in `skipped`. VerificationError when none is left."""
    root = Path(root)
    paths, labels, classes = list_images(root)
    if not paths:
        raise VerificationError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    emb, (reasons,) = embed_dataset(model, _FolderImages(root, paths, align), device, batch_size, flip,
                                    normalize, workers, progress, desc=f"embed {root.name}",
                                    keep=lambda c: c[0] == "")
    keep = reasons == ""
    skipped = [f"{p}\t{r}" for p, r in zip(paths, reasons) if r]
    if not keep.any():
        first = skipped[0].replace("\t", ": ")
        raise VerificationError(f"{root}: none of its {len(paths)} images could be used (e.g. {first})")
    kept_paths = [p for p, k in zip(paths, keep) if k]
    return FolderEmbeddings(emb, kept_paths, labels[keep], classes, skipped)


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """np.savez written atomically (pipeline.manifest's write-fsync-rename): never a half-written .npz."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike,
             checkpoint: Optional[str | os.PathLike] = None) -> dict[str, np.ndarray]:
    """An embedding file written by this command; with `checkpoint`, it must come from that model."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise VerificationError(f"{path}: not an embedding .npz ({e})") from None
    if "embeddings" not in data:
        raise VerificationError(f"{path}: has no 'embeddings' array")
    if checkpoint is not None and str(data.get("checkpoint_sha256", "")) != sha256_file(checkpoint):
        raise VerificationError(f"{path}: its embeddings come from another checkpoint than {checkpoint}; "
                                "embed the images again with this one")
    return data
