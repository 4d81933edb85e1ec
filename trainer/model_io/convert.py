"""`python -m trainer.model_io.convert`: backbone weights between this trainer and insightface's arcface_torch.

    python -m trainer.model_io.convert to-insightface SRC OUT.pt
        SRC: a model.pt, a run folder (OUTPUT) or a checkpoint folder (OUTPUT/checkpoints/step_...).
        OUT.pt: a bare state dict that arcface_torch's `get_model(name).load_state_dict` takes.
    python -m trainer.model_io.convert from-insightface THEIRS.pt OUT_model.pt --network vit_b_dp005_mask_005
        THEIRS.pt: arcface_torch's backbone state dict; --network: its network name (or ours).
        OUT_model.pt: our model.pt (trainer.model_io.load.load_backbone, eval, export take it).

Which networks have a counterpart: IResNet r18-r200 and MobileFaceNet mbf / mbf_large keep insightface's
module names already (their weights map 1:1); the face ViTs keep them too since the rename in
trainer/backbones/vit.py, except insightface's ever-present mask token (see `vit.to_insightface`).
Every other backbone of ours has no arcface_torch counterpart and is refused. Both directions load the
weights into the network with strict key and shape checks before anything is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from pipeline.atomic import atomic_write_with
from trainer import checkpoint as ckpt
from trainer.backbones import build_backbone
from trainer.backbones.iresnet import IRESNET_UNITS, IResNet
from trainer.backbones.mobilefacenet import MobileFaceNet
from trainer.backbones.vit import FaceViT
from trainer.backbones.vit import to_insightface as vit_to_insightface
from trainer.checkpoint import CheckpointError
from trainer.model_io.load import read_checkpoint

# arcface_torch's get_model names -> (our network, its constructor arguments)
_VIT_DP005 = {"drop_path_rate": 0.05}
INSIGHTFACE_NETWORKS: dict[str, Tuple[str, dict]] = {
    **{name: (name, {}) for name in IRESNET_UNITS},
    "mbf": ("mbf", {}),
    "mbf_large": ("mbf_large", {}),
    "vit_t": ("vit_t", {}),
    "vit_t_dp005_mask0": ("vit_t", {**_VIT_DP005, "mask_ratio": 0.0}),
    "vit_s": ("vit_s", {}),
    "vit_s_dp005_mask_0": ("vit_s", {**_VIT_DP005, "mask_ratio": 0.0}),
    "vit_b": ("vit_b", {}),
    "vit_b_dp005_mask_005": ("vit_b", {**_VIT_DP005, "mask_ratio": 0.05}),
    "vit_l_dp005_mask_005": ("vit_l", {}),
}


class ConvertError(ValueError):
    """The weights or the network named cannot be converted."""


def _on_meta(network: str, kwargs: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(network, **kwargs)


def _check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict keys and shapes, without allocating the network (assign=True onto the meta device)."""
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:3])
        raise ConvertError(f"{what}: {first}") from None


def to_insightface_state_dict(network: str, network_kwargs: Mapping[str, Any],
                              state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our backbone's weights under arcface_torch's names for the same architecture."""
    model = _on_meta(network, network_kwargs)
    _check_fits(model, state_dict, f"weights of {network}")
    if isinstance(model, FaceViT):
        return vit_to_insightface(state_dict, model.embed_dim)
    if isinstance(model, (IResNet, MobileFaceNet)):
        return dict(state_dict)
    raise ConvertError(f"network {network!r} ({type(model).__name__}) has no arcface_torch counterpart; "
                       f"convertible: {', '.join(sorted(INSIGHTFACE_NETWORKS))}")


def resolve_network(name: str) -> Tuple[str, dict]:
    """arcface_torch's network name (or one of ours that it shares) -> our name and kwargs."""
    if name not in INSIGHTFACE_NETWORKS:
        raise ConvertError(f"no arcface_torch network {name!r}; known: {', '.join(sorted(INSIGHTFACE_NETWORKS))}")
    network, kwargs = INSIGHTFACE_NETWORKS[name]
    return network, dict(kwargs)


def read_ours(src: str | Path) -> dict:
    """{"network", "network_kwargs", "state_dict"} of a model.pt, a run folder or a checkpoint folder."""
    src = Path(src)
    if src.is_file() and src.name != ckpt.TRAIN_STATE:
        return read_checkpoint(src)
    folder = ckpt.find_checkpoint(src) if not src.is_file() else src.parent
    if folder is None or not (folder / ckpt.TRAIN_STATE).is_file():
        raise CheckpointError(f"{src}: neither a model.pt nor a run or checkpoint folder with {ckpt.TRAIN_STATE}")
    state = torch.load(folder / ckpt.TRAIN_STATE, map_location="cpu", weights_only=False)
    return {"network": state["network"], "network_kwargs": dict(state["network_kwargs"]),
            "state_dict": state["backbone"]}


def export_insightface(src: str | Path, out: str | Path) -> dict[str, torch.Tensor]:
    ours = read_ours(src)
    converted = to_insightface_state_dict(ours["network"], ours["network_kwargs"], ours["state_dict"])
    converted = {k: v.detach().cpu().contiguous() for k, v in converted.items()}
    atomic_write_with(out, lambda f: torch.save(converted, f))
    return converted


def import_insightface(src: str | Path, out: str | Path, network: str,
                       network_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """arcface_torch backbone weights -> our model.pt; returns the loaded backbone (eval mode)."""
    ours, kwargs = resolve_network(network)
    kwargs.update(network_kwargs or {})
    theirs = read_checkpoint(src, network=ours, network_kwargs=kwargs)
    try:
        model = build_backbone(ours, **kwargs)
    except TypeError as e:
        raise ConvertError(f"{src}: {ours} does not take {kwargs}: {e}") from None
    try:
        model.load_state_dict(theirs["state_dict"], strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:3])
        raise ConvertError(f"{src}: its weights do not fit {ours} {kwargs} (arcface_torch {network!r}): "
                           f"{first}") from None
    ckpt.save_model(out, model, ours, kwargs, {"converted_from": {"insightface_network": network,
                                                                  "file": str(src)}})
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.model_io.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("to-insightface", help="our model.pt / checkpoint -> arcface_torch state dict")
    exp.add_argument("src", help="model.pt, run folder or checkpoint folder")
    exp.add_argument("out", help="output .pt (a bare state dict)")
    imp = sub.add_parser("from-insightface", help="arcface_torch state dict -> our model.pt")
    imp.add_argument("src", help="arcface_torch backbone .pt (a state dict)")
    imp.add_argument("out", help="output model.pt")
    imp.add_argument("--network", required=True,
                     help=f"arcface_torch's network name: {', '.join(sorted(INSIGHTFACE_NETWORKS))}")
    imp.add_argument("--embedding-size", type=int, default=512, help="arcface_torch's num_features (512)")
    imp.add_argument("--network-kwargs", default="{}", help="more constructor arguments, a JSON object")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-insightface":
            converted = export_insightface(args.src, args.out)
            print(f"wrote {args.out}: {len(converted)} tensors in arcface_torch's names")
        else:
            extra = json.loads(args.network_kwargs)
            if not isinstance(extra, dict):
                raise ConvertError(f"--network-kwargs must be a JSON object, got {args.network_kwargs!r}")
            import_insightface(args.src, args.out, args.network, {"embedding_size": args.embedding_size, **extra})
            print(f"wrote {args.out}: {args.network} as our {resolve_network(args.network)[0]}")
    except (ConvertError, CheckpointError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
