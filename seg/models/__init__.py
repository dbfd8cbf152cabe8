"""Segmentation models: one registry, `MODELS`, and `build_model(name, ...)`.

`MODELS` maps an architecture name to a builder `(num_classes, backbone, pretrained,
weights) -> nn.Module`; `BACKBONES` maps a backbone name to its builder. The tests run
over both registries, so a new entry is tested the moment it is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from seg.config import NUM_CLASSES, ModelConfig
from seg.errors import ConfigError
from seg.models.backbones import BACKBONES, Backbone, build_backbone, imagenet_weights_path
from seg.models.fcn import FCN, bilinear_kernel, fcn8s, fcn16s, fcn32s

MODELS: dict[str, Callable[..., nn.Module]] = {
    "fcn32s": fcn32s,
    "fcn16s": fcn16s,
    "fcn8s": fcn8s,
}


def build_model(name: str, num_classes: int = NUM_CLASSES, backbone: str = "resnet18",
                pretrained: bool = False, weights: str | Path | None = None) -> nn.Module:
    """The model registered as `name` over backbone `backbone`, producing
    `N x num_classes x H x W` logits for `N x 3 x H x W` images.

    `pretrained=True` loads torchvision's ImageNet backbone weights from the torch hub
    cache, `weights=path` from a state dict file (implies pretrained); neither ever
    downloads (WeightsNotFoundError says which file to put where). An unknown model or
    backbone name raises ConfigError listing the valid ones.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(sorted(BACKBONES))}")
    return MODELS[name](num_classes=num_classes, backbone=backbone, pretrained=pretrained, weights=weights)


def build_model_from_config(model_cfg: ModelConfig, num_classes: int = NUM_CLASSES) -> nn.Module:
    """`build_model` with the fields of `cfg.model` (arch, backbone, pretrained, weights)."""
    return build_model(model_cfg.arch, num_classes=num_classes, backbone=model_cfg.backbone,
                       pretrained=model_cfg.pretrained, weights=model_cfg.weights)


__all__ = ["BACKBONES", "FCN", "MODELS", "Backbone", "bilinear_kernel", "build_backbone", "build_model",
           "build_model_from_config", "fcn8s", "fcn16s", "fcn32s", "imagenet_weights_path"]
