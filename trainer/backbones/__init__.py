"""One registry of backbones, selected by name in a config (`network = "r50"`).

A backbone maps a batch of aligned faces `[B, 3, 112, 112]` (normalised to [-1, 1]) to embeddings
`[B, embedding_size]`. Every module in this package registers its models with `@register_backbone`;
`build_backbone(name, **kwargs)` constructs one.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict

import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class or factory decorator: `@register_backbone("r50")`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_all() -> None:
    # Importing each module runs its @register_backbone decorators.
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available_backbones() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def build_backbone(name: str, **kwargs) -> nn.Module:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)
