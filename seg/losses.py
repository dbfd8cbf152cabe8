"""Pixel-wise cross entropy and median frequency class weights.

The loss is the mean over valid (non-ignored) pixels. With class weights it is the
weighted mean ``sum_i w[y_i] * l_i / sum_i w[y_i]``, PyTorch's convention for
``CrossEntropyLoss(weight=...)``: the loss scale, and so the learning rate that suits it,
does not change with the overall scale of the weights. Unlike PyTorch's mean, a batch
with no valid pixel (a crop that is all void) gives a loss of 0, not NaN, so it is not
mistaken for divergence.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.config import IGNORE_INDEX, NUM_CLASSES, Config
from seg.errors import ConfigError, DataError

__all__ = ["CrossEntropyLoss2d", "build_loss", "median_frequency_weights"]


class CrossEntropyLoss2d(nn.Module):
    """Cross entropy over ``N x C x H x W`` logits and ``N x H x W`` targets, ignoring 255.

    Computed in float32 whatever the logits' dtype (mixed precision). See the module
    docstring for how the mean is taken.
    """

    def __init__(self, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        weight = self.weight
        if weight is not None and weight.device != logits.device:
            weight = weight.to(logits.device)
        total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=self.ignore_index,
                                reduction="sum")
        valid = target != self.ignore_index
        if weight is None:
            denominator = valid.sum().clamp_min(1)
        else:
            # no boolean indexing (a host sync on CUDA): look up a clamped id, then mask
            pixel_weight = weight[target.clamp(0, weight.numel() - 1)]
            # all-zero weights on the present classes make total 0 too: 0 / tiny = 0, no NaN
            denominator = torch.where(valid, pixel_weight, 0.0).sum().clamp_min(torch.finfo(torch.float32).tiny)
        return total / denominator

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, weighted={self.weight is not None}"


def build_loss(cfg: Config | None = None, class_weights: Tensor | None = None) -> nn.Module:
    """The training loss: cross entropy ignoring 255, optionally class weighted.

    ``class_weights`` (19 values, e.g. from :func:`median_frequency_weights`) is used when
    given. When ``cfg.train.class_weights`` asks for weights and none are given, raises
    ConfigError rather than silently training unweighted.
    """
    if class_weights is None and cfg is not None and cfg.train.class_weights != "none":
        raise ConfigError(f"train.class_weights is '{cfg.train.class_weights}' but no weights were "
                          f"given to build_loss: compute them with "
                          f"seg.losses.median_frequency_weights(train_dataset)")
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.shape != (NUM_CLASSES,):
            raise ValueError(f"class_weights must hold {NUM_CLASSES} values, got shape "
                             f"{tuple(class_weights.shape)}")
        if not bool(torch.isfinite(class_weights).all()) or bool((class_weights < 0).any()):
            raise ValueError(f"class_weights must be finite and >= 0, got {class_weights.tolist()}")
    return CrossEntropyLoss2d(weight=class_weights, ignore_index=IGNORE_INDEX)


def median_frequency_weights(source: Any, num_classes: int = NUM_CLASSES,
                             ignore_index: int = IGNORE_INDEX, num_threads: int | None = None) -> Tensor:
    """Median frequency balancing (Eigen & Fergus, 2015): ``w_c = median(f) / f_c``.

    ``f_c`` is the number of pixels of class c divided by the number of valid (non-ignored)
    pixels of the images in which c occurs; the median is over the classes that occur.
    Classes that never occur get weight 0 (they are never a target in this split).

    ``source`` is either a ``CityscapesSegmentation``, whose label files are decoded
    directly (``read_train_ids``: no transform, no image decoding), or an iterable of
    trainId label maps (arrays or tensors).
    """
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)  # valid pixels of the images holding c

    def count(label: Any) -> np.ndarray:
        train_ids = np.asarray(label.cpu() if isinstance(label, Tensor) else label).ravel()
        counts = np.bincount(train_ids.astype(np.int64, copy=False)[train_ids != ignore_index],
                             minlength=num_classes)
        if counts.size > num_classes or (train_ids.size and train_ids.min() < 0):
            raise DataError(f"label map holds ids outside 0..{num_classes - 1} and {ignore_index}: "
                            f"pass trainIds, not labelIds")
        return counts

    read_train_ids = getattr(source, "read_train_ids", None)
    if read_train_ids is not None:
        threads = num_threads or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:  # PNG decoding releases the GIL
            per_image = list(pool.map(lambda index: count(read_train_ids(index)), range(len(source))))
    else:
        per_image = [count(label) for label in _as_iterable(source)]
    for counts in per_image:
        class_pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)

    present = class_pixels > 0
    if not present.any():
        raise DataError("no labelled pixel found: cannot compute class weights")
    frequency = class_pixels[present] / image_pixels[present]
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = np.median(frequency) / frequency
    return torch.from_numpy(weights).float()


def _as_iterable(source: Any) -> Iterable:
    if isinstance(source, (np.ndarray, Tensor)) and source.ndim == 2:
        return [source]
    return source
