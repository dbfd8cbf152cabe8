"""Cityscapes pixel-level metrics, computed exactly as the official evaluation does.

The official script (``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``)
accumulates one confusion matrix over the whole split, in labelId space, and for each of
the 19 evaluated classes computes IoU = TP / (TP + FP + FN) where

- TP: GT class c predicted as c;
- FN: GT class c predicted as anything else, *including* labelIds that are not evaluated
  (``unlabeled``, ``parking``, ...): such a prediction is a miss for the GT class and a
  false positive for nothing;
- FP: predicted c on pixels whose GT is another evaluated class (void GT pixels never
  count);
- a class with TP + FP + FN = 0 has IoU NaN and is left out of the mean.

We work in trainId space with one extra prediction column, "not a class", that collects
predictions of 255 or of any other id outside ``0..num_classes-1``. Row sums then give
TP + FN and the first ``num_classes`` columns give TP + FP, so the numbers equal the
official ones (a test checks this to 1e-6). A per-image average of IoU is a different
number: always accumulate the matrix over the split first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from seg.data.labels import CLASS_NAMES

__all__ = ["confusion_matrix", "segmentation_metrics", "ConfusionMatrix"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int = 19, ignore_index: int = 255) -> Tensor:
    """Count (GT class, predicted class) pairs: a ``num_classes x (num_classes + 1)`` int64 matrix.

    ``pred`` and ``target`` hold class indices (trainIds) of the same shape; ``pred`` may
    also be logits with one more dimension, classes on dim 1 (``N x C x H x W``), which are
    reduced by argmax. Rows are GT classes, columns predictions; the last column counts
    predictions that are not a class (``ignore_index`` or any id outside
    ``0..num_classes-1``), which are misses of the GT class. Pixels whose target is
    ``ignore_index`` are left out. Runs on the inputs' device as one ``torch.bincount``.

    Raises ValueError when ``target`` holds ids other than classes and ``ignore_index``
    (e.g. raw labelIds that were never mapped to trainIds).
    """
    counts = _pair_counts(pred, target, num_classes, ignore_index)
    _check_targets(counts, target, num_classes, ignore_index)
    return _matrix(counts, num_classes)


def _pair_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """One ``torch.bincount`` over (GT, prediction) pairs: ``num_classes * (num_classes + 1)``
    matrix bins, then ignored pixels, then pixels whose target is neither a class nor ignored.
    Reads nothing back to the host, so on a GPU it does not wait for the model."""
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    n = num_classes
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    is_class = (target >= 0) & (target < n)
    pred = torch.where((pred >= 0) & (pred < n), pred, n)  # not a class -> the miss column
    # two extra bins instead of boolean masking: ignored pixels, then targets that are no class
    ignored_bin = n * (n + 1)
    index = torch.where(is_class, target * (n + 1) + pred,
                        torch.where(target == ignore_index, ignored_bin, ignored_bin + 1))
    return torch.bincount(index, minlength=ignored_bin + 2)


def _check_targets(counts: Tensor, target: Tensor | None, num_classes: int, ignore_index: int) -> None:
    bad_pixels = int(counts[-1])
    if bad_pixels == 0:
        return
    if target is not None:
        target = target.reshape(-1)
        bad = torch.unique(target[((target < 0) | (target >= num_classes)) & (target != ignore_index)])
        what = f"ids {bad.tolist()[:10]}"
    else:
        what = f"{bad_pixels} pixel(s) with ids"
    raise ValueError(f"target holds {what} that are neither a class (0..{num_classes - 1}) nor the ignore "
                     f"index {ignore_index}: map labelIds to trainIds first "
                     f"(seg.data.labels.label_ids_to_train_ids)")


def _matrix(counts: Tensor, num_classes: int) -> Tensor:
    return counts[:num_classes * (num_classes + 1)].reshape(num_classes, num_classes + 1)


def segmentation_metrics(cm: Tensor, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU from a confusion matrix.

    ``cm`` is ``C x (C + 1)`` as made by :func:`confusion_matrix` (a square ``C x C``
    matrix without the miss column is accepted too). Returns plain floats::

        {"miou": ..., "pixel_accuracy": ..., "mean_class_accuracy": ...,
         "iou": {class name: IoU}}

    IoU is NaN for a class that occurs neither in GT nor in the predictions on evaluated
    pixels; such classes are left out of ``miou``, as in the official evaluation. Class
    accuracy (TP / GT pixels) is averaged over the classes present in GT. Pixel accuracy
    is correct pixels over all evaluated pixels. Any value with nothing to average is NaN.
    """
    n = cm.shape[0]
    if cm.dim() != 2 or cm.shape[1] not in (n, n + 1):
        raise ValueError(f"confusion matrix must be C x (C + 1) or C x C, got {tuple(cm.shape)}")
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a confusion matrix of {n} classes")
    cm = cm.detach().to("cpu", torch.float64)
    true_positive = cm.diagonal()
    gt_pixels = cm.sum(dim=1)  # TP + FN, misses (last column) included
    predicted_pixels = cm[:, :n].sum(dim=0)  # TP + FP, on evaluated GT pixels only
    union = gt_pixels + predicted_pixels - true_positive
    iou = torch.where(union > 0, true_positive / union, torch.nan)
    class_accuracy = torch.where(gt_pixels > 0, true_positive / gt_pixels, torch.nan)
    total = float(gt_pixels.sum())
    return {
        "miou": _nanmean(iou),
        "pixel_accuracy": float(true_positive.sum()) / total if total > 0 else math.nan,
        "mean_class_accuracy": _nanmean(class_accuracy),
        "iou": {name: float(value) for name, value in zip(class_names, iou)},
    }


class ConfusionMatrix:
    """Accumulates :func:`confusion_matrix` over batches; ``compute()`` gives the metrics.

    The matrix lives on the device of the first batch, so accumulating on the GPU needs no
    per-batch copy to the host.
    """

    def __init__(self, num_classes: int = 19, ignore_index: int = 255,
                 class_names: Sequence[str] | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if class_names is None:
            class_names = CLASS_NAMES if num_classes == len(CLASS_NAMES) else [str(i) for i in range(num_classes)]
        self.class_names = tuple(class_names)
        self._counts: Tensor | None = None

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: class indices or logits (``N x C x H x W``) and trainId targets.

        Never waits for the device: targets that are neither a class nor ignored are
        counted here and reported by ``compute()``."""
        counts = _pair_counts(pred, target, self.num_classes, self.ignore_index)
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    @property
    def matrix(self) -> Tensor | None:
        """The ``num_classes x (num_classes + 1)`` confusion matrix so far (None before any batch)."""
        return None if self._counts is None else _matrix(self._counts, self.num_classes)

    def reset(self) -> None:
        self._counts = None

    def compute(self) -> dict:
        """:func:`segmentation_metrics` of everything seen since the last reset.

        Raises ValueError when a target held ids other than classes and the ignore index."""
        if self._counts is None:
            matrix = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.long)
        else:
            _check_targets(self._counts, None, self.num_classes, self.ignore_index)
            matrix = self.matrix
        return segmentation_metrics(matrix, self.class_names)


def _nanmean(values: Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else math.nan
