"""The plain recipe (insightface's): backbone -> Partial FC -> a margin head. Also the interface every
training mode follows, so that trainer/main.py runs any of them the same way:

    mode = build_mode(cfg)                      # checks the mode's config keys
    loader = ...                                # the mode's reader (trainer.main.build_loader)
    mode.bind_data(loader)                      # checks what the mode needs of the data
    backbone = build_backbone(cfg.network, **..., **mode.network_kwargs())
    head = mode.build_head(backbone, num_classes, world_size)   # Partial FC, or the mode's own module
    per step:  stage = mode.begin_step(backbone, head, epoch)   # a new stage: log it, re-wrap DDP
               loss, parts = mode.loss(ddp_backbone, head, batch)
               mode.end_step(backbone, head)                    # after the optimizer stepped
    per log line: mode.log_fields(head)
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from trainer.config import Config, ConfigError
from trainer.heads import build_margin_loss
from trainer.step import partial_fc_loss

# The mode's config keys and defaults (trainer/config.py adds them when this mode is selected).
CONFIG = {
    # The margin head (trainer/heads registry): "combined" is insightface's margin_list = (m1, m2, m3):
    # (1.0, 0.5, 0.0) is ArcFace, (1.0, 0.0, 0.4) CosFace, with scale s.
    "loss": "combined",
    "margin_list": (1.0, 0.5, 0.0),
    "scale": 64.0,
    "interclass_filtering_threshold": 0.0,
    "loss_kwargs": {},  # extra arguments for the head (a head other than "combined" takes only these)
    "sample_rate": 1.0,  # Partial FC's share of negative classes sampled per step (1.0: all)
    # The cross-entropy weighted by inverse class frequency (trainer/class_weights.py), as torch's
    # F.cross_entropy(weight=...); "linear" (loss) with it is the CrossScan hybrid's classifier.
    "class_weighted_ce": False,
}


class StandardMode:
    """Partial FC with the margin head `cfg.loss` (sample_rate, margin_list, scale, loss_kwargs)."""

    name = "standard"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if not 0.0 < cfg.sample_rate <= 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {cfg.sample_rate}")
        if len(cfg.margin_list) != 3:
            raise ConfigError(f"margin_list is (m1, m2, m3), got {cfg.margin_list!r}")

    def bind_data(self, loader) -> None:
        """Checks what the mode needs of the data (the loader is built)."""

    def network_kwargs(self) -> dict:
        """Backbone constructor arguments the mode adds to `network_kwargs`."""
        return {}

    def build_head(self, backbone: nn.Module, num_classes: int, world_size: int) -> nn.Module:
        from trainer.partial_fc import PartialFC

        cfg = self.cfg
        # DDP averages the backbone's gradients over ranks; scaling the embeddings' gradient by the world
        # size makes that average the gradient of the global mean loss, whatever the number of ranks.
        head = build_margin_loss(cfg, num_classes)
        if getattr(head, "needs_raw_logits", False) and cfg.sample_rate < 1.0:
            raise ConfigError(f"loss {cfg.loss!r} (a classifier on raw logits) needs sample_rate 1, got "
                              f"{cfg.sample_rate}")
        class_weight = None
        if cfg.class_weighted_ce:
            from trainer.class_weights import class_counts, inverse_frequency_weights

            class_weight = inverse_frequency_weights(class_counts(cfg.data))
        return PartialFC(head, cfg.embedding_size, num_classes, sample_rate=cfg.sample_rate,
                         embedding_grad_scale=float(world_size), seed=cfg.seed, class_weight=class_weight)

    def begin_step(self, backbone: nn.Module, head: nn.Module, epoch: float) -> Optional[str]:
        """Sets up the step at `epoch` (fractional); returns the stage name when it changed, else None."""
        return None

    def loss(self, model: nn.Module, head: nn.Module, batch: Sequence[torch.Tensor]
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(loss of one micro batch, parts to log) with `model` the (maybe DDP-wrapped) backbone."""
        return partial_fc_loss(model, head, batch)

    def end_step(self, backbone: nn.Module, head: nn.Module) -> None:
        """After an optimizer step that was taken (not after a skipped one)."""

    def log_fields(self, head: nn.Module) -> dict:
        """Extra fields of a metrics.jsonl line."""
        return {}


__all__ = ["CONFIG", "StandardMode"]
