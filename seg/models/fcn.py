"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer and Darrell): one class, skips as a parameter.

The head follows the paper and its Caffe reference (fcn.berkeleyvision.org):
- a 1x1 score layer per used stride, initialised to zero (so the initial output is 0
  and the first updates come from the score layers alone);
- x2 upsampling between strides by ConvTranspose2d initialised to bilinear
  interpolation and learned, as in the paper;
- the final upsampling (x32, x16 or x8) fixed to bilinear: the paper fixes it, and its
  authors report that learning it brings nothing. `learn_final_upsample=True` makes it
  learnable. It stays a (frozen) parameter, as in Caffe (lr_mult 0), so parameter
  counts equal the Caffe models';
- alignment by cropping with offsets computed from the backbone's coordinate maps
  (`Backbone.offsets`), never by resizing: output pixel (y, x) is centred on input pixel
  (y, x), and the output has the input's size for any input size. For VGG16 the
  computed offsets are exactly Caffe's (19; 5, 27; 5, 9, 31).

Upsampling kernels: a bilinear ConvTranspose2d of stride f and kernel k puts output
index u at coarse position (u - (k - 1) / 2) / f. With Caffe's VGG16 (half-pixel
offsets) the even kernel k = 2f (Caffe's) gives whole-pixel crops; with "same"-padded
backbones (whole-pixel offsets) only the odd kernel k = 2f - 1 does (3 for x2, 63 for
x32). The kernel is chosen from the backbone's offsets accordingly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.models.backbones import Backbone, build_backbone


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """ConvTranspose2d weight (channels, channels, k, k) that upsamples each channel by
    bilinear interpolation and mixes none (Caffe's `upsample_filt`): the 1-D tent
    1 - |i - centre| / factor, factor = ceil(k / 2), centred on the kernel."""
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    tent = 1 - (torch.arange(kernel_size, dtype=torch.float64) - centre).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = torch.outer(tent, tent).float()
    return weight


def _upsampling_kernel_size(factor: int, shift: float) -> int:
    """Kernel size, 2f or 2f - 1, for which an upsampling by `factor` lands on whole
    pixels: `shift - (k - 1) / 2` (in output samples) must be an integer."""
    for size in (2 * factor, 2 * factor - 1):
        if float(shift - (size - 1) / 2).is_integer():
            return size
    raise ValueError(f"backbone offsets give a shift of {shift} samples: not a multiple of 1/2, "
                     "so no bilinear kernel aligns it; check the backbone's `offsets`")


class FCN(nn.Module):
    """Fully convolutional network over `backbone`, with skip connections from `skips`.

    `skips=()` is FCN-32s, `(16,)` FCN-16s, `(16, 8)` FCN-8s (any strictly decreasing
    strides the backbone provides below 32 work). `forward(x)` returns logits
    `N x num_classes x H x W` for an input `N x 3 x H x W`, for any H, W >= 1.
    """

    def __init__(self, backbone: Backbone, num_classes: int, skips: tuple[int, ...] = (),
                 learn_final_upsample: bool = False) -> None:
        super().__init__()
        strides = (32, *skips)
        if any(s not in backbone.channels for s in strides) or list(strides) != sorted(set(strides), reverse=True):
            raise ValueError(f"skips must be strictly decreasing strides below 32 among "
                             f"{sorted(backbone.channels)}, got {skips}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.skips = tuple(skips)
        self.replicate_border = backbone.replicate_border

        self.score = nn.ModuleDict({str(s): nn.Conv2d(backbone.channels[s], num_classes, 1) for s in strides})
        for layer in self.score.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

        # Walk the strides, tracking the offset of the running score map (the input
        # coordinate of its index 0), to choose kernels and crops once, here.
        offset = backbone.offsets[32]
        self.upsample = nn.ModuleDict()
        self._crops: list[tuple[int, int]] = []  # (crop of upsampled map, crop of skip score) per skip
        for coarse, fine in zip(strides, strides[1:]):
            factor = coarse // fine
            shift = (offset - backbone.offsets[fine]) / fine
            size = _upsampling_kernel_size(factor, shift)
            self.upsample[str(fine)] = self._bilinear(factor, size)
            # Upsampled index u sits at input coordinate fine * (u + d) + offsets[fine]:
            # crop the skip by d if d >= 0, else the upsampled map by -d.
            d = int(shift - (size - 1) / 2)
            self._crops.append((max(-d, 0), max(d, 0)))
            offset = backbone.offsets[fine] + fine * max(d, 0)
        last = strides[-1]
        size = _upsampling_kernel_size(last, offset)
        self.final_upsample = self._bilinear(last, size)
        self.final_upsample.weight.requires_grad_(learn_final_upsample)
        # Output index u sits at input pixel u + offset - (k - 1) / 2.
        self.final_crop = int((size - 1) / 2 - offset)

    def _bilinear(self, factor: int, kernel_size: int) -> nn.ConvTranspose2d:
        layer = nn.ConvTranspose2d(self.num_classes, self.num_classes, kernel_size, stride=factor, bias=False)
        with torch.no_grad():
            layer.weight.copy_(bilinear_kernel(self.num_classes, kernel_size))
        return layer

    @property
    def crop_offsets(self) -> tuple[int, ...]:
        """Crops applied, as in the Caffe models: per skip the crop of the skip's score
        map (or minus the crop of the upsampled map), then the final crop."""
        return (*(skip - up for up, skip in self._crops), self.final_crop)

    def _extend(self, score: Tensor) -> Tensor:
        # One replicated row/column past the last feature centre, so that pixels beyond
        # it are interpolated against it instead of fading to zero (Backbone docstring).
        return F.pad(score, (0, 1, 0, 1), mode="replicate") if self.replicate_border else score

    def _final_upsample(self, score: Tensor) -> Tensor:
        if score.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN's bf16 transposed convolution is 25x slower than fp32 with FCN-32s's
            # 64x64 kernel and 5x with FCN-16s's 32x32 (measured fwd+bwd, 2 threads, AMX);
            # this single layer made a bf16 FCN-32s step 9x slower than fp32. In fp32 it costs
            # what it does without autocast, and the logits are fp32 as the loss wants them.
            with torch.autocast("cpu", enabled=False):
                return self.final_upsample(score.float())
        return self.final_upsample(score)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        score = self.score["32"](features[32])
        for stride, (crop_up, crop_skip) in zip(self.skips, self._crops):
            up = self.upsample[str(stride)](self._extend(score))
            skip = self.score[str(stride)](features[stride])
            h = min(up.shape[2] - crop_up, skip.shape[2] - crop_skip)
            w = min(up.shape[3] - crop_up, skip.shape[3] - crop_skip)
            score = (up[:, :, crop_up:crop_up + h, crop_up:crop_up + w]
                     + skip[:, :, crop_skip:crop_skip + h, crop_skip:crop_skip + w])
        out = self._final_upsample(self._extend(score))
        c = self.final_crop
        # A dense copy (in the memory format the model runs in) rather than a view that
        # would keep the whole uncropped map alive.
        return out[:, :, c:c + x.shape[2], c:c + x.shape[3]].clone(memory_format=torch.preserve_format)


def _fcn(skips: tuple[int, ...], num_classes: int, backbone: str, pretrained: bool,
         weights: str | Path | None) -> FCN:
    return FCN(build_backbone(backbone, pretrained=pretrained, weights=weights), num_classes, skips)


def fcn32s(num_classes: int = 19, backbone: str = "resnet18", pretrained: bool = False,
           weights: str | Path | None = None) -> FCN:
    """FCN-32s: scores at stride 32, upsampled x32 in one step."""
    return _fcn((), num_classes, backbone, pretrained, weights)


def fcn16s(num_classes: int = 19, backbone: str = "resnet18", pretrained: bool = False,
           weights: str | Path | None = None) -> FCN:
    """FCN-16s: stride-32 scores upsampled x2 and added to stride-16 scores, then x16."""
    return _fcn((16,), num_classes, backbone, pretrained, weights)


def fcn8s(num_classes: int = 19, backbone: str = "resnet18", pretrained: bool = False,
          weights: str | Path | None = None) -> FCN:
    """FCN-8s: FCN-16s's fused scores upsampled x2 and added to stride-8 scores, then x8."""
    return _fcn((16, 8), num_classes, backbone, pretrained, weights)
