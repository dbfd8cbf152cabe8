"""The official Cityscapes label table as lookup arrays.

Label files on disk hold *labelIds* (0..33). Training and evaluation use the 19
*trainIds*; every other labelId maps to 255 and is ignored by the loss and the
metrics. The tables here come straight from ``cityscapesscripts`` so they cannot
drift from the official ones.
"""

from __future__ import annotations

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as _official_labels

from seg.config import IGNORE_INDEX, NUM_CLASSES

LABELS = tuple(_official_labels)

# "license plate" has id -1: the official tools never draw it, so it never occurs on disk.
VALID_LABEL_IDS: frozenset[int] = frozenset(label.id for label in LABELS if label.id >= 0)

_EVALUATED = sorted((label for label in LABELS if not label.ignoreInEval and 0 <= label.trainId < 255),
                    key=lambda label: label.trainId)
assert [label.trainId for label in _EVALUATED] == list(range(NUM_CLASSES)), "unexpected Cityscapes label table"

CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _EVALUATED)

# labelId -> trainId; ignored and undefined ids -> 255.
TRAIN_ID_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label in _EVALUATED:
    TRAIN_ID_LUT[_label.id] = _label.trainId

# trainId -> labelId; 255 (and anything that is not a class) -> 0, "unlabeled", which the
# official evaluation counts as a miss for the ground-truth class.
LABEL_ID_LUT = np.zeros(256, dtype=np.uint8)
for _label in _EVALUATED:
    LABEL_ID_LUT[_label.trainId] = _label.id

# Is this labelId defined by Cityscapes? Used to validate label files.
VALID_LABEL_ID_MASK = np.zeros(256, dtype=bool)
VALID_LABEL_ID_MASK[sorted(VALID_LABEL_IDS)] = True

# labelId -> trainId in one uint8 lookup that also flags ids Cityscapes does not define
# (as UNDEFINED_LABEL_ID, which is no trainId): mapping and checking a label file at once.
UNDEFINED_LABEL_ID = 254
CHECKED_TRAIN_ID_LUT = np.where(VALID_LABEL_ID_MASK, TRAIN_ID_LUT, UNDEFINED_LABEL_ID).astype(np.uint8)

# trainId -> official colour; 255 -> black.
PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _label in _EVALUATED:
    PALETTE[_label.trainId] = _label.color

# labelId -> official colour, as in the gtFine_color.png files.
LABEL_ID_PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _label in LABELS:
    if _label.id >= 0:
        LABEL_ID_PALETTE[_label.id] = _label.color


def label_ids_to_train_ids(label_ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map labelIds to trainIds (uint8, same type and device as the input; 255 = ignore)."""
    return _lookup(TRAIN_ID_LUT, label_ids, "labelIds")


def train_ids_to_label_ids(train_ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map trainIds (e.g. a prediction) back to labelIds for the official tools.

    255 and any value that is not a class map to 0 ("unlabeled"). Returns uint8 of the
    same type and device as the input.
    """
    return _lookup(LABEL_ID_LUT, train_ids, "trainIds")


def colorize(train_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """An ``HxWx3`` uint8 image of trainIds in the official Cityscapes colours (255 black)."""
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    return _lookup(PALETTE, train_ids, "trainIds")


def _lookup(table: np.ndarray, values: np.ndarray | torch.Tensor, what: str) -> np.ndarray | torch.Tensor:
    # A negative index would silently wrap around in numpy and torch; refuse it instead.
    if isinstance(values, torch.Tensor):
        if values.dtype != torch.uint8 and values.numel() and (values.min() < 0 or values.max() > 255):
            raise ValueError(f"{what} must lie in 0..255, got values in "
                             f"[{int(values.min())}, {int(values.max())}]")
        return torch.from_numpy(table).to(values.device)[values.long()]
    values = np.asarray(values)
    if values.dtype != np.uint8 and values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"{what} must lie in 0..255, got values in [{values.min()}, {values.max()}]")
    return table[values.astype(np.intp, copy=False)]
