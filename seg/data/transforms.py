"""Joint image + mask transforms (torchvision.transforms.v2).

The image travels as a ``tv_tensors.Image`` (uint8, 3xHxW) and the mask of trainIds as
a ``tv_tensors.Mask`` (uint8, HxW), so every geometric step moves both alike and v2
resamples masks with nearest neighbour only: a mask never gains a value it did not have,
except 255 where a crop pads beyond the image. Photometric steps touch the image alone.
Each pipeline ends with a float image normalised with the ImageNet statistics and an
int64 mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from seg.config import IGNORE_INDEX, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScale(v2.Transform):
    """Resize image and mask by one factor drawn uniformly from ``scale_range``.

    Images are resampled bilinearly (antialiased when shrinking), masks by nearest
    neighbour. With ``low == high`` the factor is fixed and no random number is drawn.
    """

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.low, self.high = float(scale_range[0]), float(scale_range[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.low if self.low == self.high else float(torch.empty(1).uniform_(self.low, self.high))
        return dict(size=[max(1, round(height * scale)), max(1, round(width * scale))])

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


def normalize() -> v2.Transform:
    """uint8 image -> float normalised with ImageNet mean/std; mask -> int64."""
    return v2.Compose([
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def train_transform(data: DataConfig) -> v2.Transform:
    """Random scale, random crop to ``data.crop_size`` (image padded with 0, mask with
    255), horizontal flip, colour jitter, then normalisation."""
    steps: list[v2.Transform] = []
    if tuple(data.scale_range) != (1.0, 1.0):
        steps.append(RandomScale(data.scale_range))
    steps.append(v2.RandomCrop(list(data.crop_size), pad_if_needed=True,
                               fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if data.hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if data.color_jitter > 0:
        # After the crop: jittering fewer pixels is cheaper. No hue jitter: it is slow and
        # colour is part of what distinguishes Cityscapes classes.
        strength = data.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps.append(normalize())
    return v2.Compose(steps)


def eval_transform(data: DataConfig) -> v2.Transform:
    """Resize by ``data.eval_scale`` (mask nearest) when it is not 1, then normalise."""
    steps: list[v2.Transform] = []
    if data.eval_scale != 1.0:
        steps.append(RandomScale((data.eval_scale, data.eval_scale)))
    steps.append(normalize())
    return v2.Compose(steps)
