"""FaceX-Zoo's backbone list through timm: one adapter, not one file per model.

A timm feature extractor (`features_only=True`, last stage only, random init: nothing is downloaded)
becomes a face-embedding network by IResNet's output layer: BN -> dropout -> flatten -> FC -> BN over
its last map. Like FaceX-Zoo's versions (and IResNet), the nets end on a 7x7 map at 112x112 where timm
can dilate the last stage (`output_stride=16`); the others end on 4x4.

| registry name    | timm model                   | FaceX-Zoo entry   | last map at 112 | note                   |
|------------------|------------------------------|-------------------|-----------------|------------------------|
| efficientnet_b0  | efficientnet_b0              | EfficientNet-B0   | 7x7 (dilated)   |                        |
| hrnet_w18        | hrnet_w18                    | HRNet             | 4x4             | whole trunk, 128 input |
| ghostnet_100     | ghostnet_100                 | GhostNet          | 4x4             | timm cannot dilate it  |
| resnest50d       | resnest50d                   | ResNeSt-50        | 7x7 (dilated)   |                        |
| rexnet_100       | rexnet_100                   | ReXNet-1.0        | 7x7 (dilated)   |                        |
| repvgg_a0/b0/b1  | repvgg_a0 / b0 / b1          | RepVGG-A0/B0/B1   | 7x7 (dilated)   |                        |
| seresnet50       | seresnet50                   | SE-ResNet-50      | 7x7 (dilated)   |                        |
| swin_t / swin_s  | swin_{tiny,small}_patch4_... | Swin-T / Swin-S   | 4x4             | built for img_size 112 |

`build_backbone("timm", model_name=...)` adapts any other timm model the same way. MobileFaceNet,
IResNet (mobilefacenet.py, iresnet.py), LightCNN and AttentionNet (their own files) are not in timm;
FaceX-Zoo's TF-NAS is not offered (timm has no TF-NAS).

HRNet fuses its branches by upsampling the coarser ones by exactly 2^k, which needs a side divisible by
32: 112 is not, so the adapter resizes the face to 128x128 (bilinear) inside the network for it.

timm needs torchvision. PyPI's torchvision wheels link the CUDA build of torch; beside a CPU-only torch
their C++ ops do not load and `import torchvision` fails while registering fake kernels for `nms` and
`qnms` (the only two ops it registers without checking that the library loaded). timm uses only
torchvision's pure-Python parts, so `import_timm` declares those two op schemas (without kernels: calling
torchvision.ops.nms still fails loudly) when the library cannot load, then imports timm. scripts/setup.sh
installs that torchvision with --no-deps (so it never replaces the installed torch) and timm through the
`timm` extra of setup.cfg.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone
from .ressanet import FaceEmbeddingHead

INSTALL_HINT = ("pip install --no-deps torchvision==0.N+15.* (the release matching torch 2.N), then "
                "pip install -e '.[timm]'; scripts/setup.sh does both")

# registry name -> (timm model name, create_model kwargs, input side fed to the timm model)
FACEX_ZOO_TIMM: Dict[str, Tuple[str, Dict[str, Any], Optional[int]]] = {
    "efficientnet_b0": ("efficientnet_b0", {"output_stride": 16}, None),
    # HRNet's own classification trunk (all four branches merged, 2048 channels), not one branch's map.
    "hrnet_w18": ("hrnet_w18", {"features_only": False}, 128),
    "ghostnet_100": ("ghostnet_100", {}, None),
    "resnest50d": ("resnest50d", {"output_stride": 16}, None),
    "rexnet_100": ("rexnet_100", {"output_stride": 16}, None),
    "repvgg_a0": ("repvgg_a0", {"output_stride": 16}, None),
    "repvgg_b0": ("repvgg_b0", {"output_stride": 16}, None),
    "repvgg_b1": ("repvgg_b1", {"output_stride": 16}, None),
    "seresnet50": ("seresnet50", {"output_stride": 16}, None),
    # The getter extractor returns NCHW maps (Swin's own layers are NHWC).
    "swin_t": ("swin_tiny_patch4_window7_224", {"img_size": 112, "feature_cls": "getter"}, None),
    "swin_s": ("swin_small_patch4_window7_224", {"img_size": 112, "feature_cls": "getter"}, None),
}


class TimmUnavailable(ImportError):
    pass


def _declare_torchvision_ops_if_unloadable() -> None:
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    libs = sorted(pathlib.Path(spec.origin).parent.glob("_C.*"))
    if not libs:
        return
    try:
        torch.ops.load_library(str(libs[0]))  # what torchvision itself does first; a no-op if it works later
    except OSError:
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}",
                                     "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # already declared by an earlier call


def import_timm():
    """timm, or TimmUnavailable saying how to install it."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        raise TimmUnavailable(f"the timm backbones need timm: {INSTALL_HINT}")
    _declare_torchvision_ops_if_unloadable()
    try:
        import timm
    except Exception as exc:  # a broken torchvision surfaces as RuntimeError or ImportError
        raise TimmUnavailable(f"timm is installed but does not import ({exc}); {INSTALL_HINT}") from exc
    return timm


def timm_available() -> bool:
    try:
        import_timm()
    except TimmUnavailable:
        return False
    return True


class TimmFaceNet(nn.Module):
    """A timm model's last feature map -> BN, dropout, FC, BN face embedding."""

    def __init__(self, model_name: str, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                 model_input_size: Optional[int] = None, features_only: bool = True, **timm_kwargs):
        """features_only: take the last stage of timm's feature extractor (its later layers are pruned);
        False: the model's whole trunk (`forward_features`, e.g. with its final 1x1 conv), unpooled."""
        super().__init__()
        timm = import_timm()
        self.model_name = model_name
        self.input_size = input_size
        self.model_input_size = model_input_size
        self.features_only = features_only
        if features_only:
            self.body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=(-1,),
                                          **timm_kwargs)
            channels = self.body.feature_info.channels()[-1]
        else:
            self.body = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="",
                                          **timm_kwargs)
            channels = self.body.num_features
        spatial = self._probe_spatial()
        self.head = FaceEmbeddingHead(channels, spatial, embedding_size, dropout)

    def _probe_spatial(self) -> Tuple[int, int]:
        # The last map's size depends on each model's padding and rounding: measure it, don't guess it.
        param = next(self.body.parameters())
        was_training = self.body.training
        self.body.eval()
        with torch.no_grad():
            fmap = self._features(torch.zeros(1, 3, self.input_size, self.input_size, device=param.device,
                                              dtype=param.dtype))
        self.body.train(was_training)
        return tuple(fmap.shape[-2:])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.model_input_size and self.model_input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.model_input_size, self.model_input_size), mode="bilinear",
                              align_corners=False)
        return self.body(x)[-1] if self.features_only else self.body.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x))


def _register(name: str, model_name: str, kwargs: Dict[str, Any], model_input_size: Optional[int]) -> None:
    def build(**overrides) -> TimmFaceNet:
        return TimmFaceNet(model_name, **{"model_input_size": model_input_size, **kwargs, **overrides})

    build.__name__ = name
    build.__doc__ = f"timm's {model_name} as a face-embedding network."
    register_backbone(name)(build)


for _name, (_model, _kwargs, _side) in FACEX_ZOO_TIMM.items():
    _register(_name, _model, _kwargs, _side)


@register_backbone("timm")
def timm_backbone(model_name: str, **kwargs) -> TimmFaceNet:
    """Any timm model that supports features_only, e.g. network_kwargs = {"model_name": "convnext_atto"}."""
    return TimmFaceNet(model_name, **kwargs)
