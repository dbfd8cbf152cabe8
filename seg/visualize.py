"""Prediction overlays: image | ground truth | prediction, labels in the Cityscapes palette."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from seg.data.labels import colorize
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["denormalize", "overlay_panel", "predict", "prediction_panels",
           "save_png"]

_GAP = 4  # white pixels between the three panels


def denormalize(image: Tensor) -> np.ndarray:
    """A normalised ``3 x H x W`` float tensor back to an ``H x W x 3`` uint8 RGB array."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb * 255).round().byte().permute(1, 2, 0).numpy()


def overlay_panel(image: Tensor, target: Tensor | np.ndarray, pred: Tensor | np.ndarray) -> np.ndarray:
    """``H x (3W + 8) x 3`` uint8: the image, the ground truth and the prediction side by side.

    ``image`` is normalised as the data sets return it; ``target`` and ``pred`` are
    ``H x W`` trainIds (255, ignored, is drawn black).
    """
    panels = [denormalize(image), colorize(_numpy(target)), colorize(_numpy(pred))]
    height = panels[0].shape[0]
    for panel in panels[1:]:
        if panel.shape[:2] != panels[0].shape[:2]:
            raise ValueError(f"image, target and prediction differ in size: "
                             f"{[p.shape[:2] for p in panels]}")
    gap = np.full((height, _GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


@torch.inference_mode()
def predict(model: nn.Module, image: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """trainIds ``H x W`` (int64, on the CPU) predicted for one normalised ``3 x H x W`` image."""
    model.eval()
    logits = model(image.unsqueeze(0).to(device))
    return logits.argmax(dim=1)[0].cpu()


def prediction_panels(model: nn.Module, dataset: torch.utils.data.Dataset, indices: Sequence[int],
                      device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """``{name: overlay_panel}`` for the samples ``indices`` of ``dataset``.

    Names are the samples' stems where the data set has ``samples`` (Cityscapes), else
    ``sample_<index>``.
    """
    samples = getattr(dataset, "samples", None)
    panels = {}
    for index in indices:
        image, target = dataset[index]
        name = samples[index].stem if samples is not None else f"sample_{index}"
        panels[name] = overlay_panel(image, target, predict(model, image, device))
    return panels


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an ``H x W x 3`` uint8 array as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _numpy(labels: Tensor | np.ndarray) -> np.ndarray:
    return labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
