"""`python -m trainer.embed`: the embeddings of every image of a folder, to a `.npz` file.

    python -m trainer.embed --checkpoint runs/x/model.pt --images faces/ --out faces.npz [--align]

The file holds `embeddings` (float32 [N, D], L2-normalised unless --no-normalize, flip test unless
--no-flip), `paths` (relative to the folder, in the same order), `labels` (the index of each image's
top-level sub-folder in `classes`, -1 for images directly in the folder), `skipped` ("path<TAB>reason" of
images that could not be used), and what made them: `network`, `checkpoint_sha256`, `flip`, `normalized`.
`python -m trainer.eval --distractors faces.npz` reads it back (and checks the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.atomic import atomic_write_bytes
from pipeline.manifest import sha256_file
from trainer import metrics
from trainer.model_io import CheckpointError, load_backbone
from trainer.verification import (IMAGE_EXTENSIONS, IMAGE_SIZE, VerificationError, embed_batches, face_crop,
                                  read_image_file)


def list_images(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files under `root` (sorted relative paths), their labels and the class names: the label of
    an image is its top-level sub-folder's index, -1 for files in `root` itself."""
    root = Path(root)
    if not root.is_dir():
        raise VerificationError(f"{root}: not a folder")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
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


def _collate(items):
    return np.stack([c for c, _ in items]), [r for _, r in items]


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
    listed in `skipped`."""
    root = Path(root)
    paths, labels, classes = list_images(root)
    if not paths:
        raise VerificationError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    loader = DataLoader(_FolderImages(root, paths, align), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    reasons: list[str] = []

    def batches():
        for crops, why in loader:
            reasons.extend(why)
            yield crops

    embs = [e for e, _ in tqdm(embed_batches(model, batches(), device, flip), total=len(loader),
                               desc=f"embed {root.name}", unit="batch", disable=not progress)]
    emb = np.concatenate(embs)
    keep = np.array([r == "" for r in reasons])
    skipped = [f"{p}\t{r}" for p, r in zip(paths, reasons) if r]
    emb = emb[keep]
    if normalize:
        emb = metrics.l2_normalize(emb)
    kept_paths = [p for p, k in zip(paths, keep) if k]
    return FolderEmbeddings(emb.astype(np.float32), kept_paths, labels[keep], classes, skipped)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.embed", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt (or a bare state_dict with --network)")
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--align", action="store_true", help="detect and align faces (raw photos)")
    ap.add_argument("--no-flip", action="store_true", help="embed the image only, not also its mirror")
    ap.add_argument("--no-normalize", action="store_true", help="keep the raw embedding norms")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="image decoding processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when present)")
    ap.add_argument("--network", help="backbone name, for a bare state_dict")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    device = metrics.resolve_device(args.device)
    try:
        model = load_backbone(args.checkpoint, device, network=args.network)
        out = embed_folder(model, args.images, device, args.batch_size, not args.no_flip, args.align,
                           not args.no_normalize, args.workers, not args.no_progress)
        save_npz(args.out, embeddings=out.embeddings, paths=np.array(out.paths, dtype=str),
                 labels=out.labels, classes=np.array(out.classes, dtype=str),
                 skipped=np.array(out.skipped, dtype=str), network=np.array(model.network),
                 checkpoint_sha256=np.array(sha256_file(args.checkpoint)), flip=np.array(not args.no_flip),
                 normalized=np.array(not args.no_normalize))
    except (CheckpointError, VerificationError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out.skipped:
        print(f"warning: {len(out.skipped)} images left out (listed in the file's 'skipped'), e.g. "
              f"{out.skipped[0]!r}", file=sys.stderr)
    print(json.dumps({"out": str(args.out), "images": len(out.paths), "dim": int(out.embeddings.shape[1]),
                      "skipped": len(out.skipped), "network": model.network}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
