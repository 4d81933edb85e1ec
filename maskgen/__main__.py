"""`maskgen`: masked copies of face images for masked-face recognition training.

    maskgen build --ratio 0.05 --data DATA [--mode 2d|3d|mixed] [--seed N]
    maskgen build --ratio 0.05 --data DATA --part K/N     (N processes, anywhere), then
    maskgen build --data DATA --merge                      (once: the parts' masks into the dataset)
    maskgen preview --data DATA -n 64 --out sheet.png
    maskgen preview --images DIR -n 32 --out sheet.png [--mode 3d] [--types surgical]
    maskgen folder SRC --out DST [--mode mixed] [--seed N]

`maskgen COMMAND --help` shows each command's options and defaults. The packed dataset it adds to, and
the masked records' labels: docs/design.md section 1.
"""
from __future__ import annotations

import os

# One BLAS thread per process: the spline's small solves are slower with threads fighting over the
# cores the worker processes already use. Set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("GLOG_minloglevel", "2")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from pipeline.cli_args import part as part_arg  # noqa: E402
from pipeline.cli_args import positive_float, share  # noqa: E402
from pipeline.help_format import HelpFormatter  # noqa: E402

from .masker import MODE_CHOICES, NOSE_COVERED  # noqa: E402
from .shapes import MASK_TYPES  # noqa: E402


def _types(text: str) -> tuple[str, ...]:
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in types if t not in MASK_TYPES]
    if bad or not types:
        raise argparse.ArgumentTypeError(f"mask types are a comma list of {', '.join(MASK_TYPES)}; got {text!r}")
    return types


def _mask_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="mixed", choices=MODE_CHOICES,
                   help="2d: thin-plate warp to the landmark outline; 3d: rendered on the face mesh; "
                        "mixed: drawn per image")
    p.add_argument("--types", type=_types, default=MASK_TYPES, metavar="LIST",
                   help=f"mask types to draw from (default: {','.join(MASK_TYPES)})")
    p.add_argument("--nose-covered", type=share(), default=NOSE_COVERED, metavar="P",
                   help="share of masks over the nose bridge; the rest sit below the nose")
    p.add_argument("--crops", choices=("aligned", "any"), default="aligned",
                   help="aligned: ArcFace-aligned crops, a face FaceMesh misses gets the mean mesh "
                        "on the template (recorded as a fallback); any: such images are skipped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskgen", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    workers = os.cpu_count() or 1

    b = sub.add_parser("build", help="add masked copies of a share of a packed dataset's images",
                       formatter_class=HelpFormatter,
                       description="Adds masked copies (same identity, masked=1, the source's id in id2) as "
                                   "new 'masked' shards; a re-run replaces them.")
    b.add_argument("--data", required=True, type=Path, metavar="DATA", help="a packed dataset folder")
    b.add_argument("--ratio", type=share(zero=False, what="the ratio"), default=0.05, help="share of images to mask, per identity")
    b.add_argument("--seed", type=int, default=0, help="seed of the images picked and the masks drawn")
    _mask_options(b)
    b.add_argument("--workers", type=int, default=workers, help="processes (default: the CPU count, %(default)s here)")
    b.add_argument("--shard-size", type=positive_float, default=1024.0, metavar="MB", help="cut shards at this size")
    b.add_argument("--part", type=part_arg, default=(0, 1), metavar="K/N",
                   help="mask only the K-th (0-based) of N shares of the chosen images (no manifest change); "
                        "then `maskgen build --data DATA --merge` once")
    b.add_argument("--merge", action="store_true",
                   help="take the finished parts into the dataset (their settings are the parts' own)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("preview", help="contact sheet of original | masked pairs", formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a dataset `maskgen build` has run on")
    src.add_argument("--images", type=Path, help="a folder of face images to mask now")
    p.add_argument("-n", type=int, default=64, help="pairs to show")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--cols", type=int, default=4, help="pairs per row")
    p.add_argument("--seed", type=int, default=0, help="seed of the images picked and the masks drawn")
    _mask_options(p)

    f = sub.add_parser("folder", help="mask every image under a folder into a mirror tree",
                       formatter_class=HelpFormatter)
    f.add_argument("src", type=Path, metavar="SRC", help="a folder of face images (searched recursively)")
    f.add_argument("--out", required=True, type=Path, metavar="DST", help="the mirror tree of masked copies")
    f.add_argument("--seed", type=int, default=0, help="seed of the masks drawn")
    _mask_options(f)
    f.add_argument("--workers", type=int, default=workers, help="processes (default: the CPU count, %(default)s here)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            from .build import BuildError, BuildOptions, build

            if args.merge and args.part != (0, 1):
                print("maskgen build: --merge and --part are separate runs", file=sys.stderr)
                return 2
            try:
                m = build(BuildOptions(data=args.data, ratio=args.ratio, mode=args.mode, seed=args.seed,
                                       types=args.types, nose_covered=args.nose_covered,
                                       aligned=args.crops == "aligned", workers=max(1, args.workers),
                                       shard_size_mb=args.shard_size, progress=not args.no_progress),
                          part=args.part, merge=args.merge)
            except BuildError as e:
                print(f"maskgen build: {e}", file=sys.stderr)
                return 1
            if "done" in m:
                k, n = args.part
                print(f"maskgen part {k}/{n}: masked {m['written']} images ({sum(m['skipped'].values())} skipped); "
                      f"when all {n} parts are done: maskgen build --data {args.data} --merge")
                return 0
            info = m["maskgen"]
            print(f"masked {info['count']} of {m['num_images'] - info['count']} images "
                  f"({info['fallbacks']} on template-fitted landmarks, {sum(info['skipped'].values())} skipped) "
                  f"into {sum(1 for s in m['shards'] if s.get('kind') == 'masked')} shards in {args.data}")
            return 0
        if args.command == "preview":
            from .preview import contact_sheet, dataset_pairs, image_pairs, write_sheet

            if args.n < 1:
                print("maskgen preview: -n must be at least 1", file=sys.stderr)
                return 1
            if args.data is not None:
                pairs = dataset_pairs(args.data, args.n, args.seed)
            else:
                from .folder import list_images

                files = list_images(args.images)
                if not files:
                    print(f"maskgen preview: no images under {args.images}", file=sys.stderr)
                    return 1
                import numpy as np

                pick = np.random.default_rng(args.seed).choice(len(files), size=min(args.n, len(files)),
                                                               replace=False)
                pairs = image_pairs([files[i] for i in sorted(pick)], args.seed, args.mode, args.types,
                                    args.crops == "aligned")
            write_sheet(contact_sheet(pairs, max(1, args.cols)), args.out)
            print(f"wrote {args.out} ({len(pairs)} pairs)")
            return 0
        from .folder import FolderOptions, mask_folder

        counts = mask_folder(FolderOptions(src=args.src, out=args.out, mode=args.mode, seed=args.seed,
                                           types=args.types, nose_covered=args.nose_covered,
                                           aligned=args.crops == "aligned", workers=max(1, args.workers),
                                           progress=not args.no_progress))
        print(f"masked {counts['masked']} of {counts['images']} images into {args.out} "
              f"({counts['fallbacks']} fallbacks, {counts['skipped']} skipped)")
        return 0
    except KeyboardInterrupt:
        print("maskgen: interrupted; the dataset is as it was", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError) as e:
        print(f"maskgen {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
