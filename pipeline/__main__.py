"""`python -m pipeline pack|merge|verify` (also `facetrain pack|merge|verify`): the offline stage of the data path.
The packed dataset layout and the commands' contracts: docs/design.md, sections 1 and 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli_args import int_at_least, positive_float, share
from .cli_args import part as part_arg
from .help_format import HelpFormatter

SRC_HELP = """\
SRC is one of (several are merged into one dataset):
  - an ImageFolder tree: one sub-folder per identity;
  - a list file: `path<TAB>label` lines, or im2rec's .lst;
  - a flat folder of images, the identity taken from each file name by --label-regex;
  - an existing .rec (with its .idx), or a folder packed before."""


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected N or WxH") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 8:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected N or WxH, each at least 8")
    return dims[0], dims[1]


def _quality(text: str) -> int:
    value = int_at_least(1)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality is 1..100, got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments get one line (the usage is one `--help` away), as every error of these commands."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _data_command(sub, name: str, summary: str, description: str, data_help: str) -> argparse.ArgumentParser:
    """A subcommand on one packed dataset folder (merge, verify)."""
    c = sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)
    c.add_argument("data", type=Path, metavar="DATA", help=data_help)
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    return c


def build_parser(prog: str = "python -m pipeline") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack face images into shuffled RecordIO shards plus a manifest",
                       formatter_class=HelpFormatter,
                       description=f"Pack face images into shuffled RecordIO shards plus a manifest.\n\n"
                                   f"{SRC_HELP}\n\nThe layout of DATA: docs/design.md, section 1.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="input(s); see above")
    p.add_argument("--out", required=True, type=Path, metavar="DATA", help="output folder")
    p.add_argument("--size", type=_size, default="112", help="image size, N or WxH")
    p.add_argument("--quality", type=_quality, default=95, help="JPEG quality, 1..100")
    p.add_argument("--shard-size", type=positive_float, default=1024.0, metavar="MB", help="cut shards at this size")
    p.add_argument("--seed", type=int, default=0, help="shuffle and hold-out seed")
    p.add_argument("--workers", type=int_at_least(1), default=os.cpu_count() or 1,
                   help="encoder processes (default: the CPU count, %(default)s here)")
    p.add_argument("--align", action="store_true",
                   help="detect the face and warp it to the ArcFace 112x112 template (raw photos)")
    p.add_argument("--label-regex", help="identity from a flat folder's file names: the first group "
                                         "(or the group named 'label'), e.g. '^(subject\\d+)\\.'")
    p.add_argument("--list-root", help="folder that relative paths of list files start from")
    p.add_argument("--merge-classes", action="store_true",
                   help="identities of the same name in different sources are one identity")
    p.add_argument("--keep-labels", action="store_true",
                   help="keep the integer labels of list files / .rec sources as class ids")
    p.add_argument("--holdout", type=int_at_least(0), default=0, metavar="K",
                   help="keep K images per identity out of training for verification pairs")
    p.add_argument("--holdout-pairs", type=int_at_least(0), default=0, metavar="N",
                   help="cap the number of pairs (0: no cap)")
    p.add_argument("--val-split", type=share(one=False), default=0.0, metavar="F",
                   help="keep this share of each identity's images (after --holdout; at least 1 where it has "
                        "2 or more, never its last) out of training, in \"val\" shards: a stratified "
                        "validation split (e.g. 0.1)")
    p.add_argument("--resize-mode", default="crop", choices=["crop", "stretch", "pad"],
                   help="how a non-square image meets --size: centre crop, stretch, or pad with black")
    p.add_argument("--attributes", metavar="FILE", help="per-image binary attributes to store in the label "
                                                       "vector: a header 'path<TAB>name...' then 0/1/-1 rows, "
                                                       "or CelebA's list_attr_celeba.txt as it is")
    p.add_argument("--strict", action="store_true", help="fail on the first skipped input")
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset in --out")
    p.add_argument("--part", type=part_arg, default=(0, 1), metavar="K/N",
                   help="pack only the K-th (0-based) of N shares, e.g. one Slurm array task each; "
                        "then run `merge DATA` once")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    _data_command(sub, "merge", "check the parts of a `pack --part K/N` run and write the manifest",
                  "Check the parts of a `pack --part K/N` run and write the one manifest: the same records, "
                  "order and class ids as a single pack of the same input.", "the --out folder of the parts")
    v = _data_command(sub, "verify", "check every frame, index entry, count, label and checksum",
                      "Check every frame, index entry, count, label and checksum of a packed dataset; exit 0 "
                      "when all hold.", "a folder written by pack")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m pipeline") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "pack":
            from .pack import pack
            from .pack_plan import PackOptions

            opts = PackOptions(
                sources=args.sources, out=args.out, size=args.size, quality=args.quality,
                shard_size_mb=args.shard_size, seed=args.seed, workers=args.workers, strict=args.strict,
                align=args.align, label_regex=args.label_regex, list_root=args.list_root,
                merge_classes=args.merge_classes, keep_labels=args.keep_labels, holdout=args.holdout,
                holdout_pairs=args.holdout_pairs, val_split=args.val_split, resize_mode=args.resize_mode, overwrite=args.overwrite,
                attributes=args.attributes, part=args.part,
                progress=not args.no_progress)
            m = pack(opts)
            if "done" in m:  # one part of several: its journal
                k, n = args.part
                print(f"part {k}/{n} done: {sum(e['count'] for e in m['shards'])} images in {len(m['shards'])} "
                      f"shards; when all {n} parts are done: {prog} merge {args.out}")
                return 0
            print(f"packed {m['num_images']} images of {m['num_classes']} identities into "
                  f"{len(m['shards'])} shards in {args.out}; skipped {m['skipped']['count']} "
                  f"(see {args.out / m['skipped']['file']})")
            return 0
        if args.command == "merge":
            from .merge import merge

            m = merge(args.data, progress=not args.no_progress)
            print(f"merged {m['num_images']} images of {m['num_classes']} identities in {len(m['shards'])} "
                  f"shards in {args.data}; skipped {m['skipped']['count']}")
            return 0
        from .verify import verify

        counts = verify(args.data, decode=args.decode, progress=not args.no_progress)
        print(f"ok: {counts['records']} records in {counts['shards']} shards")
        return 0
    except KeyboardInterrupt:
        print("pipeline: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    except Exception as e:
        known = type(e).__name__ in ("PackError", "VerifyError", "ManifestError", "SourceError", "RecordIOError")
        if not known and not isinstance(e, (OSError, ValueError)):
            e = f"{type(e).__name__}: {e}"  # a fault with no name of ours (a bug to report): still one line
        print(f"pipeline {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
