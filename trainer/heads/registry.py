"""The heads' registry: a head is built by name (`build_head("curricularface", s=64.0, m=0.5)`), and the
trainer builds the one `config.loss` names with `build_margin_loss(cfg, num_classes)`.

A registered factory may declare `config_kwargs(cfg) -> dict`: the arguments it takes from config keys
other than `loss_kwargs` (insightface's "combined" takes margin_list, scale and
interclass_filtering_threshold); `loss_kwargs` come on top.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_CONFIG_KWARGS: Dict[str, Callable[[dict], dict]] = {}


def _canonical(name: str) -> str:
    # "AM-Softmax", "am_softmax" and "AM_Softmax" are one head.
    return name.strip().lower().replace("-", "_")


def register_head(name: str, config_kwargs: Optional[Callable[[dict], dict]] = None
                  ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator: `@register_head("adacos")`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = _canonical(name)
        if key in _REGISTRY:
            raise ValueError(f"head {name!r} is registered twice")
        _REGISTRY[key] = factory
        if config_kwargs is not None:
            _CONFIG_KWARGS[key] = config_kwargs
        return factory

    return wrap


def available_heads() -> list[str]:
    return sorted(_REGISTRY)


def build_head(name: str, **kwargs) -> nn.Module:
    """Builds the head registered as `name` (case and '-'/'_' insensitive) with `kwargs`.

    "arcface", "cosface" and "combined" are insightface's margins (trainer.losses); FaceX-Zoo's ArcFace,
    whose fallback past theta + m > pi differs, is "facex_arcface"; its AM-Softmax is "am_softmax".

    Heads that need the class count (AdaCos, AdaM-Softmax) take `num_classes`; it is accepted and
    ignored by the others, so a trainer may always pass it.
    """
    key = _canonical(name)
    if key not in _REGISTRY:
        raise KeyError(f"unknown head {name!r}; known: {', '.join(available_heads())}")
    return _REGISTRY[key](**kwargs)


def build_margin_loss(cfg, num_classes: int) -> nn.Module:
    """The head `cfg.loss` for `num_classes` classes, from its config keys and `cfg.loss_kwargs`."""
    from trainer.config import ConfigError

    key = _canonical(cfg.loss)
    if key not in _REGISTRY:
        raise ConfigError(f"loss {cfg.loss!r} is not a head: {', '.join(available_heads())}")
    from_config = _CONFIG_KWARGS.get(key)
    kwargs = {**(from_config(cfg) if from_config is not None else {}), **cfg.loss_kwargs}
    try:
        return build_head(cfg.loss, num_classes=num_classes, **kwargs)
    except TypeError as e:  # a loss_kwargs key the head does not take
        raise ConfigError(f"loss {cfg.loss!r} with loss_kwargs {cfg.loss_kwargs}: {e}") from None


class Head(nn.Module):
    """Base of the heads here: declares the optional Partial FC interface with its defaults."""

    needs_norms = False
    needs_class_index = False
    per_class_state: Tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
