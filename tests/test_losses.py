"""Cross entropy: ignore handling, the (weighted) mean, class weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from seg.config import Config
from seg.errors import ConfigError, DataError
from seg.losses import build_loss, median_frequency_weights


def random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 19, 6, 8, generator=generator)
    target = torch.randint(0, 19, (2, 6, 8), generator=generator)
    target[torch.rand(2, 6, 8, generator=generator) < 0.3] = 255
    return logits, target


def test_matches_pytorch_cross_entropy_unweighted_and_weighted() -> None:
    logits, target = random_batch()
    assert torch.allclose(build_loss()(logits, target), nn.CrossEntropyLoss(ignore_index=255)(logits, target))
    weights = torch.rand(19) + 0.1
    expected = nn.CrossEntropyLoss(weight=weights, ignore_index=255)(logits, target)
    assert torch.allclose(build_loss(None, weights)(logits, target), expected)


def test_mean_is_over_valid_pixels_only() -> None:
    logits = torch.zeros(1, 19, 2, 2)  # uniform: every valid pixel costs log(19)
    target = torch.tensor([[[3, 255], [255, 255]]])
    assert build_loss()(logits, target).item() == pytest.approx(math.log(19))


def test_weighted_mean_divides_by_the_sum_of_weights() -> None:
    logits = torch.zeros(1, 19, 1, 3)
    logits[0, 0, 0, 0] = 2.0  # pixel 0 (class 0) is confident; pixel 1 (class 1) uniform
    target = torch.tensor([[[0, 1, 255]]])
    weights = torch.ones(19)
    weights[1] = 3.0
    loss_0 = -torch.log_softmax(logits[0, :, 0, 0], 0)[0].item()
    loss_1 = math.log(19)
    assert build_loss(None, weights)(logits, target).item() == pytest.approx((loss_0 + 3 * loss_1) / 4)


def test_all_ignored_batch_gives_zero_loss_and_zero_gradient() -> None:
    logits = torch.randn(2, 19, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    for loss_fn in (build_loss(), build_loss(None, torch.ones(19))):
        loss = loss_fn(logits, target)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(logits.grad, torch.zeros_like(logits))
        logits.grad = None


def test_low_precision_logits_give_a_float32_loss() -> None:
    logits, target = random_batch()
    loss = build_loss()(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(build_loss()(logits, target).item(), rel=2e-2)


def test_build_loss_checks_weights_and_config() -> None:
    cfg = Config().with_overrides({"train.class_weights": "median_frequency"})
    with pytest.raises(ConfigError, match="median_frequency_weights"):
        build_loss(cfg)
    assert build_loss(cfg, torch.ones(19)).weight is not None
    assert build_loss(Config()).weight is None
    with pytest.raises(ValueError, match="19 values"):
        build_loss(None, torch.ones(18))
    with pytest.raises(ValueError, match=">= 0"):
        build_loss(None, -torch.ones(19))


def test_weights_move_with_the_module() -> None:
    loss_fn = build_loss(None, torch.ones(19))
    assert "weight" in dict(loss_fn.named_buffers())


def test_median_frequency_hand_computed() -> None:
    labels = [np.array([[0, 0], [0, 1]]), torch.tensor([[1, 1], [255, 255]])]
    # f0 = 3 / 4 (image 1 has 4 valid pixels); f1 = (1 + 2) / (4 + 2); median(f) = 0.625
    weights = median_frequency_weights(labels)
    assert weights.shape == (19,) and weights.dtype == torch.float32
    assert weights[0].item() == pytest.approx(0.625 / 0.75)
    assert weights[1].item() == pytest.approx(0.625 / 0.5)
    assert torch.all(weights[2:] == 0)  # absent classes


def test_median_frequency_reads_the_label_files_of_a_dataset(tmp_path: Path) -> None:
    from seg.data.cityscapes import CityscapesSegmentation

    # labelIds on disk: 7 road (trainId 0), 8 sidewalk (1), 0 unlabeled (ignored), 26 car (13)
    for index, array in enumerate([[[7, 7], [7, 8]], [[8, 8], [0, 0]], [[26, 7], [0, 0]]]):
        stem = f"x_000000_{index:06d}"
        for folder, suffix, data in (("gtFine", "_gtFine_labelIds.png", np.array(array, dtype=np.uint8)),
                                     ("leftImg8bit", "_leftImg8bit.png", np.zeros((2, 2, 3), dtype=np.uint8))):
            path = tmp_path / folder / "train" / "x" / f"{stem}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data).save(path)
    dataset = CityscapesSegmentation(tmp_path, "train")
    from_files = median_frequency_weights(dataset)
    from_arrays = median_frequency_weights([np.array([[0, 0], [0, 1]]), np.array([[1, 1], [255, 255]]),
                                            np.array([[13, 0], [255, 255]])])
    assert torch.allclose(from_files, from_arrays)
    # f0 = (3 + 1) / (4 + 2), f1 = 3 / 6, f13 = 1 / 2 -> median 1/2
    assert from_files[0].item() == pytest.approx(0.5 / (4 / 6))
    assert from_files[13].item() == pytest.approx(1.0)


def test_median_frequency_refuses_label_ids() -> None:
    with pytest.raises(DataError, match="trainIds"):
        median_frequency_weights([np.array([[7, 26]])])


def test_median_frequency_on_the_synthetic_dataset(synthetic_root: Path) -> None:
    from seg.data.cityscapes import CityscapesSegmentation
    from seg.data.labels import label_ids_to_train_ids

    dataset = CityscapesSegmentation(synthetic_root, "train")
    weights = median_frequency_weights(dataset)
    maps = [label_ids_to_train_ids(np.asarray(Image.open(sample.label_path))) for sample in dataset.samples]
    assert torch.allclose(weights, median_frequency_weights(maps))
    present = weights > 0
    assert present.any() and torch.isfinite(weights).all()
    assert torch.median(weights[present]).item() == pytest.approx(1.0, abs=0.5)
