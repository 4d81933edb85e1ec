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
from trainer.eval.common import EvalError, l2_normalize, narrow_ints, packed_set_only, resolve_device
from trainer.eval.rowfile import release

# Records are classified a block at a time against a chunk of the classes at a time: no score matrix over
# every record (or every class) is held, whatever the set or the classifier.
_BLOCK_ROWS = 1024
_BLOCK_SCORES = 1 << 22  # float32 scores held at once (16 MB)


def _predict(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    """The class of the highest score of each row of `x` (the first of equal ones), classes a chunk at a
    time. `weight` is already L2-normalised for the cosine rule (bias None)."""
    if bias is None:
        x = l2_normalize(x)
    chunk = max(1, _BLOCK_SCORES // max(len(x), 1))
    best = np.full(len(x), -np.inf)
    predicted = np.zeros(len(x), np.int64)
    for c in range(0, len(weight), chunk):
        scores = x @ weight[c:c + chunk].T
        if bias is not None:
            scores = scores + bias[c:c + chunk]
        top = np.argmax(scores, axis=1)
        top_score = scores[np.arange(len(x)), top]
        better = top_score > best
        best[better], predicted[better] = top_score[better], top[better] + c
    return predicted


def closed_set_accuracy(embeddings: np.ndarray, identity: np.ndarray, weight: np.ndarray,
                        bias: Optional[np.ndarray] = None, *, rows: Optional[np.ndarray] = None,
                        scale: float = 1.0) -> dict:
    """Nearest-row (cosine) classification of `embeddings` [N, D] among the rows of `weight` [C, D]; with
    `bias` [C], the linear classifier's: the class of the highest `weight @ (scale * x) + bias`. `rows`:
    the rows of `embeddings` to classify (default all; `identity` is given per row taken). `embeddings`
    may be a file-backed memmap of any size: it is read a block of rows at a time, never copied whole."""
    identity = narrow_ints(identity)
    if len(identity) == 0:
        raise EvalError("no records to classify")
    if identity.min() < 0 or identity.max() >= len(weight):
        raise EvalError(f"identities {identity.min()}..{identity.max()} are not all among the classifier's "
                        f"{len(weight)} classes (a set packed with the training data's classes is needed)")
    if len(identity) != (len(embeddings) if rows is None else len(rows)):
        raise EvalError("one identity per record to classify is needed")
    if bias is None:
        weight = l2_normalize(weight)
    right = np.empty(len(identity), bool)
    for a in range(0, len(identity), _BLOCK_ROWS):
        b = min(a + _BLOCK_ROWS, len(identity))
        x = np.array(embeddings[a:b] if rows is None else np.take(embeddings, rows[a:b], axis=0))
        release(embeddings)
        if scale != 1.0:
            x *= scale
        right[a:b] = _predict(x, weight, bias) == identity[a:b]
    counts = np.bincount(identity)
    classes = np.flatnonzero(counts)
    per_class = np.bincount(identity, weights=right)[classes] / counts[classes]
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
    if emb.shape[1] != weight.shape[1]:
        raise EvalError(f"the model gives {emb.shape[1]}-d embeddings, the classifier has {weight.shape[1]}-d rows")
    keep = ~info.masked
    rows = None if keep.all() else narrow_ints(np.flatnonzero(keep))
    identity = info.identity if rows is None else info.identity[rows]
    # With the flip test the rows are the sum of the two views: their mean (scale 1/2) is on the scale a
    # linear classifier knows.
    scores = closed_set_accuracy(emb, identity, weight, bias, rows=rows, scale=0.5 if flip else 1.0)
    return {"skipped_records": info.skipped, **scores}


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
