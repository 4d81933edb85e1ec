"""`init_weights = "path"`: start a run's backbone from trained weights (fine-tuning, AAFace's backbone).

The path may be one of our model.pt files, a training checkpoint folder (or a run folder: its last
checkpoint, else its model.pt), or a bare state dict such as insightface's released IResNet `backbone.pth`
(our IResNet's parameter names are insightface's, so those load 1:1). DDP / torch.compile prefixes are
dropped. A model whose weights are not all in the file may name a part of itself that they initialise:
`init_weights_target()` -> (module, prefixes of the file's keys that part has no place for), e.g. AAFace's
backbone, which has no IResNet embedding layer. Anything else that does not fit is a CheckpointError naming
the missing, unexpected and mis-shaped keys. A resumed run then overwrites these weights with its own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from trainer import checkpoint as ckpt
from trainer.checkpoint import CheckpointError
from trainer.model_io.load import _plain_state_dict, read_checkpoint

_SHOWN = 5  # key names listed per kind of mismatch


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone state dict that `path` holds (see the module docstring for what `path` may be)."""
    p = Path(path)
    if p.is_dir():
        found = ckpt.find_checkpoint(p)
        if found is not None:
            p = found / ckpt.TRAIN_STATE
        elif (p / ckpt.MODEL_FILE).is_file():
            p = p / ckpt.MODEL_FILE
        else:
            raise CheckpointError(f"init_weights {path}: no checkpoint and no {ckpt.MODEL_FILE} in this "
                                  "folder")
    if p.name == ckpt.TRAIN_STATE:
        # Our own training checkpoint (it also holds the optimizer and config: not weights-only).
        saved = torch.load(p, map_location="cpu", weights_only=False)
        return _plain_state_dict(saved["backbone"])
    # model.pt or a bare state dict; the network name is not needed to read the weights.
    return read_checkpoint(p, network="(init_weights)")["state_dict"]


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def check_fit(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming every kind of mismatch between `state` and `module`'s state dict."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} (file {_shape(state[k])}, model {_shape(own[k])})" for k in own
                  if k in state and _shape(state[k]) != _shape(own[k])]
    problems = [f"{name} {_listed(keys)}" for name, keys in
                (("missing:", missing), ("unexpected:", unexpected), ("shape mismatch:", mis_shaped)) if keys]
    if problems:
        raise CheckpointError(f"init_weights {source} does not fit the {type(module).__name__}: "
                              + "; ".join(problems))


def load_init_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load `path`'s weights into `model` (or the part its `init_weights_target` names); a one-line
    report of what was loaded."""
    state = read_weights(path)
    target, dropped = model, []
    if hasattr(model, "init_weights_target") and not set(model.state_dict()) <= set(state):
        target, unused_prefixes = model.init_weights_target()
        dropped = [k for k in state if k.startswith(tuple(unused_prefixes))]
        state = {k: v for k, v in state.items() if k not in set(dropped)}
    check_fit(target, state, str(path))
    target.load_state_dict(state, strict=True)
    report = f"init_weights: {len(state)} tensors from {path} into the {type(target).__name__}"
    parts = ", ".join(sorted({k.split(".")[0] for k in dropped}))
    if dropped:
        report += f" (left out the {len(dropped)} of {parts}: it has no place for them)"
    return report
