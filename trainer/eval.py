"""`python -m trainer.eval`: compare trained backbones the way the papers do, from the command line.

Verification on pairs (insightface's 10-fold accuracy with the flip test, and TAR at FAR):
    python -m trainer.eval --checkpoint runs/a/model.pt --pairs lfw.bin
    python -m trainer.eval --checkpoint model.pt --pairs pairs.txt --root lfw/ --align
All-to-all 1:1 on a packed, labelled set (every genuine against every impostor pair, MFR challenge), with
maskgen's masked copies as probes against the unmasked gallery (ResSaNet, MFR), per mask type:
    python -m trainer.eval --checkpoint model.pt --data TEST [--masked-probe] [--cmc [--distractors D]]
On pairs, --masked-probe masks the first image of every pair with maskgen (the second stays unmasked).
Identification (--cmc): MegaFace's rank-K protocol as FaceX-Zoo runs it, with a distractor gallery
(a folder, a packed set, or a .npz from `python -m trainer.embed`); without one, each probe's
distractors are the set's images of other identities.
IJB-B / IJB-C template protocols (1:1 TAR@FAR as insightface's eval_ijbc.py, 1:N TPIR@FPIR and CMC) on the
released layout, see trainer/ijb.py: `--ijb ROOT --ijb-set IJBC [--save-features F.npz | --features F.npz]`.
Several checkpoints: one result line each, and `--table out.md` compares them. `--output r.json` writes
all results, with r.roc.png (and r.cmc.png) beside it. The last line printed is one JSON object:
{"pairs", "acc", "std", "tar_at_far": {"1e-6": ..., ...}, ...} (DESIGN.md section 2). A TAR is null
where the set has too few impostor pairs to measure that FAR (fewer than 1 / FAR).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.imageio import ImageRejected, decode_jpeg_rgb
from pipeline.atomic import atomic_write_bytes, atomic_write_json, json_safe
from pipeline.manifest import (ManifestError, decode_identity,
                               load_manifest)
from pipeline.recordio import RecordIOError
from trainer import metrics
from trainer.embed import embed_folder, load_npz
from trainer.ijb import add_ijb_arguments, run_ijb
from trainer.model_io import CheckpointError, load_backbone
from trainer.verification import (IMAGE_SIZE, VerificationError, VerificationSet, embed_batches, embed_images,
                                  load_target, mask_probes, score_pairs)


class EvalError(ValueError):
    """A request this command cannot carry out; the message says why."""


# ------------------------------------------------------------------------------- packed labelled set


@dataclass
class PackedSetInfo:
    """Per embedded record of a packed set (records that did not decode are left out and counted)."""

    identity: np.ndarray  # int64
    masked: np.ndarray  # bool
    mask_type: np.ndarray  # int64, 0 when the dataset has no such field
    ids: np.ndarray  # int64 record id
    source_ids: np.ndarray  # int64 id2: the source photo of a masked copy, 0 otherwise
    skipped: int
    mask_type_names: dict[int, str]  # from maskgen's manifest entry: 1 -> "surgical", ...


class _Records(Dataset):
    """(uint8 crop, identity, masked, mask_type, id, id2, ok) per record of a PackedDataset."""

    def __init__(self, data_dir: str, holdout: bool) -> None:
        from pipeline.dataset import PackedDataset

        self.ds = PackedDataset(data_dir, kinds=("train", "masked"), holdout=holdout, raw=True)
        fields = self.ds.label_fields
        self.masked_at = fields.index("masked") if "masked" in fields else None
        self.type_at = fields.index("mask_type") if "mask_type" in fields else None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        blank = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8)
        try:
            header, payload = self.ds.read_record(i)
            rgb = decode_jpeg_rgb(payload)
        except (ImageRejected, RecordIOError):
            return blank, -1, False, 0, 0, 0, False
        if rgb.shape[:2] != blank.shape[:2]:
            return blank, -1, False, 0, 0, 0, False
        vec = self.ds.label_vector(header)
        identity = int(decode_identity(vec, self.ds.label_fields))
        masked = bool(vec[self.masked_at]) if self.masked_at is not None else False
        mask_type = int(vec[self.type_at]) if self.type_at is not None else 0
        return rgb, identity, masked, mask_type, int(header.id), int(header.id2), True


def _collate(items):
    cols = list(zip(*items))
    return (np.stack(cols[0]),) + tuple(np.asarray(c) for c in cols[1:])


def embed_packed(model: torch.nn.Module, data_dir: str, device: torch.device, batch_size: int, flip: bool,
                 holdout: bool = False, workers: int = 2,
                 progress: bool = True) -> tuple[np.ndarray, PackedSetInfo]:
    """L2-normalised flip-test embeddings of every record of a packed set, and what each record is."""
    records = _Records(data_dir, holdout)
    if len(records) == 0:
        raise EvalError(f"{data_dir}: no records in the {'held-out' if holdout else 'train/masked'} shards")
    loader = DataLoader(records, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    meta: list[tuple] = []

    def batches():
        for crops, *cols in loader:
            meta.append(tuple(cols))
            yield crops

    embs = [e for e, _ in tqdm(embed_batches(model, batches(), device, flip), total=len(loader),
                               desc=f"embed {Path(data_dir).name}", unit="batch", disable=not progress)]
    cols = [np.concatenate(c) for c in zip(*meta)]
    identity, masked, mask_type, ids, id2, ok = cols
    ok = ok.astype(bool)
    emb = metrics.l2_normalize(np.concatenate(embs)[ok])
    names = records.ds.manifest.get("maskgen", {}).get("mask_types", {})
    info = PackedSetInfo(identity[ok].astype(np.int64), masked[ok].astype(bool),
                         mask_type[ok].astype(np.int64), ids[ok].astype(np.int64), id2[ok].astype(np.int64),
                         int((~ok).sum()), {int(k): str(v) for k, v in names.items()})
    return emb, info


# ---------------------------------------------------------------------------------------- protocols


def _subset_summary(res: metrics.AllPairsResult) -> dict[str, Any]:
    return {
        "pairs": res.pairs,
        "genuine": res.n_genuine,
        "impostor": res.n_impostor,
        "acc": res.acc,
        "std": res.std,
        "tar_at_far": {metrics.far_key(f): r.tar for f, r in res.tar_at_far.items()},
        "threshold_at_far": {metrics.far_key(f): r.threshold for f, r in res.tar_at_far.items()},
    }


def _cmc_summary(res: metrics.CMCResult) -> dict[str, Any]:
    return {"rank1": float(res.rates[0]), "cmc": [float(r) for r in res.rates], "cmc_pairs": res.n_pairs,
            "distractors": res.n_distractors}


@dataclass
class Curves:
    roc: dict[str, tuple[np.ndarray, np.ndarray]]
    cmc: dict[str, np.ndarray]


def evaluate_packed(emb: np.ndarray, info: PackedSetInfo, masked_probe: bool, fars: Sequence[float],
                    tile: int, device: torch.device, cmc: bool, max_rank: int,
                    distractors: Optional[np.ndarray], progress: bool) -> tuple[dict[str, dict], Curves]:
    """{subset: summary}: "unmasked" (all-to-all), and with masked probes "masked" (masked probe against
    unmasked gallery, a copy never against its own source photo) and "masked/<mask type>" (maskgen's
    name of the type, or "mask_type=T")."""
    unmasked = ~info.masked
    if unmasked.sum() < 2:
        raise EvalError("the set has fewer than 2 unmasked images")
    g_emb, g_id, g_src = emb[unmasked], info.identity[unmasked], info.ids[unmasked]
    subsets: dict[str, dict] = {}
    curves = Curves({}, {})

    def run(name: str, probe: Optional[np.ndarray]) -> None:
        kw = dict(fars=fars, tile=tile, device=device, progress=progress)
        if probe is None:
            res = metrics.all_pairs_verification(g_emb, g_id, **kw)
        else:
            res = metrics.all_pairs_verification(emb[probe], info.identity[probe], g_emb, g_id,
                                                 probe_groups=info.source_ids[probe], gallery_groups=g_src,
                                                 **kw)
        subsets[name] = _subset_summary(res)
        curves.roc[name] = (res.roc_fpr, res.roc_tpr)
        if cmc:
            d, d_labels = (distractors, None) if distractors is not None else (g_emb, g_id)
            if probe is None:
                c = metrics.megaface_cmc(g_emb, g_id, d, distractor_labels=d_labels, max_rank=max_rank,
                                         device=device, progress=progress)
            else:
                c = metrics.megaface_cmc(emb[probe], info.identity[probe], d, mates=g_emb, mate_labels=g_id,
                                         probe_groups=info.source_ids[probe], mate_groups=g_src,
                                         distractor_labels=d_labels, max_rank=max_rank, device=device,
                                         progress=progress)
            subsets[name].update(_cmc_summary(c))
            curves.cmc[name] = c.rates

    run("unmasked", None)
    if masked_probe:
        if not info.masked.any():
            raise EvalError("--masked-probe: the set has no masked records (add them with "
                            "`maskgen build --data DATA`)")
        run("masked", info.masked)
        for t in np.unique(info.mask_type[info.masked]):
            name = info.mask_type_names.get(int(t), f"mask_type={int(t)}")
            run(f"masked/{name}", info.masked & (info.mask_type == t))
    return subsets, curves


def _load_distractors(spec: str, model: torch.nn.Module, checkpoint: str, device: torch.device,
                      args: argparse.Namespace) -> np.ndarray:
    path = Path(spec)
    if path.suffix == ".npz":
        data = load_npz(path, checkpoint)
        emb = data["embeddings"]
        return emb if bool(data.get("normalized", True)) else metrics.l2_normalize(emb)
    if (path / "manifest.json").is_file():
        emb, _ = embed_packed(model, str(path), device, args.batch_size, not args.no_flip,
                              workers=args.workers, progress=not args.no_progress)
        return emb
    return embed_folder(model, path, device, args.batch_size, not args.no_flip, args.align,
                        workers=args.workers, progress=not args.no_progress).embeddings


# --------------------------------------------------------------------------------------------- output


def _percent(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def results_table(results: Sequence[dict], fars: Sequence[float]) -> str:
    """A markdown table: one row per checkpoint (and subset), accuracy and TAR@FAR in percent."""
    keys = [metrics.far_key(f) for f in fars]
    with_cmc = any("rank1" in r or any("rank1" in s for s in r.get("subsets", {}).values()) for r in results)
    head = ["checkpoint", "set", "pairs", "acc ± std (%)"] + [f"TAR@FAR={k} (%)" for k in keys]
    head += ["rank-1 (%)"] if with_cmc else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in results:
        rows = [(r.get("target", "pairs"), r)] if "subsets" not in r else list(r["subsets"].items())
        for name, s in rows:
            cells = [r["checkpoint"], name, str(s["pairs"]), f"{_percent(s['acc'])} ± {_percent(s['std'])}"]
            cells += [_percent(s["tar_at_far"].get(k)) for k in keys]
            cells += [_percent(s.get("rank1"))] if with_cmc else []
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main


def _parse_fars(text: str) -> tuple[float, ...]:
    try:
        fars = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fars takes comma-separated numbers, not {text!r}") from None
    if not fars or any(not 0 < f < 1 for f in fars):
        raise argparse.ArgumentTypeError("every FAR must lie in (0, 1)")
    return fars


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                    help="model.pt file(s); several are compared")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="insightface .bin pack, or an LFW-style pairs.txt (with --root)")
    src.add_argument("--data", help="packed labelled set (python -m pipeline pack; maskgen build adds masks)")
    ap.add_argument("--root", help="image root of a pairs.txt (default: its folder)")
    ap.add_argument("--holdout", action="store_true", help="--data: use the held-out shards of the pack")
    ap.add_argument("--masked-probe", action="store_true",
                    help="masked probes against the unmasked gallery: with --data, maskgen's masked copies "
                         "(per mask type); with --pairs, the first image of each pair is masked here")
    ap.add_argument("--mask-mode", choices=("2d", "3d", "mixed"), default="mixed",
                    help="--pairs --masked-probe: maskgen's renderer (default mixed)")
    ap.add_argument("--mask-seed", type=int, default=0,
                    help="--pairs --masked-probe: seed of the masks drawn")
    ap.add_argument("--align", action="store_true", help="detect and align faces in raw photos")
    ap.add_argument("--no-flip", action="store_true", help="no flip test (embed each image once)")
    ap.add_argument("--cmc", action="store_true", help="--data: rank-K identification (MegaFace protocol)")
    ap.add_argument("--distractors", help="--cmc distractor gallery: image folder, packed set, or .npz of "
                                          "python -m trainer.embed from the same checkpoint")
    ap.add_argument("--max-rank", type=int, default=10, help="CMC up to this rank (default 10)")
    ap.add_argument("--fars", type=_parse_fars, default=metrics.FARS,
                    help="comma-separated (default 1e-6..1e-1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tile", type=int, default=2048,
                    help="all-to-all scores are computed tile x tile at a time")
    ap.add_argument("--workers", type=int, default=2, help="image decoding processes")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when present)")
    ap.add_argument("--network", help="backbone name, for a bare state_dict checkpoint")
    ap.add_argument("--output", help="write every result here (JSON), with ROC/CMC PNGs beside it")
    ap.add_argument("--table", help="write a markdown table comparing the checkpoints")
    ap.add_argument("--no-progress", action="store_true")
    add_ijb_arguments(ap, src)
    return ap


def _evaluate_pairs(model: torch.nn.Module, target: VerificationSet, args: argparse.Namespace,
                    device: torch.device) -> tuple[dict, Curves]:
    emb = embed_images(model, target.images, device, args.batch_size, not args.no_flip,
                       progress=not args.no_progress, desc=f"embed {target.name}")
    res = score_pairs(emb.embeddings, target.pairs, target.issame, emb.xnorm, args.fars)
    out = {"target": target.name, **res.summary(), "align_failures": target.align_failures}
    if args.masked_probe:
        out.update(masked_probe=True, mask_mode=args.mask_mode, mask_failures=target.mask_failures)
    return out, Curves({target.name: res.roc()}, {})


def run(args: argparse.Namespace) -> list[dict]:
    if args.data is None and (args.cmc or args.holdout):
        raise EvalError("--cmc and --holdout need --data DATA (a packed labelled set)")
    if args.distractors and not args.cmc:
        raise EvalError("--distractors is for --cmc")
    if args.max_rank < 1:
        raise EvalError("--max-rank must be at least 1")
    if args.masked_probe and args.data:
        manifest = load_manifest(args.data)
        if "masked" not in manifest["label_fields"]:
            raise EvalError(f"--masked-probe: {args.data} has no masked records (add them with "
                            "`maskgen build --data DATA`)")
    device = metrics.resolve_device(args.device)
    progress = not args.no_progress
    target = None
    if args.pairs:
        target = load_target(args.pairs, root=args.root, align=args.align, progress=progress)
        if args.masked_probe:
            target = mask_probes(target, args.mask_mode, args.mask_seed, progress)
    results: list[dict] = []
    roc_curves: dict[str, tuple] = {}
    cmc_curves: dict[str, np.ndarray] = {}
    many = len(args.checkpoint) > 1
    for ckpt in args.checkpoint:
        model = load_backbone(ckpt, device, network=args.network)
        head = {"checkpoint": ckpt, "network": model.network, "flip": not args.no_flip}
        if target is not None:
            summary, curves = _evaluate_pairs(model, target, args, device)
            result = {**head, **summary}
        elif args.ijb:
            summary, rocs, cmcs = run_ijb(args, model, device)
            result, curves = {**head, **summary}, Curves(rocs, cmcs)
        else:
            distractors = None
            if args.distractors:
                distractors = _load_distractors(args.distractors, model, ckpt, device, args)
            emb, info = embed_packed(model, args.data, device, args.batch_size, not args.no_flip,
                                     args.holdout, args.workers, progress)
            subsets, curves = evaluate_packed(emb, info, args.masked_probe, args.fars, args.tile, device,
                                              args.cmc, args.max_rank, distractors, progress)
            primary = "masked" if args.masked_probe else "unmasked"
            result = {**head, "data": args.data, "protocol": primary, "images": int(len(emb)),
                      "skipped_records": info.skipped, **subsets[primary], "subsets": subsets}
        for name, c in curves.roc.items():
            roc_curves[f"{Path(ckpt).parent.name}/{Path(ckpt).name} {name}" if many else name] = c
        for name, c in curves.cmc.items():
            cmc_curves[f"{Path(ckpt).parent.name}/{Path(ckpt).name} {name}" if many else name] = c
        result = json_safe(result)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.output:
        from trainer import plots  # matplotlib only when figures are asked for

        out = Path(args.output)
        atomic_write_json(out, {"results": results})
        stem = out.with_suffix("")
        plots.plot_roc(roc_curves, f"{stem}.roc.png", title=f"ROC: {args.pairs or args.data or args.ijb}")
        if cmc_curves:
            plots.plot_cmc(cmc_curves, f"{stem}.cmc.png", title=f"CMC: {args.data or args.ijb}")
    if args.table:
        atomic_write_bytes(args.table, results_table(results, args.fars).encode())
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
