"""`python -m trainer.eval.embed`: the embeddings of every image of a folder, to a `.npz` file.

    python -m trainer.eval.embed --checkpoint runs/x/model.pt --images faces/ --out faces.npz [--align]
    facetrain embed ...                                              (the same command)

The file holds `embeddings` (float32 [N, D], L2-normalised unless --no-normalize, flip test unless
--no-flip), `paths` (relative to the folder, in the same order), `labels` (the index of each image's
top-level sub-folder in `classes`, -1 for images directly in the folder), `skipped` ("path<TAB>reason" of
images that could not be used), and what made them: `network`, `checkpoint_sha256`, `flip`, `normalized`.
`python -m trainer.eval --distractors faces.npz` reads it back (and checks the checkpoint). Symlinked files
and folders are followed. Exit status 2, and no file, when no image at all could be used.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from pipeline.help_format import HelpFormatter
from pipeline.manifest import sha256_file
from trainer.checkpoint import CheckpointError
from trainer.eval.common import resolve_device
from trainer.eval.folder import embed_folder, save_npz
from trainer.eval.images import VerificationError
from trainer.model_io.load import load_backbone


def build_parser(prog: str = "python -m trainer.eval.embed") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt (or a bare state_dict with --network)")
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--align", action="store_true", help="detect and align faces (raw photos)")
    ap.add_argument("--no-flip", action="store_true", help="embed the image only, not also its mirror")
    ap.add_argument("--no-normalize", action="store_true", help="keep the raw embedding norms")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    ap.add_argument("--workers", type=int, default=2, help="image decoding processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when present)")
    ap.add_argument("--network", help="backbone name, for a bare state_dict")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m trainer.eval.embed") -> int:
    args = build_parser(prog).parse_args(argv)
    device = resolve_device(args.device)
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
