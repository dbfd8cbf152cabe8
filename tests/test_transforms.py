"""Joint transforms keep image and mask aligned, and masks free of invented values."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from seg.config import DataConfig
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomScaleCrop, eval_transform, train_transform

STEP = 12  # an image pixel holds STEP * its label in every channel


def _encoded_pair(height: int = 96, width: int = 160, block: int = 24, seed: int = 0
                  ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """A blocky mask of labels 0..18 and an image whose pixel values encode that label."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 19, (height // block + 1, width // block + 1), generator=generator)
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:height, :width].to(torch.uint8)
    image = (mask.to(torch.int64) * STEP).to(torch.uint8).expand(3, height, width).clone()
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def _pixel_values(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: back to 0..255 values."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255


def _uniform_neighbourhood(mask: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood holds one mask value: away from every edge,
    the borders included (an edge may lie just outside the crop)."""
    values = nnf.pad(mask.float()[None, None], (radius,) * 4, value=-1.0)
    size = 2 * radius + 1
    high = nnf.max_pool2d(values, size, stride=1)
    low = -nnf.max_pool2d(-values, size, stride=1)
    return (high == low)[0, 0]


def _run(transform, image, mask, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return transform(image, mask)


def test_scale_crop_flip_keep_image_and_mask_aligned() -> None:
    data = DataConfig(crop_size=(80, 112), scale_range=(0.5, 2.0), hflip=True, color_jitter=0.0)
    transform = train_transform(data)
    image, mask = _encoded_pair()
    padded = 0
    for seed in range(12):
        out_image, out_mask = _run(transform, image, mask, seed)
        assert out_image.shape == (3, 80, 112) and out_image.dtype == torch.float32
        assert out_mask.shape == (80, 112) and out_mask.dtype == torch.int64
        values = _pixel_values(out_image)
        interior = _uniform_neighbourhood(out_mask)
        labelled = interior & (out_mask != 255)
        assert labelled.sum() > 200
        decoded = torch.round(values[0] / STEP)
        assert torch.equal(decoded[labelled], out_mask[labelled].float()), f"misaligned for seed {seed}"
        # Padding: label 255 where the image is padded with 0.
        pad = interior & (out_mask == 255)
        padded += int(pad.sum())
        assert torch.all(values[:, pad].abs() < 0.5)
    assert padded > 0  # some crops at scale < 1 needed padding


def test_flip_mirrors_both() -> None:
    data = DataConfig(crop_size=(96, 160), scale_range=(1.0, 1.0), hflip=True, color_jitter=0.0)
    transform = train_transform(data)
    image, mask = _encoded_pair()
    outcomes = set()
    for seed in range(8):
        out_image, out_mask = _run(transform, image, mask, seed)
        flipped = torch.equal(out_mask, mask.flip(-1).long())
        assert flipped or torch.equal(out_mask, mask.long())
        assert torch.equal(torch.round(_pixel_values(out_image)[0] / STEP), out_mask.float())
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_masks_only_hold_original_values_or_255() -> None:
    # Pixel-level noise: any interpolation other than nearest would invent values.
    generator = torch.Generator().manual_seed(0)
    mask = tv_tensors.Mask(torch.randint(0, 4, (50, 70), generator=generator).to(torch.uint8) * 5)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 50, 70), generator=generator, dtype=torch.uint8))
    transform = train_transform(DataConfig(crop_size=(64, 64), scale_range=(0.6, 1.7), color_jitter=0.4))
    allowed = {0, 5, 10, 15, 255}
    for seed in range(10):
        _, out_mask = _run(transform, image, mask, seed)
        assert set(out_mask.unique().tolist()) <= allowed


def test_colour_jitter_changes_the_image_only() -> None:
    image, mask = _encoded_pair()
    plain = train_transform(DataConfig(crop_size=(64, 96), color_jitter=0.0))
    jittered = train_transform(DataConfig(crop_size=(64, 96), color_jitter=0.5))
    image_a, mask_a = _run(plain, image, mask, seed=3)
    image_b, mask_b = _run(jittered, image, mask, seed=3)
    assert torch.equal(mask_a, mask_b)  # geometry is drawn before the jitter
    assert not torch.allclose(image_a, image_b)


def test_eval_transform_normalises_and_rescales() -> None:
    image, mask = _encoded_pair(height=64, width=128)
    out_image, out_mask = eval_transform(DataConfig())(image, mask)
    assert out_image.shape == (3, 64, 128) and torch.equal(out_mask, mask.long())
    expected = (image.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out_image, expected, atol=1e-5)

    half_image, half_mask = eval_transform(DataConfig(eval_scale=0.5))(image, mask)
    assert half_image.shape == (3, 32, 64) and half_mask.shape == (32, 64)
    assert set(half_mask.unique().tolist()) <= set(mask.unique().tolist())
    state = torch.get_rng_state()
    eval_transform(DataConfig(eval_scale=0.5))(image, mask)
    assert torch.equal(state, torch.get_rng_state())  # evaluation draws no random numbers


def test_scale_crop_at_scale_one_is_a_plain_crop_reaching_every_offset() -> None:
    image, mask = _encoded_pair(height=40, width=56, block=4)
    transform = RandomScaleCrop((32, 48))
    offsets = set()
    for seed in range(60):
        out_image, out_mask = _run(transform, image, mask, seed)
        matches = [(top, left) for top in range(9) for left in range(9)
                   if torch.equal(out_mask, mask[top:top + 32, left:left + 48])
                   and torch.equal(out_image, image[:, top:top + 32, left:left + 48])]
        assert matches, f"seed {seed}: not a crop of the input"
        offsets.update(matches)
    tops, lefts = {top for top, _ in offsets}, {left for _, left in offsets}
    assert {0, 8} <= tops and {0, 8} <= lefts  # both ends of the range are drawn


def test_scale_crop_resamples_only_the_window_like_resizing_the_whole_image() -> None:
    """At a fixed scale the crop equals the same window of the whole image resized (the
    old pipeline) up to a pixel of resampling at the borders."""
    image, mask = _encoded_pair(height=60, width=100, block=15)
    for scale in (0.5, 1.5, 2.0):
        transform = RandomScaleCrop((24, 32), (scale, scale))
        whole = F.resize(mask, [round(60 * scale), round(100 * scale)], interpolation=v2.InterpolationMode.NEAREST)
        for seed in range(5):
            _, out_mask = _run(transform, image, mask, seed)
            windows = whole.long().unfold(0, 24, 1).unfold(1, 32, 1)  # every 24x32 window
            best = float((windows == out_mask).float().mean(dim=(-2, -1)).max())
            assert best > 0.97, f"scale {scale} seed {seed}: best agreement {best:.3f}"


def test_scale_crop_pads_a_small_image_at_a_random_offset() -> None:
    image, mask = _encoded_pair(height=20, width=30, block=5)
    transform = RandomScaleCrop((32, 40))
    placements = set()
    for seed in range(20):
        out_image, out_mask = _run(transform, image, mask, seed)
        assert out_mask.shape == (32, 40) and int((out_mask != 255).sum()) == 20 * 30
        rows = torch.nonzero((out_mask != 255).any(1)).flatten()
        cols = torch.nonzero((out_mask != 255).any(0)).flatten()
        top, left = int(rows[0]), int(cols[0])
        assert torch.equal(out_mask[top:top + 20, left:left + 30], mask)
        assert int(out_image[:, out_mask == 255].sum()) == 0
        placements.add((top, left))
    assert len(placements) > 3


def test_scale_crop_reads_a_memory_mapped_hwc_array(tmp_path) -> None:
    """What ``data.cache: disk`` feeds it: a CHW view of an HxWx3 memory map."""
    image, mask = _encoded_pair(height=64, width=96)
    np.save(tmp_path / "image.npy", image.permute(1, 2, 0).numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "image.npy", mmap_mode="c")).permute(2, 0, 1)
    transform = RandomScaleCrop((40, 56), (0.7, 1.3))
    for seed in range(4):
        expected = _run(transform, image, mask, seed)
        got = _run(transform, tv_tensors.Image(mapped), mask, seed)
        assert torch.equal(expected[1], got[1]) and torch.allclose(expected[0].float(), got[0].float(), atol=1)
