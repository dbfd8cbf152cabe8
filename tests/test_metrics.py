"""Metric values against hand-computed cases and against the official Cityscapes formulas."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from seg.data.labels import CLASS_NAMES
from seg.metrics import ConfusionMatrix, confusion_matrix, segmentation_metrics

NAMES3 = ("a", "b", "c")


def metrics3(pred: list[int], target: list[int]) -> dict:
    cm = confusion_matrix(torch.tensor(pred), torch.tensor(target), num_classes=3)
    return segmentation_metrics(cm, NAMES3)


def test_hand_computed_iou_and_accuracies() -> None:
    # class a: TP 2, FN 1 (predicted b), FP 0 -> 2/3
    # class b: TP 1, FN 1 (predicted c), FP 1 -> 1/3
    # class c: TP 1, FN 0, FP 1 -> 1/2; the ignored pixel (predicted a) counts nowhere
    target = [0, 0, 0, 1, 1, 2, 255]
    pred = [0, 0, 1, 1, 2, 2, 0]
    cm = confusion_matrix(torch.tensor(pred), torch.tensor(target), num_classes=3)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]
    m = segmentation_metrics(cm, NAMES3)
    assert m["iou"] == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 1 / 2})
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_invalid_predictions_are_misses_not_false_positives() -> None:
    # 255, 7 and -1 are no class: misses for the GT class, false positives of nothing
    m = metrics3(pred=[255, 7, -1, 1], target=[0, 0, 0, 1])
    assert m["iou"]["a"] == 0.0
    assert m["iou"]["b"] == 1.0
    assert math.isnan(m["iou"]["c"])
    assert m["miou"] == pytest.approx(0.5)
    assert m["pixel_accuracy"] == pytest.approx(1 / 4)
    cm = confusion_matrix(torch.tensor([255, 7, -1, 1]), torch.tensor([0, 0, 0, 1]), num_classes=3)
    assert cm[:, 3].tolist() == [3, 0, 0]


def test_classes_absent_from_gt_and_prediction_are_nan_and_excluded() -> None:
    m = metrics3(pred=[0, 0, 1], target=[0, 0, 1])
    assert math.isnan(m["iou"]["c"])
    assert m["miou"] == 1.0
    assert m["mean_class_accuracy"] == 1.0


def test_class_only_predicted_scores_zero_and_counts_in_the_mean() -> None:
    m = metrics3(pred=[0, 2], target=[0, 0])
    assert m["iou"] == pytest.approx({"a": 0.5, "b": math.nan, "c": 0.0}, nan_ok=True)
    assert m["miou"] == pytest.approx(0.25)
    assert m["mean_class_accuracy"] == pytest.approx(0.5)  # over classes present in GT only


def test_predictions_on_ignored_gt_are_not_false_positives() -> None:
    m = metrics3(pred=[1, 2, 0], target=[255, 255, 0])
    assert m["iou"] == pytest.approx({"a": 1.0, "b": math.nan, "c": math.nan}, nan_ok=True)
    assert m["pixel_accuracy"] == 1.0


def test_all_ignored_gives_nan_everywhere() -> None:
    m = metrics3(pred=[0, 1], target=[255, 255])
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_accuracy"]) and math.isnan(m["mean_class_accuracy"])


def test_split_is_accumulated_not_averaged_per_image() -> None:
    images = [([0, 0, 0, 0], [0, 0, 0, 0]),  # (pred, target): per-image mIoU 1
              ([1, 1, 1, 1], [0, 1, 1, 1])]  # per-image IoU a 0, b 3/4 -> mIoU 3/8
    accumulator = ConfusionMatrix(num_classes=3, class_names=NAMES3)
    for pred, target in images:
        accumulator.update(torch.tensor(pred).view(2, 2), torch.tensor(target).view(2, 2))
    m = accumulator.compute()
    # split: a TP 4 FN 1 -> 4/5; b TP 3 FP 1 -> 3/4
    assert m["iou"]["a"] == pytest.approx(4 / 5) and m["iou"]["b"] == pytest.approx(3 / 4)
    assert m["miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    per_image = np.mean([metrics3(pred, target)["miou"] for pred, target in images])
    assert per_image == pytest.approx((1 + 3 / 8) / 2)
    assert m["miou"] != pytest.approx(per_image)
    accumulator.reset()
    assert math.isnan(accumulator.compute()["miou"])


def test_logits_are_reduced_by_argmax() -> None:
    target = torch.randint(0, 19, (2, 5, 7))
    logits = torch.randn(2, 19, 5, 7)
    assert torch.equal(confusion_matrix(logits, target), confusion_matrix(logits.argmax(1), target))
    assert confusion_matrix(logits, target).shape == (19, 20)
    assert int(confusion_matrix(logits, target).sum()) == 70


def test_target_with_unmapped_label_ids_is_an_error() -> None:
    with pytest.raises(ValueError, match="trainIds"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 33]))
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_accumulator_reports_unmapped_label_ids_at_compute() -> None:
    accumulator = ConfusionMatrix(num_classes=3, class_names=NAMES3)
    accumulator.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 255]))
    accumulator.update(torch.tensor([0, 1, 2]), torch.tensor([0, 26, 26]))  # no error yet: no host sync
    with pytest.raises(ValueError, match="2 pixel.*trainIds"):
        accumulator.compute()
    assert int(accumulator.matrix.sum()) == 3  # the valid pixels are still counted
    accumulator.reset()
    accumulator.update(torch.tensor([1]), torch.tensor([1]))
    assert accumulator.compute()["iou"]["b"] == 1.0


def test_default_names_are_the_19_cityscapes_classes() -> None:
    m = ConfusionMatrix().compute()
    assert tuple(m["iou"]) == CLASS_NAMES and len(CLASS_NAMES) == 19
    assert list(segmentation_metrics(torch.zeros(19, 20, dtype=torch.long))["iou"]) == list(CLASS_NAMES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_inputs_device() -> None:
    target = torch.randint(0, 19, (2, 64, 64), device="cuda")
    target[:, :8] = 255
    pred = torch.randint(0, 21, (2, 64, 64), device="cuda")
    cm = confusion_matrix(pred, target)
    assert cm.device.type == "cuda"
    assert torch.equal(cm.cpu(), confusion_matrix(pred.cpu(), target.cpu()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_formulas_on_random_label_ids(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our trainId matrix vs the official labelId matrix and IoU functions, any labelId predicted."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import labels

    generator = np.random.default_rng(seed)
    ids = np.array([label.id for label in labels if label.id >= 0])
    # a few GT classes only, so some IoUs are NaN and some classes are only predicted
    gt_ids = generator.choice(ids, size=8, replace=False)
    gt = generator.choice(gt_ids, size=5000)
    pred = np.where(generator.random(5000) < 0.5, gt, generator.choice(ids, size=5000))

    args = copy.copy(official.args)
    official_cm = official.generateMatrix(args)
    np.add.at(official_cm, (gt, pred), 1)
    expected = {label.name: official.getIouScoreForLabel(label.id, official_cm, args)
                for label in labels if label.id >= 0 and not label.ignoreInEval}
    expected_mean = official.getScoreAverage(expected, args)

    lut = np.full(256, 255, dtype=np.int64)
    for label in labels:
        if 0 <= label.id and label.trainId not in (255, -1):
            lut[label.id] = label.trainId
    m = segmentation_metrics(confusion_matrix(torch.from_numpy(lut[pred]), torch.from_numpy(lut[gt])))
    assert set(m["iou"]) == set(expected)
    for name, value in expected.items():
        assert m["iou"][name] == pytest.approx(value, abs=1e-12, nan_ok=True), name
    assert m["miou"] == pytest.approx(expected_mean, abs=1e-12)
