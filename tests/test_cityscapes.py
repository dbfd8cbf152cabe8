"""The dataset over the official layout: samples, validation of bad data, loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seg.config import Config
from seg.data import cityscapes
from seg.data.cityscapes import CityscapesSegmentation, SeededSampler, build_dataloaders, resolve_data_root
from seg.data.labels import TRAIN_ID_LUT
from seg.errors import ConfigError, DataError

CPU = torch.device("cpu")


@pytest.fixture
def data_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic set, to damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "cityscapes"))


def _first(root: Path, split: str = "train") -> tuple[Path, Path]:
    image = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[0]
    label = root / "gtFine" / split / image.parent.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
    return image, label


# --- reading ---------------------------------------------------------------------------

def test_samples_and_items(synthetic_root: Path) -> None:
    dataset = CityscapesSegmentation(synthetic_root, "train")
    assert len(dataset) == 6 and len(CityscapesSegmentation(synthetic_root, "val")) == 3
    assert [s.image_path for s in dataset.samples] == sorted(s.image_path for s in dataset.samples)
    sample = dataset.samples[0]
    assert sample.stem == "aachen_000000_000019" and sample.city == "aachen"
    assert sample.label_path.name == "aachen_000000_000019_gtFine_labelIds.png"
    image, target = dataset[0]
    assert image.shape == (3, 64, 128) and image.dtype == torch.float32
    assert target.shape == (64, 128) and target.dtype == torch.int64
    assert type(image) is torch.Tensor and type(target) is torch.Tensor  # not tv_tensors
    label_ids = np.asarray(Image.open(sample.label_path))
    assert np.array_equal(target.numpy(), TRAIN_ID_LUT[label_ids])
    assert 255 in target.unique().tolist()  # the ego vehicle, ignored
    assert -2 < float(image.mean()) < 2


def test_cache_returns_the_same_tensors(synthetic_root: Path) -> None:
    cached = CityscapesSegmentation(synthetic_root, "val", cache=True)
    plain = CityscapesSegmentation(synthetic_root, "val")
    for index in range(len(plain)):
        assert torch.equal(cached[index][0], plain[index][0]) and torch.equal(cached[index][1], plain[index][1])
    assert cached.read_image(0) is cached.read_image(0)
    assert cached.read_train_ids(1).dtype == torch.uint8


def test_disk_cache_decodes_once_and_gives_the_same_samples(synthetic_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from seg.data.transforms import train_transform

    transform = train_transform(Config().data.__class__(crop_size=(48, 96), scale_range=(0.5, 1.5)))
    plain = CityscapesSegmentation(synthetic_root, "train", transform)
    cached = CityscapesSegmentation(synthetic_root, "train", transform, cache="disk", cache_dir=tmp_path / "decoded")
    for index in (0, 3, 5):
        for seed in (1, 2):
            got, expected = cached[(index, seed)], plain[(index, seed)]
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    written = {path.name for path in (tmp_path / "decoded" / "train").rglob("*.npy")}
    # labels of every sample (the up-front check of a small split decodes them), images read so far
    assert written == ({f"{sample.stem}_trainIds.npy" for sample in cached.samples}
                       | {f"{cached.samples[i].stem}_leftImg8bit.npy" for i in (0, 3, 5)})
    assert not list((tmp_path / "decoded").rglob("*.tmp"))

    # another process (here: a new dataset) reads the copies and decodes nothing
    expected_target, expected_image = plain[(3, 7)][1], plain.read_image(5)
    monkeypatch.setattr(cityscapes, "_decode_png", lambda *args: pytest.fail("decoded again"))
    again = CityscapesSegmentation(synthetic_root, "train", transform, cache="disk", cache_dir=tmp_path / "decoded",
                                   check_label_ids=False)
    assert torch.equal(again[(3, 7)][1], expected_target)
    assert torch.equal(again.read_image(5), expected_image)


def test_disk_cache_follows_changed_files_and_never_stores_bad_labels(data_copy: Path, tmp_path: Path) -> None:
    decoded = tmp_path / "decoded"
    dataset = CityscapesSegmentation(data_copy, "train", cache="disk", cache_dir=decoded)
    _, label = _first(data_copy)
    ids = np.asarray(Image.open(label)).copy()
    ids[:4, :4] = 7  # road
    Image.fromarray(ids).save(label)
    assert torch.equal(dataset.read_train_ids(0), torch.from_numpy(TRAIN_ID_LUT[ids]))  # the new content
    ids[0, 0] = 200
    Image.fromarray(ids).save(label)
    with pytest.raises(DataError, match=r"label id\(s\) \[200\]") as error:
        CityscapesSegmentation(data_copy, "train", cache="disk", cache_dir=decoded)
    assert str(label) in str(error.value)
    with pytest.raises(DataError, match=r"\[200\]"):  # the stale copy was not used, nor a new one written
        CityscapesSegmentation(data_copy, "train", cache="disk", cache_dir=decoded)


def test_disk_cache_in_an_unwritable_place(synthetic_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"cannot write the decoded copy .*data.cache_dir") as error:
        CityscapesSegmentation(synthetic_root, "val", cache="disk", cache_dir=blocker / "decoded")
    assert str(blocker) in str(error.value)


def test_disk_cache_from_the_config(tiny_config: Config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"data.cache": "disk", "data.cache_dir": str(tmp_path / "decoded")})
    train_loader, val_loader = build_dataloaders(cfg, CPU)
    plain_train, plain_val = build_dataloaders(tiny_config, CPU)
    assert _same(_epoch(train_loader), _epoch(plain_train)) and _same(_epoch(val_loader), _epoch(plain_val))
    assert len(list((tmp_path / "decoded" / "val").rglob("*_leftImg8bit.npy"))) == len(val_loader.dataset)
    with pytest.raises(ConfigError, match="data.cache"):
        tiny_config.with_overrides({"data.cache": "disc"})


def test_seeded_items_are_reproducible_and_leave_the_global_rng_alone(synthetic_root: Path) -> None:
    from seg.data.transforms import train_transform

    cfg = Config().data
    dataset = CityscapesSegmentation(synthetic_root, "train", train_transform(cfg))
    state = torch.get_rng_state()
    first, again, other = dataset[(2, 123)], dataset[(2, 123)], dataset[(2, 124)]
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


# --- bad data --------------------------------------------------------------------------

def test_image_without_label(data_copy: Path) -> None:
    image, label = _first(data_copy)
    label.unlink()
    with pytest.raises(DataError, match="label file .* is missing") as error:
        CityscapesSegmentation(data_copy, "train")
    assert str(image) in str(error.value) and str(label) in str(error.value)


def test_several_problems_are_listed_together(data_copy: Path) -> None:
    for label in sorted(data_copy.glob("gtFine/train/*/*_labelIds.png"))[:3]:
        label.unlink()
    with pytest.raises(DataError, match="3 problems"):
        CityscapesSegmentation(data_copy, "train")


def test_not_a_png(data_copy: Path) -> None:
    image, _ = _first(data_copy)
    image.write_bytes(b"<html>404 Not Found</html>" * 4)
    with pytest.raises(DataError, match="not a PNG") as error:
        CityscapesSegmentation(data_copy, "train")
    assert str(image) in str(error.value)


@pytest.mark.parametrize("which", ["image", "label"])
def test_truncated_png(data_copy: Path, which: str) -> None:
    path = dict(zip(("image", "label"), _first(data_copy)))[which]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as error:
        CityscapesSegmentation(data_copy, "train")
    assert str(path) in str(error.value)


def test_damage_inside_a_complete_png(data_copy: Path) -> None:
    """Valid header and end chunk, damaged pixel data: caught by the chunk CRCs when decoded
    (torchvision's decoder would crash the process on it)."""
    image, label = _first(data_copy)
    for path in (image, label):
        data = bytearray(path.read_bytes())
        start = data.index(b"IDAT") + 20
        data[start:start + 16] = bytes(16)
        path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt PNG .CRC mismatch in its IDAT chunk") as error:
        CityscapesSegmentation(data_copy, "train")  # labels of a small split are decoded up front
    assert str(label) in str(error.value)
    dataset = CityscapesSegmentation(data_copy, "train", check_label_ids=False)
    with pytest.raises(DataError, match="corrupt PNG") as error:
        dataset.read_image(0)  # images are decoded on first read
    assert str(image) in str(error.value)


def test_unknown_label_id_up_front_and_lazily(data_copy: Path) -> None:
    _, label = _first(data_copy)
    ids = np.asarray(Image.open(label)).copy()
    ids[5:9, 5:9] = 200
    ids[0, 0] = 34
    Image.fromarray(ids).save(label)
    with pytest.raises(DataError, match=r"label id\(s\) \[34, 200\]") as error:
        CityscapesSegmentation(data_copy, "train")
    assert str(label) in str(error.value)
    # A large split checks lazily, with the same error on first read.
    dataset = CityscapesSegmentation(data_copy, "train", check_label_ids=False)
    dataset[1]
    with pytest.raises(DataError, match=r"\[34, 200\]") as error:
        dataset[0]
    assert str(label) in str(error.value)


def test_large_splits_check_label_ids_lazily(data_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, label = _first(data_copy)
    Image.fromarray(np.full((64, 128), 99, np.uint8)).save(label)
    monkeypatch.setattr(cityscapes, "LABEL_CHECK_MAX_SAMPLES", 5)
    dataset = CityscapesSegmentation(data_copy, "train")  # 6 samples > 5: no decoding now
    with pytest.raises(DataError, match=str(label)):
        dataset[0]


def test_label_of_another_size(data_copy: Path) -> None:
    image, label = _first(data_copy)
    Image.fromarray(np.zeros((32, 128), np.uint8)).save(label)
    with pytest.raises(DataError, match="differs from its image") as error:
        CityscapesSegmentation(data_copy, "train")
    assert str(label) in str(error.value) and str(image) in str(error.value)


def test_colour_file_in_place_of_label_ids(data_copy: Path) -> None:
    _, label = _first(data_copy)
    shutil.copy(str(label).replace("labelIds", "color"), label)
    with pytest.raises(DataError, match="not an 8-bit single-channel labelIds image"):
        CityscapesSegmentation(data_copy, "train")


def test_badly_named_image(data_copy: Path) -> None:
    image, _ = _first(data_copy)
    wrong = image.with_name("aachen_12_000019_leftImg8bit.png")
    image.rename(wrong)
    with pytest.raises(DataError, match="not named as Cityscapes") as error:
        CityscapesSegmentation(data_copy, "train")
    assert str(wrong) in str(error.value)


def test_empty_and_missing_splits(data_copy: Path) -> None:
    (data_copy / "leftImg8bit" / "empty" / "aachen").mkdir(parents=True)
    with pytest.raises(DataError, match="split is empty"):
        CityscapesSegmentation(data_copy, "empty")
    with pytest.raises(DataError, match="no such split directory.*Splits found: empty, train, val"):
        CityscapesSegmentation(data_copy, "training")


def test_wrong_roots(tmp_path: Path, synthetic_root: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*leftImg8bit"):
        resolve_data_root(tmp_path / "nowhere")
    (tmp_path / "leftImg8bit").mkdir()
    with pytest.raises(DataError, match="no gtFine/ directory"):
        resolve_data_root(tmp_path)
    parent = tmp_path / "downloads"
    parent.mkdir()
    (parent / "cityscapes").symlink_to(synthetic_root)
    with pytest.raises(DataError, match=f"Did you mean {parent / 'cityscapes'}"):
        CityscapesSegmentation(parent, "train")
    assert resolve_data_root(str(synthetic_root)) == synthetic_root.resolve()


def test_none_means_the_embedded_synthetic_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo" / "data" / "synthetic_cityscapes"
    monkeypatch.setattr(cityscapes, "default_synthetic_root", lambda: root)
    monkeypatch.setattr(cityscapes, "DEFAULT_SYNTHETIC", dict(train=2, val=1, height=32, width=64, seed=0))
    assert resolve_data_root(None) == root
    assert len(CityscapesSegmentation(None, "train")) == 2


# --- loaders ---------------------------------------------------------------------------

def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), targets.clone()) for images, targets in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_loader_shapes_and_options(tiny_config: Config) -> None:
    train_loader, val_loader = build_dataloaders(tiny_config, CPU)
    assert len(train_loader) == 3 and train_loader.drop_last and isinstance(train_loader.sampler, SeededSampler)
    images, targets = next(iter(train_loader))
    assert images.shape == (2, 3, 64, 128) and images.dtype == torch.float32
    assert targets.shape == (2, 64, 128) and targets.dtype == torch.int64
    images, targets = next(iter(val_loader))
    assert images.shape == (3, 3, 64, 128) and targets.shape == (3, 64, 128)
    assert not train_loader.pin_memory and not train_loader.persistent_workers
    assert train_loader.prefetch_factor is None

    cuda_cfg = tiny_config.with_overrides({"data.num_workers": 1})
    train_loader, _ = build_dataloaders(cuda_cfg, torch.device("cuda"))  # nothing runs on the device here
    assert train_loader.pin_memory and train_loader.persistent_workers and train_loader.prefetch_factor == 2
    assert train_loader.worker_init_fn is cityscapes.seed_worker
    forced = tiny_config.with_overrides({"data.pin_memory": False})
    assert not build_dataloaders(forced, torch.device("cuda"))[0].pin_memory


def test_batches_are_reproducible_for_a_seed(tiny_config: Config) -> None:
    cfg = tiny_config.with_overrides({"data.scale_range": [0.5, 1.5], "data.crop_size": [48, 96]})
    loader, _ = build_dataloaders(cfg, CPU)
    first, second = _epoch(loader), _epoch(loader)
    assert not _same(first, second)  # a new order and new augmentation every epoch
    again, _ = build_dataloaders(cfg, CPU)
    assert _same(_epoch(again), first) and _same(_epoch(again), second)
    again.sampler.set_epoch(1)  # resuming at the second epoch
    assert _same(_epoch(again), second)
    other, _ = build_dataloaders(cfg.with_overrides({"train.seed": 1}), CPU)
    assert not _same(_epoch(other), first)


def test_workers_give_the_same_batches_as_the_main_process(tiny_config: Config) -> None:
    cfg = tiny_config.with_overrides({"data.scale_range": [0.5, 1.5], "data.crop_size": [48, 96]})
    in_process, _ = build_dataloaders(cfg, CPU)
    workers, _ = build_dataloaders(cfg.with_overrides({"data.num_workers": 2}), CPU)
    assert _same(_epoch(workers), _epoch(in_process))
    assert _same(_epoch(workers), _epoch(in_process))  # persistent workers, second epoch


def test_batch_larger_than_the_split(tiny_config: Config) -> None:
    with pytest.raises(ConfigError, match="data.batch_size=7"):
        build_dataloaders(tiny_config.with_overrides({"data.batch_size": 7}), CPU)
