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


class RandomScaleCrop(v2.Transform):
    """Random scale by a factor from ``scale_range``, then a random ``size`` crop, in one resize.

    The same samples as resizing the whole image and mask and cropping the result
    (``RandomScale`` then ``v2.RandomCrop`` with ``pad_if_needed``), but only the crop
    window is resampled: ~9x less work on a 2048x1024 Cityscapes image, and a
    memory-mapped image (``data.cache: disk``) is read only where the window lies. Where
    the scaled image is smaller than the crop it sits at a random offset and the rest is
    padded: 0 in the image, ``mask_fill`` (255, ignored) in the mask.
    """

    def __init__(self, size: tuple[int, int], scale_range: tuple[float, float] = (1.0, 1.0),
                 mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.low, self.high = float(scale_range[0]), float(scale_range[1])
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.low if self.low == self.high else float(torch.empty(1).uniform_(self.low, self.high))
        scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
        params: dict[str, Any] = {"padding": [0, 0, 0, 0], "box": [0, 0, 0, 0], "window": [0, 0]}
        for axis, (source, target, crop) in enumerate(zip((height, width), scaled, self.size)):
            # the crop's start in scaled coordinates; negative: the image sits inside the crop
            start = _randint(target - crop) if target >= crop else -_randint(crop - target)
            first, last = max(start, 0), min(start + crop, target)  # the part of the crop on the image
            ratio = source / target
            source_first = min(source - 1, round(first * ratio))
            source_last = max(source_first + 1, min(source, round(last * ratio)))
            params["box"][axis] = source_first  # top, left
            params["box"][2 + axis] = source_last - source_first  # height, width
            params["window"][axis] = last - first
            params["padding"][1 - axis] = first - start  # [left, top, right, bottom]
            params["padding"][3 - axis] = start + crop - last
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, height, width = params["box"]
        is_mask = isinstance(inpt, tv_tensors.Mask)
        interpolation = v2.InterpolationMode.NEAREST if is_mask else v2.InterpolationMode.BILINEAR
        output = self._call_kernel(F.resized_crop, inpt, top, left, height, width, params["window"],
                                   interpolation=interpolation, antialias=not is_mask)
        if any(params["padding"]):
            output = self._call_kernel(F.pad, output, params["padding"], fill=self.mask_fill if is_mask else 0)
        return output


def _randint(high: int) -> int:
    """Uniform in ``0..high`` from torch's generator (which seeded loading controls)."""
    return int(torch.randint(0, high + 1, (1,))) if high > 0 else 0


def normalize() -> v2.Transform:
    """uint8 image -> float normalised with ImageNet mean/std; mask -> int64."""
    return v2.Compose([
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def train_transform(data: DataConfig) -> v2.Transform:
    """Random scale and crop to ``data.crop_size`` (``RandomScaleCrop``: image padded with
    0, mask with 255), horizontal flip, colour jitter, then normalisation."""
    steps: list[v2.Transform] = [RandomScaleCrop(data.crop_size, data.scale_range)]
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
