"""Training modes of the papers, beside the plain `backbone -> Partial FC -> margin head` recipe.

- `lvface`: LVFace's two-stage curriculum. `build_lvface_partial_fc(...)` replaces `PartialFC(...)`;
  before each step `LVFaceCurriculum(switch_epoch, ncs_sample_rate).apply(partial_fc, step / steps_per_epoch)`
  sets negative sub-sampling (stage "ncs") or the class-mean-stabilised centres with sampling off ("epl").
- `aaface`: AAFace. The backbone "aaface" (trainer/backbones/aaface.py: FR + soft-biometric branches fused
  by the AAI module); the loader yields label vectors (`return_label_vectors=True`);
  `AAFaceSchedule(fr_epochs, sb_epochs).apply(backbone, epoch)` sets the stage (re-wrap DDP when it returns True); a step's loss is
  `AAFaceObjective(attributes, loader.label_fields)(ddp_backbone, partial_fc, images, labels, vectors)`.
- `sst`: Semi-Siamese Training for shallow data. No Partial FC: `IdentityPairLoader` gives
  `(images1, images2, ids)`, `SemiSiameseTraining(backbone, ...)` gives the loss of a step, and
  `momentum_update(backbone)` follows each optimizer step.

The trainer runs each through the interface of `trainer.modes.standard` (`config.mode` picks one; its
module's `CONFIG` declares its config keys and defaults): `StandardMode` is the plain recipe, `LVFaceMode`, `AAFaceMode` and
`SSTMode` are the papers' glue.
"""
from __future__ import annotations

import copy
import importlib
from typing import Optional

# mode name -> (module, class); imported on demand
MODES = {"standard": ("trainer.modes.standard", "StandardMode"),
         "lvface": ("trainer.modes.lvface", "LVFaceMode"),
         "aaface": ("trainer.modes.aaface", "AAFaceMode"),
         "sst": ("trainer.modes.sst", "SSTMode")}


class UnknownModeError(ValueError):
    """`config.mode` names no mode (trainer.config turns it into a ConfigError)."""


def _module(mode: str):
    if mode not in MODES:
        raise UnknownModeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return importlib.import_module(MODES[mode][0])


def mode_config(mode: str) -> dict:
    """The config keys and defaults that `mode` adds to the base config (its module's CONFIG)."""
    return copy.deepcopy(_module(mode).CONFIG)


def mode_of_key(key: str) -> Optional[str]:
    """The first mode that declares config key `key`, or None."""
    return next((mode for mode in MODES if key in _module(mode).CONFIG), None)


def build_mode(cfg):
    """The mode `cfg.mode` names, its config keys checked (a ConfigError says what is wrong)."""
    return getattr(_module(cfg.mode), MODES[cfg.mode][1])(cfg)
