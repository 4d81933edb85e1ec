"""`python -m trainer.model_io.export` (or `facetrain export`): a trained backbone as ONNX (dynamic
batch), TorchScript, or the bare state dict insightface's tools load; each is checked against PyTorch
before it is put in place.

    python -m trainer.model_io.export --checkpoint runs/x/model.pt [--format onnx,torchscript,insightface]
    python -m trainer.model_io.export --checkpoint model.pt --onnx m.onnx --insightface backbone.pth

Formats, written beside the checkpoint unless a path is given (a path alone picks its format):
  onnx         model.onnx; input `data` (--input-name): float32 [batch, 3, 112, 112] RGB,
               (pixel - 127.5) / 127.5; output `embedding`: [batch, D], not normalised. Its metadata names
               the network and the preprocessing. `data` is the input name of arcface_torch's ONNX files
               (and of the MXNet models before them), so scripts written for those feed this one as it is.
  torchscript  model.torchscript.pt, traced; the same input and output.
  insightface  backbone.pth: a plain state_dict under arcface_torch's names, as it saves its backbones,
               to load with `get_model(name).load_state_dict(torch.load("backbone.pth"))`; for the
               networks it shares (IResNet, MobileFaceNet, the face ViTs: `python -m
               trainer.model_io.convert`, which does the renaming, lists them).
A file whose outputs differ from PyTorch's by more than --atol is not written (exit status 1). The files
get ordinary permissions (0666 less the umask: 0644 under umask 022). model.pt: docs/design.md section 3.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.atomic import atomic_path, atomic_write_with
from pipeline.help_format import HelpFormatter
from trainer.checkpoint import CheckpointError
from trainer.eval.images import IMAGE_SIZE
from trainer.model_io.convert import ConvertError
from trainer.model_io.load import load_backbone

INPUT_NAME = "data"  # arcface_torch's torch2onnx name
OUTPUT_NAME = "embedding"
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "insightface": "backbone.pth"}
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


@contextlib.contextmanager
def _quiet_trace() -> Iterator[None]:
    """Silence the warnings of a trace that say nothing to the user: the backbones' eager input-size
    checks become constants, which is the export's contract (fixed 112x112, only the batch axis varies).
    Every other warning still shows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript-based exporter is deprecated; the torch.export one needs onnxscript, not installed.
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 17, atol: float = 1e-4,
                check_batches: Sequence[int] = (1, 5), input_name: str = INPUT_NAME) -> float:
    """Write ONNX with a dynamic batch axis; returns onnxruntime's largest deviation from PyTorch over
    the `check_batches` sizes (ExportError, and no file, above `atol`)."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    model = model.eval().cpu()
    with atomic_path(path) as tmp:
        with _quiet_trace(), torch.no_grad():
            torch.onnx.export(model, (_example(2),), str(tmp), dynamo=False, input_names=[input_name],
                              output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
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
        return _check("ONNX", lambda x: session.run([OUTPUT_NAME], {input_name: x.numpy()})[0], model, path,
                      atol, check_batches)


def export_torchscript(model: nn.Module, path: str | os.PathLike, atol: float = 1e-4,
                       check_batches: Sequence[int] = (1, 5)) -> float:
    """Write a traced TorchScript module; returns its largest deviation from the eager model."""
    path = Path(path)
    model = model.eval().cpu()
    with atomic_path(path) as tmp:
        with _quiet_trace(), torch.no_grad():
            traced = torch.jit.trace(model, _example(2), check_trace=False)  # checked below
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp))
        return _check("TorchScript", lambda x: loaded(x).numpy(), model, path, atol, check_batches)


def export_backbone_pth(model: nn.Module, path: str | os.PathLike) -> int:
    """Write arcface_torch's backbone.pth of `model` (built by load_backbone): its state_dict under
    arcface_torch's names, through trainer.model_io.convert (ConvertError for a network without an
    arcface_torch counterpart). Returns the number of tensors written."""
    from trainer.model_io.convert import to_insightface_state_dict

    state = to_insightface_state_dict(model.network, model.network_kwargs, model.state_dict())
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_with(path, lambda f: torch.save(state, f))
    return len(state)


def _formats(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--format takes a comma list of {', '.join(FORMATS)}; got {text!r}")
    return names


def build_parser(prog: str = "python -m trainer.model_io.export") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt (or a bare state_dict with --network)")
    ap.add_argument("--format", type=_formats, metavar="LIST",
                    help="comma list of onnx, torchscript, insightface, each written beside the checkpoint "
                         "(default: onnx,torchscript, or only the formats given a path below)")
    ap.add_argument("--onnx", metavar="PATH", help="ONNX output path")
    ap.add_argument("--torchscript", metavar="PATH", help="TorchScript output path")
    ap.add_argument("--insightface", metavar="PATH", help="plain state_dict output path (backbone.pth)")
    ap.add_argument("--input-name", default=INPUT_NAME, help="the ONNX input's name")
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    ap.add_argument("--atol", type=float, default=1e-4, help="largest output difference accepted")
    ap.add_argument("--network", help="backbone name, for a bare state_dict")
    return ap


def output_paths(ckpt: Path, formats: Optional[Sequence[str]], given: dict[str, Optional[str]]) -> dict[str, Path]:
    """{format: path}: the paths given, and the formats asked for beside the checkpoint."""
    if formats is None:
        formats = [f for f, p in given.items() if p] or ["onnx", "torchscript"]
    out = {}
    for f in FORMATS:
        if given.get(f):
            out[f] = Path(given[f])
        elif f in formats:
            suffix = FORMATS[f]
            out[f] = ckpt.with_name(suffix) if not suffix.startswith(".") else ckpt.with_suffix(suffix)
    return out


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m trainer.model_io.export") -> int:
    args = build_parser(prog).parse_args(argv)
    ckpt = Path(args.checkpoint)
    paths = output_paths(ckpt, args.format, {"onnx": args.onnx, "torchscript": args.torchscript,
                                             "insightface": args.insightface})
    result: dict = {"checkpoint": str(ckpt)}
    try:
        model = load_backbone(ckpt, "cpu", network=args.network)
        result["network"] = model.network
        if "onnx" in paths:
            result["onnx"] = str(paths["onnx"])
            result["onnx_input"] = args.input_name
            result["onnx_max_abs_diff"] = export_onnx(model, paths["onnx"], args.opset, args.atol,
                                                      input_name=args.input_name)
        if "torchscript" in paths:
            result["torchscript"] = str(paths["torchscript"])
            result["torchscript_max_abs_diff"] = export_torchscript(model, paths["torchscript"], args.atol)
        if "insightface" in paths:
            result["insightface"] = str(paths["insightface"])
            result["insightface_tensors"] = export_backbone_pth(model, paths["insightface"])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ExportError, ConvertError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
