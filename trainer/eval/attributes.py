"""Soft-biometric attribute accuracy per attribute (AAFace's Table 1) of a model with attribute outputs:
`python -m trainer.eval --checkpoint model.pt --data DATA --holdout --attributes [NAME,NAME...]`.

Each record's attribute is predicted present when its logit is above 0 (probability above 0.5) and compared
with the label in the record's label vector (`label_fields` names the columns; `pipeline pack --attributes`
stores them); records whose label is unknown (-1 or NaN) are left out of that attribute's count. Without
names, the attributes are those the model was trained on (`aaface_attributes` of the config in model.pt).
One JSON line per checkpoint: {"attributes": {name: {"acc", "n", "positive_rate"}}, "mean_acc", ...}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.atomic import atomic_write_json, json_safe
from pipeline.imageio import ImageRejected, decode_jpeg_rgb
from pipeline.recordio import RecordIOError
from trainer.eval.common import EvalError, packed_set_only, resolve_device
from trainer.eval.embedding import to_input
from trainer.eval.images import IMAGE_SIZE


def attribute_accuracy(logits: np.ndarray, targets: np.ndarray, names: Sequence[str]) -> dict:
    """Per-attribute accuracy of `logits` [N, A] (> 0: present) against 0/1 `targets` [N, A] (negative or
    NaN: unknown, not counted)."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    if logits.shape != targets.shape or logits.shape[1] != len(names):
        raise EvalError(f"{logits.shape[1]} attribute outputs, {targets.shape[1]} labels, {len(names)} names")
    known = np.isfinite(targets) & (targets >= 0)
    out = {}
    for j, name in enumerate(names):
        k = known[:, j]
        n = int(k.sum())
        correct = (logits[k, j] > 0) == (targets[k, j] > 0.5)
        out[name] = {"acc": float(correct.mean()) if n else None, "n": n,
                     "positive_rate": float((targets[k, j] > 0.5).mean()) if n else None}
    accs = [v["acc"] for v in out.values() if v["acc"] is not None]
    return {"attributes": out, "mean_acc": float(np.mean(accs)) if accs else None}


class _AttributeRecords(Dataset):
    """(uint8 crop, the chosen label columns, ok) per record of a packed set's train or held-out shards."""

    def __init__(self, data_dir: str, names: Sequence[str], holdout: bool) -> None:
        from pipeline.dataset import PackedDataset

        self.ds = PackedDataset(data_dir, kinds=("train",), holdout=holdout, raw=True)
        missing = [n for n in names if n not in self.ds.label_fields]
        if missing:
            raise EvalError(f"{data_dir}: attributes {missing} are not in its label_fields "
                            f"{self.ds.label_fields} (pack them with `pipeline pack --attributes FILE`)")
        self.columns = [self.ds.label_fields.index(n) for n in names]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        blank = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8)
        unknown = np.full(len(self.columns), np.nan, np.float32)
        try:
            header, payload = self.ds.read_record(i)
            rgb = decode_jpeg_rgb(payload)
        except (ImageRejected, RecordIOError):
            return blank, unknown, False
        if rgb.shape != blank.shape:
            return blank, unknown, False
        return rgb, self.ds.label_vector(header)[self.columns], True


def predict_attributes(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 64,
                       workers: int = 2, progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """(logits [N, A], labels [N, A], records that did not decode) of `model(x, with_attributes=True)`."""
    if not hasattr(model, "num_attributes"):
        raise EvalError(f"{type(model).__name__} has no attribute outputs (a model of mode aaface has)")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    logits, labels, skipped = [], [], 0
    model.eval()
    with torch.inference_mode():
        for crops, vectors, ok in tqdm(loader, desc="attributes", unit="batch", disable=not progress):
            out = model(to_input(crops.numpy(), device), with_attributes=True)[1]
            if out is None:
                raise EvalError(f"the model is in stage {getattr(model, 'stage', '?')!r}, which has no "
                                "attribute outputs")
            keep = ok.numpy().astype(bool)
            logits.append(out.float().cpu().numpy()[keep])
            labels.append(vectors.numpy()[keep])
            skipped += int((~keep).sum())
    if not logits:
        raise EvalError("no records to evaluate")
    return np.concatenate(logits), np.concatenate(labels), skipped


def trained_attribute_names(checkpoint: str) -> list[str]:
    """The attributes a model.pt's run trained (`aaface_attributes` of the config saved in it)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    names = (saved.get("config") or {}).get("aaface_attributes") if isinstance(saved, dict) else None
    if not names:
        raise EvalError(f"{checkpoint} does not say which attributes it predicts: name them "
                        "(--attributes A,B)")
    return list(names)


def run_attributes(args: argparse.Namespace) -> list[dict]:
    """`python -m trainer.eval --attributes`: one result per checkpoint, printed as a JSON line."""
    from trainer.model_io.load import load_backbone

    packed_set_only(args, "--attributes", "a packed set with attribute label fields")
    device = resolve_device(args.device)
    results = []
    for ckpt in args.checkpoint:
        names = [n.strip() for n in args.attributes.split(",") if n.strip()] or trained_attribute_names(ckpt)
        model = load_backbone(ckpt, device, network=args.network)
        if getattr(model, "num_attributes", len(names)) != len(names):
            raise EvalError(f"{ckpt} predicts {model.num_attributes} attributes, {len(names)} named: {names}")
        records = _AttributeRecords(args.data, names, args.holdout)
        logits, labels, skipped = predict_attributes(model, records, device, args.batch_size, args.workers,
                                                     not args.no_progress)
        result = json_safe({"checkpoint": ckpt, "network": model.network, "data": args.data,
                            "holdout": bool(args.holdout), "images": int(len(logits)),
                            "skipped_records": skipped,
                            **attribute_accuracy(logits, labels, names)})
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.output:
        atomic_write_json(Path(args.output), {"results": results})
    return results


__all__ = ["attribute_accuracy", "predict_attributes", "trained_attribute_names", "run_attributes"]
