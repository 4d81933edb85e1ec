"""insightface's margins (defined in trainer.losses) in the heads' registry. "combined" is the trainer's
default `loss`: its (m1, m2, m3) come from the config's `margin_list`, its s from `scale`. FaceX-Zoo's
AM-Softmax is CosFace with its defaults.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from trainer.heads.registry import register_head
from trainer.losses import ArcFace, CombinedMarginLoss, CosFace


@register_head("arcface")
def _arcface(s: float = 64.0, m: float = 0.5, interclass_filtering_threshold: float = 0.0,
             easy_margin: bool = False, num_classes: Optional[int] = None) -> nn.Module:
    return ArcFace(s=s, m=m, interclass_filtering_threshold=interclass_filtering_threshold,
                   easy_margin=easy_margin)


@register_head("cosface")
def _cosface(s: float = 64.0, m: float = 0.4, interclass_filtering_threshold: float = 0.0,
             num_classes: Optional[int] = None) -> nn.Module:
    return CosFace(s=s, m=m, interclass_filtering_threshold=interclass_filtering_threshold)


def _combined_config(cfg) -> dict:
    m1, m2, m3 = cfg.margin_list
    return dict(s=cfg.scale, m1=m1, m2=m2, m3=m3,
                interclass_filtering_threshold=cfg.interclass_filtering_threshold)


@register_head("combined", config_kwargs=_combined_config)
def _combined(s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
              interclass_filtering_threshold: float = 0.0, num_classes: Optional[int] = None) -> nn.Module:
    return CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=interclass_filtering_threshold)


@register_head("am_softmax")
def _am_softmax(s: float = 32.0, m: float = 0.35, num_classes: Optional[int] = None) -> nn.Module:
    """AM-Softmax (Wang et al. 2018): s * (cos - m) at the target, i.e. CosFace; FaceX-Zoo's s=32, m=0.35."""
    return CosFace(s=s, m=m)
