"""`python -m trainer.model_io.export`: a trained backbone as ONNX (dynamic batch) and TorchScript, each
checked against PyTorch before it is put in place.

    python -m trainer.model_io.export --checkpoint runs/x/model.pt [--onnx m.onnx] [--torchscript m.ts.pt]

Without --onnx/--torchscript both are written beside the checkpoint. Input `input`: float32
[batch, 3, 112, 112] RGB, (pixel - 127.5) / 127.5; output `embedding`: [batch, D], not normalised. The
ONNX file's metadata names the network and the preprocessing. A file whose outputs differ from PyTorch's
by more than --atol is not written (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.atomic import atomic_path
from trainer.checkpoint import CheckpointError
from trainer.eval.images import IMAGE_SIZE
from trainer.model_io.load import load_backbone

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
PREPROCESSING = "RGB, float32 NCHW, (pixel - 127.5) / 127.5"


class ExportError(RuntimeError):
    """An exported model does not reproduce PyTorch's outputs."""


def _example(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, IMAGE_SIZE[1], IMAGE_SIZE[0], generator=g) * 2 - 1


def _check(what: str, run: Callable[[torch.Tensor], np.ndarray], model: nn.Module, path: Path, atol: float,
           check_batches: Sequence[int]) -> float:
    """Raise unless `run` (the exported file, loaded back) gives the eager model's outputs within `atol` on
    every batch size of `check_batches`; returns the largest deviation."""
    worst = 0.0
    for batch in check_batches:
        x = _example(batch, seed=batch)
        with torch.no_grad():
            want, got = model(x).numpy(), run(x)
        if got.shape != want.shape:
            raise ExportError(f"{what} output {got.shape} for batch {batch}, PyTorch gives {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > atol:
        raise ExportError(f"{what} differs from PyTorch by {worst:.3g} > {atol:g}; {path} not written")
    return worst


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 17, atol: float = 1e-4,
                check_batches: Sequence[int] = (1, 5)) -> float:
    """Write ONNX with a dynamic batch axis; returns onnxruntime's largest deviation from PyTorch over
    the `check_batches` sizes (ExportError, and no file, above `atol`)."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    model = model.eval().cpu()
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter: the torch.export-based one needs onnxscript, not installed.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (_example(2),), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        meta = {"network": getattr(model, "network", type(model).__name__),
                "network_kwargs": json.dumps(getattr(model, "network_kwargs", {}), default=str),
                "preprocessing": PREPROCESSING}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        return _check("ONNX", lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0], model, path,
                      atol, check_batches)


def export_torchscript(model: nn.Module, path: str | os.PathLike, atol: float = 1e-4,
                       check_batches: Sequence[int] = (1, 5)) -> float:
    """Write a traced TorchScript module; returns its largest deviation from the eager model."""
    path = Path(path)
    model = model.eval().cpu()
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(model, _example(2), check_trace=False)  # checked below
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp))
        return _check("TorchScript", lambda x: loaded(x).numpy(), model, path, atol, check_batches)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.model_io.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt (or a bare state_dict with --network)")
    ap.add_argument("--onnx", help="ONNX output path")
    ap.add_argument("--torchscript", help="TorchScript output path")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--atol", type=float, default=1e-4, help="largest output difference accepted")
    ap.add_argument("--network", help="backbone name, for a bare state_dict")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint)
    onnx_path, ts_path = args.onnx, args.torchscript
    if onnx_path is None and ts_path is None:
        onnx_path, ts_path = ckpt.with_suffix(".onnx"), ckpt.with_suffix(".torchscript.pt")
    result: dict = {"checkpoint": str(ckpt)}
    try:
        model = load_backbone(ckpt, "cpu", network=args.network)
        result["network"] = model.network
        if onnx_path is not None:
            result["onnx"] = str(onnx_path)
            result["onnx_max_abs_diff"] = export_onnx(model, onnx_path, args.opset, args.atol)
        if ts_path is not None:
            result["torchscript"] = str(ts_path)
            result["torchscript_max_abs_diff"] = export_torchscript(model, ts_path, args.atol)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
