"""The embeddings of every image of a folder, and the `.npz` files that hold them (written by
`python -m trainer.eval.embed`, read back by `python -m trainer.eval --distractors faces.npz`)."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.atomic import atomic_write_with
from pipeline.manifest import sha256_file
from trainer.eval.embedding import embed_dataset
from trainer.eval.images import IMAGE_EXTENSIONS, IMAGE_SIZE, VerificationError, face_crop, read_image_file
from trainer.eval.rowfile import release


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


# Rows of an array written to a .npz member at a time (16 MB of 512-d float32 rows).
_WRITE_ROWS = 8192


def _write_npy(out, arr: np.ndarray) -> None:
    """`arr` as a .npy stream, a block of rows at a time: a file-backed array is never read whole, and
    its pages are let go after each block."""
    if arr.ndim == 0 or arr.dtype.hasobject:
        np.lib.format.write_array(out, arr, allow_pickle=False)
        return
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    np.lib.format.write_array_header_2_0(out, header)
    for a in range(0, len(arr), _WRITE_ROWS):
        out.write(np.ascontiguousarray(arr[a:a + _WRITE_ROWS]).tobytes())
        release(arr)


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """What np.savez writes (uncompressed members), streamed into a temporary file put in place atomically
    (pipeline/atomic.py): never a half-written .npz, nor the whole file in memory."""
    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, arr in arrays.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    _write_npy(member, np.asanyarray(arr))

    atomic_write_with(path, write)


def _mapped_member(path: str | os.PathLike, name: str) -> Optional[np.memmap]:
    """A read-only memmap of member `name` of a .npz when it is stored uncompressed in C order (what
    save_npz writes), else None."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        try:
            info = z.getinfo(f"{name}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
            int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject or len(shape) == 0 or 0 in shape:
            return None
        return np.memmap(path, dtype, "r", offset=f.tell(), shape=shape)


def load_npz(path: str | os.PathLike, checkpoint: Optional[str | os.PathLike] = None,
             map_embeddings: bool = False) -> dict[str, np.ndarray]:
    """An embedding file written by this command; with `checkpoint`, it must come from that model. With
    `map_embeddings`, `embeddings` is a read-only memmap of the file where it is stored uncompressed
    (read a block of rows at a time, trainer/eval/rowfile.py), not an array in RAM."""
    try:
        mapped = _mapped_member(path, "embeddings") if map_embeddings else None
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files if not (mapped is not None and k == "embeddings")}
        if mapped is not None:
            data["embeddings"] = mapped
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise VerificationError(f"{path}: not an embedding .npz ({e})") from None
    if "embeddings" not in data:
        raise VerificationError(f"{path}: has no 'embeddings' array")
    if checkpoint is not None and str(data.get("checkpoint_sha256", "")) != sha256_file(checkpoint):
        raise VerificationError(f"{path}: its embeddings come from another checkpoint than {checkpoint}; "
                                "embed the images again with this one")
    return data
