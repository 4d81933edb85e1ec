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


def build_margin_loss(cfg: Config, num_classes: int) -> nn.Module:
    """`loss = "combined"`: insightface's (m1, m2, m3) margin from `margin_list`; else a head by name."""
    from trainer import losses

    if cfg.loss == "combined":
        return losses.build_margin_loss(cfg.margin_list, cfg.scale, cfg.interclass_filtering_threshold)
    from trainer.heads import available_heads, build_head

    try:
        return build_head(cfg.loss, num_classes=num_classes, **cfg.loss_kwargs)
    except KeyError:
        raise ConfigError(f"loss {cfg.loss!r} is not 'combined' nor a head: {', '.join(available_heads())}") \
            from None
    except TypeError as e:  # a loss_kwargs key the head does not take
        raise ConfigError(f"loss {cfg.loss!r} with loss_kwargs {cfg.loss_kwargs}: {e}") from None


def partial_fc_loss(model: nn.Module, partial_fc: nn.Module, batch: Sequence[torch.Tensor]
                    ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The plain step's loss: Partial FC's margin softmax of the batch's embeddings."""
    images, labels = batch[0], batch[1]
    return partial_fc(model(images), labels), {}


class StandardMode:
    """Partial FC with the margin head `cfg.loss` (sample_rate, margin_list, scale, loss_kwargs)."""

    name = "standard"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if cfg.mix:
            from trainer.mixing import MIX_KINDS

            if cfg.mix not in MIX_KINDS:
                raise ConfigError(f"mix must be '' or one of {MIX_KINDS}, got {cfg.mix!r}")
            if self.name != "standard":
                raise ConfigError(f"mix is for mode 'standard', not {self.name!r}")
            if cfg.sample_rate < 1.0:
                # Two Partial FC calls per step would sample two sets of negatives for one optimizer step.
                raise ConfigError("mix needs sample_rate 1.0 (Partial FC samples negatives once per step)")
        # The step's epoch and micro batch: with the seed, what the mixing draws depend on
        # (trainer/mixing.py).
        self._epoch, self._micro = 0.0, 0

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
        return PartialFC(build_margin_loss(cfg, num_classes), cfg.embedding_size, num_classes,
                         sample_rate=cfg.sample_rate, embedding_grad_scale=float(world_size), seed=cfg.seed)

    def begin_step(self, backbone: nn.Module, head: nn.Module, epoch: float) -> Optional[str]:
        """Sets up the step at `epoch` (fractional); returns the stage name when it changed, else None."""
        self._epoch, self._micro = float(epoch), 0
        return None

    def loss(self, model: nn.Module, head: nn.Module, batch: Sequence[torch.Tensor]
             ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(loss of one micro batch, parts to log) with `model` the (maybe DDP-wrapped) backbone."""
        if self.cfg.mix:
            from trainer.distributed import get_rank
            from trainer.mixing import mixed_loss

            cfg = self.cfg
            self._micro += 1
            return mixed_loss(model, head, batch[0], batch[1], cfg.mix, cfg.mix_p, cfg.mix_alpha,
                              key=(cfg.seed, self._epoch.hex(), self._micro), rank=get_rank()), {}
        return partial_fc_loss(model, head, batch)

    def end_step(self, backbone: nn.Module, head: nn.Module) -> None:
        """After an optimizer step that was taken (not after a skipped one)."""

    def log_fields(self, head: nn.Module) -> dict:
        """Extra fields of a metrics.jsonl line."""
        return {}


__all__ = ["StandardMode", "build_margin_loss", "partial_fc_loss"]
