"""The synthetic data set: official layout, agreement with the official tools, determinism."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.csHelpers import getCsFileInfo
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image

import seg
from seg.data.labels import TRAIN_ID_LUT, VALID_LABEL_IDS
from seg.data.synthetic import (CITIES, DEFAULT_SYNTHETIC, default_synthetic_root, ensure_synthetic_cityscapes,
                                read_synthetic_parameters, write_synthetic_cityscapes)
from seg.errors import DataError

REPO = Path(__file__).resolve().parents[1]
GT_KINDS = ("labelIds", "instanceIds", "color")
NAME = re.compile(r"^(?P<city>[a-z]+)_(?P<seq>\d{6})_(?P<frame>\d{6})_"
                  r"(leftImg8bit\.png|gtFine_(labelIds|instanceIds|color)\.png|gtFine_polygons\.json)$")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_names_follow_the_official_tools(synthetic_root: Path) -> None:
    for split, count in (("train", 6), ("val", 3)):
        images = sorted((synthetic_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == count
        for image in images:
            info = getCsFileInfo(str(image))
            assert info.city == image.parent.name and info.city in CITIES[split]
            assert (info.type, info.ext) == ("leftImg8bit", "png")
            assert len(info.sequenceNb) == 6 and info.frameNb == "000019"
            stem = f"{info.city}_{info.sequenceNb}_{info.frameNb}"
            gt = synthetic_root / "gtFine" / split / info.city
            for kind in GT_KINDS:
                info = getCsFileInfo(str(gt / f"{stem}_gtFine_{kind}.png"))
                assert (info.type, info.type2) == ("gtFine", kind)
            assert (gt / f"{stem}_gtFine_polygons.json").is_file()
    for path in synthetic_root.rglob("*"):
        if path.is_file() and path.name != "synthetic.json":
            assert NAME.match(path.name), path


def test_files_have_the_official_formats_and_sizes(synthetic_root: Path) -> None:
    for image_path in synthetic_root.glob("leftImg8bit/*/*/*.png"):
        stem = image_path.name[:-len("_leftImg8bit.png")]
        gt = synthetic_root / "gtFine" / image_path.parts[-3] / image_path.parent.name / stem
        modes = {kind: Image.open(f"{gt}_gtFine_{kind}.png") for kind in GT_KINDS}
        image = Image.open(image_path)
        assert (image.mode, image.size) == ("RGB", (128, 64))
        assert [modes[k].mode for k in GT_KINDS] == ["L", "I;16", "RGBA"]
        assert all(m.size == (128, 64) for m in modes.values())
        assert set(np.unique(np.asarray(modes["labelIds"])).tolist()) <= VALID_LABEL_IDS


def test_labels_agree_with_the_official_json_converters(synthetic_root: Path) -> None:
    for json_path in synthetic_root.glob("gtFine/*/*/*_gtFine_polygons.json"):
        annotation = Annotation()
        annotation.fromJsonFile(str(json_path))
        prefix = str(json_path)[:-len("polygons.json")]
        assert np.array_equal(np.asarray(createLabelImage(annotation, "ids")),
                              np.asarray(Image.open(prefix + "labelIds.png")))
        assert np.array_equal(np.asarray(createLabelImage(annotation, "color")),
                              np.asarray(Image.open(prefix + "color.png")))
        assert np.array_equal(np.asarray(createInstanceImage(annotation, "ids")).astype(np.int64),
                              np.asarray(Image.open(prefix + "instanceIds.png")).astype(np.int64))


def test_most_classes_occur_and_void_ids_too(synthetic_root: Path) -> None:
    label_ids = np.concatenate([np.asarray(Image.open(p)).ravel()
                                for p in synthetic_root.glob("gtFine/*/*/*_gtFine_labelIds.png")])
    train_ids = set(np.unique(TRAIN_ID_LUT[label_ids]).tolist())
    assert len(train_ids - {255}) >= 17, sorted(train_ids)
    assert 1 in set(label_ids.tolist())  # ego vehicle, mapped to 255
    counts = np.bincount(TRAIN_ID_LUT[label_ids], minlength=256)
    assert 0.01 < counts[255] / counts.sum() < 0.2


def test_generation_is_deterministic_per_seed_and_per_image(synthetic_root: Path, tmp_path: Path) -> None:
    again = write_synthetic_cityscapes(tmp_path / "again", train=6, val=3, height=64, width=128, seed=0)
    assert _files(again) == _files(synthetic_root)
    # The first images do not depend on how many are generated.
    prefix = _files(write_synthetic_cityscapes(tmp_path / "prefix", train=2, val=0, height=64, width=128, seed=0))
    reference = _files(synthetic_root)
    assert all(reference[name] == data for name, data in prefix.items() if name != "synthetic.json")
    other = _files(write_synthetic_cityscapes(tmp_path / "other", train=2, val=0, height=64, width=128, seed=1))
    image = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert other[image] != reference[image]


def test_refuses_to_write_over_a_data_set(synthetic_root: Path) -> None:
    with pytest.raises(FileExistsError):
        write_synthetic_cityscapes(synthetic_root, train=1, val=1, height=64, width=128, seed=0)


def test_ensure_generates_once_and_replaces_only_when_forced(tmp_path: Path) -> None:
    out = tmp_path / "set"
    small = dict(train=2, val=1, height=32, width=64, seed=0)
    assert ensure_synthetic_cityscapes(out, **small) is True
    assert read_synthetic_parameters(out)["train"] == 2
    assert ensure_synthetic_cityscapes(out, **small) is False
    with pytest.raises(DataError, match="other parameters"):
        ensure_synthetic_cityscapes(out, **{**small, "train": 3})
    assert ensure_synthetic_cityscapes(out, force=True, **{**small, "train": 3}) is True
    assert len(list(out.glob("leftImg8bit/train/*/*.png"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no staging or retired copies left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a synthetic data set"):
        ensure_synthetic_cityscapes(foreign, force=True, **small)
    assert (foreign / "thesis.tex").exists()


def test_concurrent_generation_is_safe(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    results, errors = [], []

    def generate() -> None:
        try:
            results.append(ensure_synthetic_cityscapes(out, train=3, val=1, height=32, width=64, seed=0))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=generate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results.count(True) == 1, results  # one set written; the others found it, none replaced it
    assert read_synthetic_parameters(out)["train"] == 3
    assert len(list(out.glob("leftImg8bit/train/*/*.png"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]


def test_default_root_is_in_the_repository() -> None:
    assert default_synthetic_root() == Path(seg.__file__).resolve().parents[1] / "data" / "synthetic_cityscapes"
    assert DEFAULT_SYNTHETIC == dict(train=320, val=64, height=128, width=256, seed=0)


def test_script_writes_then_reports_nothing_to_do(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "scripts" / "make_synthetic_cityscapes.py"), "--out", str(tmp_path / "cs"),
               "--train", "2", "--val", "1", "--test", "1", "--height", "32", "--width", "64", "--seed", "3"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "wrote 2 train, 1 val, 1 test" in first.stdout
    assert len(list((tmp_path / "cs" / "leftImg8bit" / "test").glob("*/*.png"))) == 1
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "nothing to do" in second.stdout
    changed = subprocess.run(command[:-1] + ["4"], capture_output=True, text=True)
    assert changed.returncode == 1 and "--force" in changed.stderr
