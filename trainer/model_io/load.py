"""Reading `model.pt`, the backbone alone with what it takes to rebuild it (docs/design.md section 3):

    {"network": "r50", "network_kwargs": {"embedding_size": 512, ...}, "state_dict": {...}, ...}

The trainer writes it (trainer.checkpoint.save_model); evaluation, export and embedding rebuild the
backbone with `load_backbone`. A bare state_dict (insightface's released `model.pt` files) loads too
when the network is named.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from trainer.backbones import build_backbone
from trainer.checkpoint import CheckpointError

# Wrappers that rename parameters: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _plain_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def read_checkpoint(path: str | os.PathLike, network: Optional[str] = None,
                    network_kwargs: Optional[Mapping[str, Any]] = None) -> dict:
    """{"network", "network_kwargs", "state_dict"} of a model.pt, or of a bare state_dict given `network`.
    `network`/`network_kwargs` given here override what the file says."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a loadable torch checkpoint "
                              f"({type(e).__name__}: {first})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a backbone checkpoint")
    if "state_dict" in obj:
        found_network = obj.get("network")
        kwargs = dict(obj.get("network_kwargs") or {})
        state_dict = obj["state_dict"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        found_network, kwargs, state_dict = None, {}, obj
    else:
        raise CheckpointError(f"{path}: has keys {sorted(obj)[:6]}, neither a model.pt nor a state_dict; "
                              "for a training checkpoint use the model.pt the trainer writes beside it")
    if network:
        found_network = network
    if network_kwargs:
        kwargs.update(network_kwargs)
    if not found_network:
        raise CheckpointError(f"{path}: a bare state_dict does not say its network; name it (--network r50)")
    return {"network": found_network, "network_kwargs": kwargs, "state_dict": _plain_state_dict(state_dict)}


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu", network: Optional[str] = None,
                  network_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Rebuild the backbone of a model.pt (through the registry) in eval mode on `device`. Its
    `network` and `network_kwargs` attributes say how it was built."""
    ckpt = read_checkpoint(path, network, network_kwargs)
    try:
        model = build_backbone(ckpt["network"], **ckpt["network_kwargs"])
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: its weights do not fit {ckpt['network']} "
                              f"{ckpt['network_kwargs']}: {' '.join(first[:3])}") from None
    model.network = ckpt["network"]
    model.network_kwargs = ckpt["network_kwargs"]
    return model.to(device).eval()
