"""Closed-set classification accuracy (the CrossScan hybrid paper's ACC): every record of a packed set whose
identities are the classes a run was trained on (its `--holdout` shards, say) gets the class of the
classifier row nearest to its embedding (the highest cosine: Partial FC's logit before any margin), and
is right when that is its identity. A run with the linear head (`loss="linear"`, trainer/heads/linear.py)
saves a per-class bias beside the rows: its records get the class of the highest W x + b on the raw
embedding instead (with the flip test, x is the mean of the two views' embeddings).

    python -m trainer.eval --checkpoint runs/x/model.pt --data DATA --holdout --closed-set [--classifier C]

(`--val` instead of `--holdout`: the validation split of `pack --val-split`, what early stopping watched.)

The classifier is the run's Partial FC (`fc_full.pt`): of `--classifier` (the file, a checkpoint folder or a
run folder), else of the last checkpoint of the run folder model.pt is in. Reported: "acc" over the
records, and "balanced_acc", the mean of the per-class accuracies (what a class-weighted loss aims at).
Masked copies (maskgen) are left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.atomic import atomic_write_json, json_safe
from trainer import checkpoint as ckpt
from trainer.eval.common import EvalError, l2_normalize, packed_set_only, resolve_device


def closed_set_accuracy(embeddings: np.ndarray, identity: np.ndarray, weight: np.ndarray,
                        bias: Optional[np.ndarray] = None) -> dict:
    """Nearest-row (cosine) classification of `embeddings` [N, D] among the rows of `weight` [C, D]; with
    `bias` [C], the linear classifier's: the class of the highest `weight @ x + bias`."""
    identity = np.asarray(identity, np.int64)
    if len(identity) == 0:
        raise EvalError("no records to classify")
    if identity.min() < 0 or identity.max() >= len(weight):
        raise EvalError(f"identities {identity.min()}..{identity.max()} are not all among the classifier's "
                        f"{len(weight)} classes (a set packed with the training data's classes is needed)")
    if bias is None:
        predicted = np.argmax(l2_normalize(embeddings) @ l2_normalize(weight).T, axis=1)
    else:
        predicted = np.argmax(embeddings @ weight.T + bias, axis=1)
    right = predicted == identity
    classes = np.unique(identity)
    per_class = [float(right[identity == c].mean()) for c in classes]
    return {"acc": float(right.mean()), "balanced_acc": float(np.mean(per_class)), "n": int(len(identity)),
            "classes": int(len(classes))}


def embedded_closed_set_accuracy(model: torch.nn.Module, weight: np.ndarray, bias: Optional[np.ndarray],
                                 data_dir: str, device: torch.device, batch_size: int, holdout: bool = False,
                                 val: bool = False, flip: bool = True, workers: int = 2,
                                 progress: bool = False) -> dict:
    """`closed_set_accuracy` of `model`'s embeddings of a packed set's records (masked copies left out):
    its training shards, or with `holdout` / `val` its held-out / validation shards."""
    from trainer.eval.packed import embed_packed

    emb, info = embed_packed(model, data_dir, device, batch_size, flip, holdout, workers, progress, val=val,
                             normalize=False)
    if flip:
        emb = emb / 2  # the sum of the two views: their mean is on the scale a linear classifier knows
    if emb.shape[1] != weight.shape[1]:
        raise EvalError(f"the model gives {emb.shape[1]}-d embeddings, the classifier has {weight.shape[1]}-d rows")
    keep = ~info.masked
    return {"skipped_records": info.skipped, **closed_set_accuracy(emb[keep], info.identity[keep], weight, bias)}


def load_classifier(model_path: str, classifier: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The class rows [C, D] of a run's Partial FC and the linear head's bias [C] (None for another head);
    the module docstring says where they are looked for."""
    source = Path(classifier) if classifier else Path(model_path).parent
    path = source
    if not source.is_file():
        found = ckpt.find_checkpoint(source)
        if found is None:
            raise EvalError(f"no checkpoint with a classifier in {source}: name it with --classifier "
                            f"(its {ckpt.FC_FULL}, a checkpoint folder or a run folder)")
        path = found / ckpt.FC_FULL
    saved = torch.load(path, map_location="cpu", weights_only=False)
    fc = saved.get("fc") if isinstance(saved, dict) else None
    if not fc or "weight" not in fc:
        raise EvalError(f"{path} holds no Partial FC classifier (a run of a mode without one?)")
    head = (saved.get("head") or {}).get("state") or {}
    bias = head["bias"].float().numpy() if "bias" in head else None
    return fc["weight"].float().numpy(), bias


def run_closed_set(args: argparse.Namespace) -> list[dict]:
    """`python -m trainer.eval --closed-set`: one result per checkpoint, printed as a JSON line."""
    from trainer.model_io.load import load_backbone

    packed_set_only(args, "--closed-set", "a packed set of the training data's identities")
    if args.holdout and args.val:
        raise EvalError("--closed-set reads the --holdout or the --val shards, not both")
    device = resolve_device(args.device)
    results = []
    for path in args.checkpoint:
        weight, bias = load_classifier(path, args.classifier)
        model = load_backbone(path, device, network=args.network)
        try:
            scores = embedded_closed_set_accuracy(model, weight, bias, args.data, device, args.batch_size,
                                                  args.holdout, val=args.val, flip=not args.no_flip,
                                                  workers=args.workers,
                                                  progress=not args.no_progress)
        except EvalError as e:
            raise EvalError(f"{path}: {e}") from None
        result = json_safe({"checkpoint": path, "network": model.network, "data": args.data,
                            "holdout": bool(args.holdout), "val": bool(args.val), "flip": not args.no_flip,
                            **scores})
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.output:
        atomic_write_json(Path(args.output), {"results": results})
    return results


__all__ = ["closed_set_accuracy", "embedded_closed_set_accuracy", "load_classifier", "run_closed_set"]
