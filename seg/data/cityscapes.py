"""Cityscapes semantic segmentation over the official directory layout.

::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq:06d>_<frame:06d>_gtFine_labelIds.png

Label files hold labelIds; samples come out as trainIds (19 classes, 255 ignored).

Bad data fails when the dataset is built, before any training, with a ``DataError``
naming the file. What is checked, and when:

* up front, for every sample (cheap: a few hundred bytes read per file, so a second or
  two for the 2975 training images of real Cityscapes): file naming, that every image
  has its label file, that both are PNGs (signature and header), that neither is
  truncated (each must end with the PNG end chunk, IEND, which an interrupted download
  or copy loses), that the label is an 8-bit single-channel labelIds image, and that
  image and label have the same size;
* up front for splits of at most ``LABEL_CHECK_MAX_SAMPLES`` samples, else lazily on
  first read: decoding the label file and checking that every pixel holds a labelId
  Cityscapes defines. The lazy check raises the same ``DataError``;
* on every decode: the CRC of every PNG chunk, so damage inside a file (which the
  header checks cannot see) is a ``DataError`` too, never a crash of the decoder.
  Images are decoded on first read, so a damaged image with an intact header and end
  surfaces then, naming the file; labels of small splits are decoded up front.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png, read_file

from seg.config import Config
from seg.data.labels import CHECKED_TRAIN_ID_LUT, UNDEFINED_LABEL_ID, VALID_LABEL_IDS
from seg.data.synthetic import DEFAULT_SYNTHETIC, default_synthetic_root, ensure_synthetic_cityscapes
from seg.data.transforms import eval_transform, normalize, train_transform
from seg.errors import ConfigError, DataError
from seg.paths import atomic_write

# Decoding every label file up front costs ~10 ms each at full Cityscapes resolution:
# fine for val (500), too slow to repeat for every trial on train (2975).
LABEL_CHECK_MAX_SAMPLES = 500

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
_STEM = re.compile(r"^(?P<city>[^_]+)_(?P<seq>\d{6})_(?P<frame>\d{6})$")
_LAYOUT = ("<root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
           "<root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png")
# At most this many problems are listed in one error; the rest are counted.
_MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``stem`` is ``{city}_{seq:06d}_{frame:06d}``."""
    image_path: Path
    label_path: Path
    stem: str
    city: str


def resolve_data_root(root: str | Path | None) -> Path:
    """The absolute data root: ``root`` checked, or for None the embedded synthetic set.

    None means ``<repo>/data/synthetic_cityscapes``, generated on first use with
    ``DEFAULT_SYNTHETIC`` (atomically: concurrent processes are safe). An explicit root
    must exist and contain ``leftImg8bit/`` and ``gtFine/``; otherwise ``DataError``.
    """
    if root is None:
        path = default_synthetic_root()
        if not path.exists():
            ensure_synthetic_cityscapes(path, **DEFAULT_SYNTHETIC)
        hint = (f"The embedded synthetic set looks damaged: delete {path} and it will be generated again "
                f"(or run scripts/make_synthetic_cityscapes.py --force).")
    else:
        path = Path(root).expanduser().resolve()
        hint = ("Set data.root to the directory that holds leftImg8bit/ and gtFine/, "
                "or leave it null to use the synthetic data set.")
    if not path.is_dir():
        raise DataError(f"data root {path} does not exist{' or is not a directory' if path.exists() else ''}. "
                        f"Expected the Cityscapes layout {_LAYOUT}. {hint}")
    missing = [name for name in ("leftImg8bit", "gtFine") if not (path / name).is_dir()]
    if missing:
        nested = [child for child in sorted(path.iterdir())
                  if (child / "leftImg8bit").is_dir() and (child / "gtFine").is_dir()]
        guess = f" Did you mean {nested[0]}?" if nested else ""
        raise DataError(f"data root {path} has no {' and no '.join(m + '/' for m in missing)} directory. "
                        f"Expected the Cityscapes layout {_LAYOUT}.{guess} {hint}")
    return path


class CityscapesSegmentation(Dataset):
    """Cityscapes images with trainId targets, validated when built (see the module doc).

    ``dataset[i]`` is ``(image, target)``: a float 3xHxW image normalised with the
    ImageNet statistics and an int64 HxW tensor of trainIds (255 ignored), after
    ``transform(image, mask)`` (default: normalisation only). ``dataset[(i, seed)]``
    runs the transform with torch's CPU generator seeded by ``seed`` (and restored
    afterwards), which makes the augmentation of a sample a function of that seed,
    whichever process loads it; ``SeededSampler`` yields such pairs.

    ``cache``: ``True`` (or ``"memory"``) keeps the decoded uint8 image and trainIds of
    every sample read in memory (per process: each DataLoader worker fills its own);
    ``"disk"`` writes them once to ``cache_dir`` as ``.npy`` files (image HxWx3, trainIds
    HxW) and from then on reads them memory-mapped, so a transform that crops first
    (``RandomScaleCrop``) reads only its window and nothing is decoded again, in any
    process or later run. A copy older than its PNG is written again.
    ``check_label_ids``: decode all label files now and check their ids (True), or on
    first read (False); None picks True for splits of at most ``LABEL_CHECK_MAX_SAMPLES``.
    """

    def __init__(self, root: str | Path | None, split: str,
                 transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                 cache: bool | str = False, check_label_ids: bool | None = None,
                 cache_dir: str | Path | None = None):
        self.root = resolve_data_root(root)
        self.split = split
        self.transform = transform if transform is not None else normalize()
        if cache not in (False, True, "memory", "disk"):
            raise ConfigError(f"data.cache must be false, true, memory or disk, got {cache!r}")
        self.cache = "memory" if cache is True else cache
        self.cache_dir = (Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir(self.root)) \
            if self.cache == "disk" else None
        self._images: dict[int, torch.Tensor] = {}
        self._train_ids: dict[int, torch.Tensor] = {}
        self.samples: list[Sample] = _find_samples(self.root, split)
        _check_headers(self.samples)
        if check_label_ids is None:
            check_label_ids = len(self.samples) <= LABEL_CHECK_MAX_SAMPLES
        if check_label_ids:
            problems = []
            for index in range(len(self.samples)):
                try:
                    self.read_train_ids(index)
                except DataError as error:
                    problems.append(str(error))
            _raise_if_any(problems, f"split '{split}' of {self.root}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        image = tv_tensors.Image(self.read_image(index))
        mask = tv_tensors.Mask(self.read_train_ids(index))
        if seed is None:
            image, mask = self.transform(image, mask)
        else:
            # Only the CPU generator: the transforms draw from it, and seeding CUDA here
            # would disturb the training RNG when loading in the main process.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def read_image(self, index: int) -> torch.Tensor:
        """The decoded image, uint8 3xHxW RGB (cached or memory-mapped: do not modify it)."""
        index = range(len(self.samples))[index]
        if index in self._images:
            return self._images[index]
        sample = self.samples[index]
        if self.cache == "disk":
            decoded = self._decoded_path(sample, "leftImg8bit")
            if not _is_fresh(decoded, sample.image_path):
                image = _decode_png(sample.image_path, ImageReadMode.RGB)
                _save_atomically(decoded, image.permute(1, 2, 0).numpy(), sample.image_path)
            return torch.from_numpy(np.load(decoded, mmap_mode="c")).permute(2, 0, 1)
        image = _decode_png(sample.image_path, ImageReadMode.RGB)
        if self.cache == "memory":
            self._images[index] = image
        return image

    def read_train_ids(self, index: int) -> torch.Tensor:
        """The label as trainIds, uint8 HxW (255 ignored; cached like ``read_image``).
        DataError if the file holds an id Cityscapes does not define."""
        index = range(len(self.samples))[index]
        if index in self._train_ids:
            return self._train_ids[index]
        sample = self.samples[index]
        if self.cache == "disk":
            decoded = self._decoded_path(sample, "trainIds")
            if _is_fresh(decoded, sample.label_path):  # written only after the check below passed
                return torch.from_numpy(np.load(decoded, mmap_mode="c"))
        path = sample.label_path
        label_ids = _decode_png(path, ImageReadMode.UNCHANGED)[0].numpy()
        train_ids = CHECKED_TRAIN_ID_LUT[label_ids]  # one uint8 lookup maps and checks
        undefined = train_ids == UNDEFINED_LABEL_ID
        if undefined.any():
            unknown = np.unique(label_ids[undefined]).tolist()
            raise DataError(f"{path}: label id(s) {unknown} are not Cityscapes labelIds (valid: "
                            f"{min(VALID_LABEL_IDS)}..{max(VALID_LABEL_IDS)}). Is this a _gtFine_labelIds.png "
                            f"file (not _labelTrainIds, _color or _instanceIds)?")
        if self.cache == "disk":
            _save_atomically(decoded, train_ids, path)
        train_ids = torch.from_numpy(train_ids)
        if self.cache == "memory":
            self._train_ids[index] = train_ids
        return train_ids

    def _decoded_path(self, sample: Sample, kind: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / self.split / sample.city / f"{sample.stem}_{kind}.npy"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, {len(self)} images)"


def default_cache_dir(root: Path) -> Path:
    """Where ``cache: disk`` keeps decoded copies of the data set at ``root`` by default:
    ``<repo>/data/decoded/<root name>-<hash of its path>`` (so a read-only data root works)."""
    digest = hashlib.sha1(str(Path(root).absolute()).encode()).hexdigest()[:8]
    return Path(__file__).resolve().parents[2] / "data" / "decoded" / f"{Path(root).name}-{digest}"


def _is_fresh(decoded: Path, source: Path) -> bool:
    """A decoded copy carries its source's modification time: any change to the source
    (re-extracted with older times included) makes the copy stale."""
    try:
        return decoded.stat().st_mtime_ns == source.stat().st_mtime_ns
    except OSError:  # no copy yet, or cache_dir not usable (reported when writing)
        return False


def _save_atomically(path: Path, array: np.ndarray, source: Path) -> None:
    """Write ``array`` as ``path`` (.npy) with ``source``'s modification time, so that
    concurrent readers and writers (loader workers, parallel trials) see either no file
    or a whole one."""
    try:
        source_time = source.stat().st_mtime_ns
        with atomic_write(path) as file:
            np.save(file, np.ascontiguousarray(array))
            file.flush()  # before stamping: a later flush would set the time again
            os.utime(file.fileno(), ns=(source_time, source_time))
    except OSError as error:
        raise DataError(f"cannot write the decoded copy {path} ({error}): free disk space, set data.cache_dir "
                        f"to a writable directory with room, or set data.cache to false or memory") from None


def _find_samples(root: Path, split: str) -> list[Sample]:
    """Every image of a split with its label path, sorted; DataError for a bad layout."""
    image_root = root / "leftImg8bit" / split
    if not image_root.is_dir():
        found = sorted(p.name for p in (root / "leftImg8bit").iterdir() if p.is_dir())
        raise DataError(f"{image_root}: no such split directory. Splits found: {', '.join(found) or 'none'}. "
                        f"Check data.train_split / data.val_split.")
    samples, problems = [], []
    for image_path in sorted(image_root.glob(f"*/*{IMAGE_SUFFIX}")):
        city = image_path.parent.name
        stem = image_path.name[:-len(IMAGE_SUFFIX)]
        match = _STEM.match(stem)
        if match is None or match["city"] != city:
            problems.append(f"{image_path}: not named as Cityscapes names images "
                            f"({city}/{city}_<seq:06d>_<frame:06d>{IMAGE_SUFFIX})")
            continue
        label_path = root / "gtFine" / split / city / f"{stem}{LABEL_SUFFIX}"
        if not label_path.is_file():
            problems.append(f"{image_path}: its label file {label_path} is missing")
            continue
        samples.append(Sample(image_path=image_path, label_path=label_path, stem=stem, city=city))
    _raise_if_any(problems, f"split '{split}' of {root}")
    if not samples:
        raise DataError(f"{image_root}: the split is empty (no <city>/*{IMAGE_SUFFIX} files). "
                        f"Expected the Cityscapes layout {_LAYOUT}.")
    return samples


@dataclass(frozen=True)
class PngHeader:
    """What a PNG's IHDR chunk says about its pixels."""
    height: int
    width: int
    bit_depth: int
    colour_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk with its CRC: always the last 12 bytes


def read_png_header(path: Path) -> PngHeader:
    """Read a PNG's size and pixel format from its first 33 bytes, and check that the
    file ends with the IEND chunk (a truncated file does not). DataError otherwise."""
    try:
        with open(path, "rb") as file:
            head = file.read(33)
            size = os.fstat(file.fileno()).st_size
            tail = b""
            if size >= len(head) + len(_PNG_END):
                file.seek(-len(_PNG_END), os.SEEK_END)
                tail = file.read(len(_PNG_END))
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        what = "an empty file" if size == 0 else "not a PNG file"
        raise DataError(f"{path}: {what}. Cityscapes images and labels are PNGs; re-extract the file.")
    if tail != _PNG_END:
        raise DataError(f"{path}: truncated PNG (it does not end with the IEND chunk), e.g. from an "
                        f"interrupted download or copy. Re-extract the file.")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return PngHeader(height=height, width=width, bit_depth=head[24], colour_type=head[25])


def _check_headers(samples: list[Sample]) -> None:
    problems = []
    for sample in samples:
        try:
            image = read_png_header(sample.image_path)
            label = read_png_header(sample.label_path)
        except DataError as error:
            problems.append(str(error))
            continue
        if image.bit_depth > 8:
            problems.append(f"{sample.image_path}: {image.bit_depth}-bit PNG; leftImg8bit images are 8-bit")
        if label.colour_type != 0 or label.bit_depth != 8:
            problems.append(f"{sample.label_path}: not an 8-bit single-channel labelIds image "
                            f"(PNG colour type {label.colour_type}, {label.bit_depth}-bit). "
                            f"Is it a _gtFine_color or _gtFine_instanceIds file?")
        elif (image.height, image.width) != (label.height, label.width):
            problems.append(f"{sample.label_path}: size {label.width}x{label.height} differs from its image "
                            f"{sample.image_path} ({image.width}x{image.height})")
    _raise_if_any(problems, "the data set")


def _raise_if_any(problems: list[str], where: str) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise DataError(problems[0])
    listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    raise DataError(f"{len(problems)} problems in {where}:\n  {listed}"
                    + (f"\n  ... and {more} more" if more > 0 else ""))


def _decode_png(path: Path, mode: ImageReadMode) -> torch.Tensor:
    """Decode with torchvision (2-3x faster than PIL), after checking every chunk's CRC.

    torchvision 0.29's ``decode_png`` kills the process (segfault) on any libpng error
    instead of raising, so corrupt bytes must never reach it. A CRC check costs ~1 ms
    for a full-size Cityscapes image (2% of decoding) and catches any damage done to a
    file after it was written; only a file written corrupt, with valid CRCs, is missed.
    """
    try:
        data = read_file(str(path))
    except (RuntimeError, OSError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from None
    _check_png_chunks(path, memoryview(data.numpy()))
    try:
        return decode_png(data, mode=mode)
    except RuntimeError as error:
        raise DataError(f"{path}: cannot be decoded as PNG ({error}). The file is corrupt; re-extract it.") from None


def _check_png_chunks(path: Path, data: memoryview) -> None:
    """Walk the PNG's chunks up to IEND, checking each one's length and CRC."""
    if bytes(data[:8]) != _PNG_SIGNATURE:
        raise DataError(f"{path}: not a PNG file. Cityscapes images and labels are PNGs; re-extract the file.")
    position = len(_PNG_SIGNATURE)
    while True:
        if position + 12 > len(data):
            raise DataError(f"{path}: truncated PNG (no IEND chunk). Re-extract the file.")
        length = int.from_bytes(data[position:position + 4], "big")
        end = position + 12 + length
        if end > len(data):
            raise DataError(f"{path}: truncated PNG (a chunk runs past the end of the file). Re-extract the file.")
        kind = bytes(data[position + 4:position + 8])
        if zlib.crc32(data[position + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise DataError(f"{path}: corrupt PNG (CRC mismatch in its {kind.decode('latin-1')} chunk at byte "
                            f"{position}). Re-extract the file.")
        if kind == b"IEND":
            return
        position = end


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation seed)`` pairs; the order (shuffled or not) and the
    seeds are a function of ``(seed, epoch)`` alone.

    So a run sees the same batches for the same seed whether the data is loaded in the
    main process or by any number of workers. The epoch advances by one on every pass;
    ``set_epoch`` sets it (e.g. when resuming from a checkpoint).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        entropy = np.random.SeedSequence([self.seed % 2**64, self.epoch]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
        self.epoch += 1
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return iter(list(zip(order.tolist(), seeds.tolist())))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and random from the worker's torch seed,
    which the loader derives from its seeded generator, so they are reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloaders(cfg: Config, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders for ``cfg.data`` on ``resolve_data_root(cfg.data.root)``.

    The train loader augments (``train_transform``), shuffles with ``SeededSampler``
    seeded from ``cfg.train.seed`` and drops the last incomplete batch; the validation
    loader applies ``eval_transform`` in file order. ``pin_memory=None`` pins when
    ``device`` is CUDA; persistent workers and prefetching apply only with workers.
    """
    data = cfg.data
    root = resolve_data_root(data.root)
    cache = dict(cache=data.cache, cache_dir=data.cache_dir)
    train_set = CityscapesSegmentation(root, data.train_split, train_transform(data), **cache)
    val_set = CityscapesSegmentation(root, data.val_split, eval_transform(data), **cache)
    if len(train_set) < data.batch_size:
        raise ConfigError(f"data.batch_size={data.batch_size} is larger than the {len(train_set)} images of split "
                          f"'{data.train_split}' in {root}: no full batch could be made. Lower data.batch_size.")
    pin_memory = device.type == "cuda" if data.pin_memory is None else data.pin_memory
    workers = data.num_workers
    loader_options = dict(
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker if workers > 0 else None,
        persistent_workers=data.persistent_workers and workers > 0,
        prefetch_factor=data.prefetch_factor if workers > 0 else None,
    )
    # Each loader draws its workers' base seed from its own generator: without one it would
    # draw from torch's global RNG on every pass, shifting the model's random numbers.
    train_loader = DataLoader(
        train_set, batch_size=data.batch_size, sampler=SeededSampler(len(train_set), cfg.train.seed),
        drop_last=True, generator=torch.Generator().manual_seed(cfg.train.seed), **loader_options)
    val_loader = DataLoader(
        val_set, batch_size=data.eval_batch_size, shuffle=False, drop_last=False,
        generator=torch.Generator().manual_seed(cfg.train.seed), **loader_options)
    return train_loader, val_loader
