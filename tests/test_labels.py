"""The label tables against the official cityscapesscripts table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as official

from seg.data.labels import (CLASS_NAMES, LABEL_ID_LUT, PALETTE, TRAIN_ID_LUT, VALID_LABEL_IDS, colorize,
                             label_ids_to_train_ids, train_ids_to_label_ids)


def test_every_official_label_id_maps_to_its_train_id_or_255() -> None:
    for label in official:
        if label.id < 0:
            continue  # license plate: never drawn into label files
        expected = 255 if label.ignoreInEval else label.trainId
        assert TRAIN_ID_LUT[label.id] == expected, label.name


def test_ignored_labels_map_to_255_and_evaluated_ones_to_0_to_18() -> None:
    ignored = [label.id for label in official if label.ignoreInEval and label.id >= 0]
    evaluated = [label.id for label in official if not label.ignoreInEval]
    assert len(evaluated) == 19
    assert all(TRAIN_ID_LUT[i] == 255 for i in ignored)
    assert sorted(TRAIN_ID_LUT[evaluated].tolist()) == list(range(19))


def test_undefined_ids_are_invalid_and_ignored() -> None:
    assert VALID_LABEL_IDS == frozenset(range(34))
    assert np.all(TRAIN_ID_LUT[34:] == 255)


def test_class_names_are_in_train_id_order() -> None:
    by_train_id = {label.trainId: label.name for label in official if not label.ignoreInEval}
    assert CLASS_NAMES == tuple(by_train_id[i] for i in range(19))
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[-1] == "bicycle"


def test_round_trip_train_id_label_id_train_id() -> None:
    train_ids = np.array(list(range(19)) + [255], dtype=np.uint8)
    label_ids = train_ids_to_label_ids(train_ids)
    assert label_ids[-1] == 0  # 255 -> unlabeled, which the official evaluation counts as a miss
    assert np.array_equal(label_ids_to_train_ids(label_ids), train_ids)
    for label in official:
        if not label.ignoreInEval:
            assert LABEL_ID_LUT[label.trainId] == label.id


def test_tensors_keep_their_type_and_device() -> None:
    prediction = torch.tensor([[0, 13], [18, 255]], dtype=torch.int64)
    label_ids = train_ids_to_label_ids(prediction)
    assert isinstance(label_ids, torch.Tensor) and label_ids.dtype == torch.uint8
    assert label_ids.tolist() == [[7, 26], [33, 0]]
    assert label_ids_to_train_ids(label_ids).tolist() == [[0, 13], [18, 255]]


def test_out_of_range_values_are_refused_not_wrapped() -> None:
    with pytest.raises(ValueError, match="0..255"):
        label_ids_to_train_ids(np.array([-1, 7]))
    with pytest.raises(ValueError, match="0..255"):
        train_ids_to_label_ids(torch.tensor([300]))


def test_colorize_uses_the_official_colours() -> None:
    train_ids = np.array([[0, 10], [13, 255]], dtype=np.uint8)
    image = colorize(torch.from_numpy(train_ids))
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    colours = {label.trainId: label.color for label in official if not label.ignoreInEval}
    assert tuple(image[0, 0]) == colours[0] and tuple(image[0, 1]) == colours[10]
    assert tuple(image[1, 0]) == colours[13] and tuple(image[1, 1]) == (0, 0, 0)
    assert all(tuple(PALETTE[i]) == colours[i] for i in range(19))
