"""`python -m trainer.eval` (or `facetrain eval`): compare trained backbones the way the papers do.

Verification on pairs (insightface's 10-fold accuracy with the flip test, and TAR at FAR):
    python -m trainer.eval --checkpoint runs/a/model.pt --pairs lfw.bin
    python -m trainer.eval --checkpoint model.pt --pairs pairs.txt --root lfw/ --align
All-to-all 1:1 on a packed, labelled set (every genuine against every impostor pair, MFR challenge), with
maskgen's masked copies as probes against the unmasked gallery (ResSaNet, MFR), per mask type:
    python -m trainer.eval --checkpoint model.pt --data TEST [--masked-probe] [--cmc [--distractors D]]
On pairs, --masked-probe masks the first image of every pair with maskgen (the second stays unmasked).
Identification (--cmc): MegaFace's rank-K protocol as FaceX-Zoo runs it, with a distractor gallery
(a folder, a packed set, or a .npz from `python -m trainer.eval.embed`); without one, each probe's
distractors are the set's images of other identities.
IJB-B / IJB-C template protocols (1:1 TAR@FAR as insightface's eval_ijbc.py, 1:N TPIR@FPIR and CMC) on the
released layout, see trainer/eval/ijb.py: `--ijb ROOT --ijb-set IJBC [--save-features F.npz | --features F.npz]`.
Several checkpoints: one result line each, and `--table out.md` compares them. `--output r.json` writes
all results, with r.roc.png (and r.cmc.png) beside it. `--name` names the set in results and tables.

Each result is one JSON line on stdout (the last line is the last result; docs/design.md section 2):
{"target", "pairs", "genuine", "impostor", "acc", "std", "balanced_acc", "majority_acc",
"tar_at_far": {"1e-6": ..., ...}, "headline_far", ...}. A TAR is null where the set has too few impostor
pairs to measure that FAR (fewer than 1 / FAR). The headline, on stderr and first in the table, is TAR at
--headline-far and the balanced accuracy, (TPR + TNR) / 2, with the genuine and impostor counts: on an
imbalanced set (240 genuine against 6,900 impostor pairs) the plain accuracy of always answering
"different person" is already 0.966, shown as `majority_acc` beside `acc`.
Soft-biometric attribute accuracy per attribute (AAFace's Table 1), trainer/eval/attributes.py:
    python -m trainer.eval --checkpoint model.pt --data TEST --holdout --attributes [A,B,...]
Closed-set classification accuracy with the run's own classifier (trainer/eval/closed_set.py):
    python -m trainer.eval --checkpoint runs/x/model.pt --data DATA --holdout --closed-set
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.atomic import atomic_write_bytes, atomic_write_json, json_safe
from pipeline.help_format import HelpFormatter
from pipeline.malloc_limits import fix_mmap_threshold
from pipeline.manifest import ManifestError, load_manifest
from pipeline.recordio import RecordIOError
from trainer.checkpoint import CheckpointError
from trainer.eval.attributes import run_attributes
from trainer.eval.closed_set import run_closed_set
from trainer.eval.common import FARS, EvalError, far_key, resolve_device
from trainer.eval.embedding import embed_images
from trainer.eval.ijb import add_ijb_arguments, run_ijb
from trainer.eval.images import VerificationError
from trainer.eval.packed import Curves, embed_packed, evaluate_packed, load_distractors
from trainer.eval.pairs import score_pairs
from trainer.eval.report import results_table
from trainer.eval.targets import VerificationSet, load_target, mask_probes
from trainer.model_io.load import load_backbone


def _parse_fars(text: str) -> tuple[float, ...]:
    try:
        fars = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fars takes comma-separated numbers, not {text!r}") from None
    if not fars or any(not 0 < f < 1 for f in fars):
        raise argparse.ArgumentTypeError("every FAR must lie in (0, 1)")
    return fars


def _far(text: str) -> float:
    return _parse_fars(text)[0]


def build_parser(prog: str = "python -m trainer.eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                    help="model.pt file(s); several are compared")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="insightface .bin pack, or an LFW-style pairs.txt (with --root)")
    src.add_argument("--data", help="packed labelled set (python -m pipeline pack; maskgen build adds masks)")
    ap.add_argument("--attributes", nargs="?", const="", metavar="A,B",
                    help="--data: accuracy per soft-biometric attribute of a model that predicts them "
                         "(AAFace); names default to those it was trained on (trainer/eval/attributes.py)")
    ap.add_argument("--closed-set", action="store_true",
                    help="--data: closed-set classification accuracy with the run's classifier "
                         "(trainer/eval/closed_set.py)")
    ap.add_argument("--classifier", help="--closed-set: fc_full.pt, a checkpoint or run folder "
                                         "(default: the run folder of the checkpoint)")
    ap.add_argument("--root", help="image root of a pairs.txt (default: its folder)")
    ap.add_argument("--name", help="the set's name in results and tables (default: the file's stem, or for "
                                   "pairs.txt its folder's name; --data: the folder's name)")
    ap.add_argument("--holdout", action="store_true", help="--data: use the held-out shards of the pack")
    ap.add_argument("--val", action="store_true", help="--closed-set: use the validation shards of the pack "
                                                       "(pack --val-split)")
    ap.add_argument("--masked-probe", action="store_true",
                    help="masked probes against the unmasked gallery: with --data, maskgen's masked copies "
                         "(per mask type); with --pairs, the first image of each pair is masked here")
    ap.add_argument("--mask-mode", choices=("2d", "3d", "mixed"), default="mixed",
                    help="--pairs --masked-probe: maskgen's renderer")
    ap.add_argument("--mask-seed", type=int, default=0,
                    help="--pairs --masked-probe: seed of the masks drawn")
    ap.add_argument("--align", action="store_true", help="detect and align faces in raw photos")
    ap.add_argument("--no-flip", action="store_true", help="no flip test (embed each image once)")
    ap.add_argument("--cmc", action="store_true", help="--data: rank-K identification (MegaFace protocol)")
    ap.add_argument("--distractors", help="--cmc distractor gallery: image folder, packed set, or .npz of "
                                          "python -m trainer.eval.embed from the same checkpoint")
    ap.add_argument("--max-rank", type=int, default=10, help="CMC up to this rank")
    ap.add_argument("--fars", type=_parse_fars, default=",".join(far_key(f) for f in FARS),
                    help="the FARs to report TAR at, comma-separated")
    ap.add_argument("--headline-far", type=_far, default="1e-3",
                    help="the FAR of the headline TAR (added to --fars)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    ap.add_argument("--tile", type=int, default=2048,
                    help="all-to-all scores are computed tile x tile at a time")
    ap.add_argument("--workers", type=int, default=2, help="image decoding processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when present)")
    ap.add_argument("--network", help="backbone name, for a bare state_dict checkpoint")
    ap.add_argument("--output", help="write every result here (JSON), with ROC/CMC PNGs beside it")
    ap.add_argument("--table", help="write a markdown table comparing the checkpoints")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ijb_arguments(ap, src)
    return ap


def headline(result: dict, far: float) -> str:
    """One line that an imbalanced set cannot flatter: TAR at the stated FAR and the balanced accuracy,
    with the counts of genuine and impostor pairs; the plain accuracy after its majority baseline."""
    def pct(x) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    key = far_key(far)
    name = result.get("target") or result.get("set", "")
    tar = result["tar_at_far"].get(key)
    tar_text = pct(tar)
    if tar is None and result["genuine"] and result["impostor"]:
        tar_text = f"n/a (needs {int(round(1 / far))} impostor pairs)"
    parts = [f"TAR@FAR={key} {tar_text}"]
    if "balanced_acc" in result:  # (IJB's protocol reports TARs only)
        parts.append(f"balanced acc {pct(result['balanced_acc'])}")
    line = f"{name}: {', '.join(parts)} on {result['genuine']} genuine / {result['impostor']} impostor pairs"
    if result.get("acc") is not None:
        line += f" (acc {pct(result['acc'])}; always the commoner answer: {pct(result.get('majority_acc'))})"
    return line


def _evaluate_pairs(model: torch.nn.Module, target: VerificationSet, args: argparse.Namespace,
                    device: torch.device) -> tuple[dict, Curves]:
    emb = embed_images(model, target.images, device, args.batch_size, not args.no_flip,
                       progress=not args.no_progress, desc=f"embed {target.name}")
    res = score_pairs(emb.embeddings, target.pairs, target.issame, emb.xnorm, args.fars)
    out = {"target": target.name, **res.summary(), "align_failures": target.align_failures}
    if args.masked_probe:
        out.update(masked_probe=True, mask_mode=args.mask_mode, mask_failures=target.mask_failures)
    return out, Curves({target.name: res.roc()}, {})


def _evaluate_packed(model: torch.nn.Module, ckpt: str, args: argparse.Namespace,
                     device: torch.device) -> tuple[dict, Curves]:
    progress = not args.no_progress
    distractors = None
    if args.distractors:
        distractors = load_distractors(args.distractors, model, ckpt, device, args.batch_size,
                                       not args.no_flip, args.align, args.workers, progress)
    emb, info = embed_packed(model, args.data, device, args.batch_size, not args.no_flip,
                             args.holdout, args.workers, progress)
    subsets, curves = evaluate_packed(emb, info, args.masked_probe, args.fars, args.tile, device,
                                      args.cmc, args.max_rank, distractors, progress)
    primary = "masked" if args.masked_probe else "unmasked"
    name = args.name or Path(args.data).resolve().name
    return {"target": name, "data": args.data, "protocol": primary, "images": int(len(emb)),
            "skipped_records": info.skipped, **subsets[primary], "subsets": subsets}, curves


def run(args: argparse.Namespace) -> list[dict]:
    if args.attributes is not None:
        return run_attributes(args)
    if args.closed_set:
        return run_closed_set(args)
    if args.val:
        raise EvalError("--val is for --closed-set")
    if args.data is None and (args.cmc or args.holdout):
        raise EvalError("--cmc and --holdout need --data DATA (a packed labelled set)")
    if args.distractors and not args.cmc:
        raise EvalError("--distractors is for --cmc")
    if args.max_rank < 1:
        raise EvalError("--max-rank must be at least 1")
    args.fars = tuple(sorted(set(args.fars) | {args.headline_far}))
    if args.masked_probe and args.data:
        manifest = load_manifest(args.data)
        if "masked" not in manifest["label_fields"]:
            raise EvalError(f"--masked-probe: {args.data} has no masked records (add them with "
                            "`maskgen build --data DATA`)")
    device = resolve_device(args.device)
    progress = not args.no_progress
    target = None
    if args.pairs:
        target = load_target(args.pairs, root=args.root, align=args.align, name=args.name, progress=progress)
        if args.masked_probe:
            target = mask_probes(target, args.mask_mode, args.mask_seed, progress)
    results: list[dict] = []
    roc_curves: dict[str, tuple] = {}
    cmc_curves: dict[str, np.ndarray] = {}
    many = len(args.checkpoint) > 1
    for ckpt in args.checkpoint:
        model = load_backbone(ckpt, device, network=args.network)
        head = {"checkpoint": ckpt, "network": model.network, "flip": not args.no_flip}
        # One function per protocol, each returning (the result's own keys, its curves).
        if target is not None:
            summary, curves = _evaluate_pairs(model, target, args, device)
        elif args.ijb:
            summary, rocs, cmcs = run_ijb(args, model, device)
            curves = Curves(rocs, cmcs)
        else:
            summary, curves = _evaluate_packed(model, ckpt, args, device)
        result = {**head, **summary}
        for name, c in curves.roc.items():
            roc_curves[f"{Path(ckpt).parent.name}/{Path(ckpt).name} {name}" if many else name] = c
        for name, c in curves.cmc.items():
            cmc_curves[f"{Path(ckpt).parent.name}/{Path(ckpt).name} {name}" if many else name] = c
        result = json_safe({**result, "headline_far": far_key(args.headline_far)})
        results.append(result)
        print(headline(result, args.headline_far), file=sys.stderr, flush=True)
        print(json.dumps(result), flush=True)
    if args.output:
        from trainer.eval import plots  # matplotlib only when figures are asked for

        out = Path(args.output)
        atomic_write_json(out, {"results": results})
        stem = out.with_suffix("")
        plots.plot_roc(roc_curves, f"{stem}.roc.png", title=f"ROC: {args.pairs or args.data or args.ijb}")
        if cmc_curves:
            plots.plot_cmc(cmc_curves, f"{stem}.cmc.png", title=f"CMC: {args.data or args.ijb}")
    if args.table:
        atomic_write_bytes(args.table, results_table(results, args.fars, args.headline_far).encode())
    return results


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m trainer.eval") -> int:
    args = build_parser(prog).parse_args(argv)
    # Tiles of scores (16-32 MB each) are made and freed thousands of times: with glibc's sliding mmap
    # threshold they came from the heap, which grew with the number of tiles (issue N).
    fix_mmap_threshold()
    try:
        results = run(args)
    except (EvalError, VerificationError, CheckpointError, ManifestError, RecordIOError, OSError,
            FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(results) > 1 and args.table:
        print(f"table: {args.table}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
