"""Part ``loader``: the data pipeline against what training consumes.

Measured for the synthetic set (256x512 PNGs) and for full-size 2048x1024 PNGs written
into a temporary directory, at the benchmark's batch and crop:

* the train loader of ``seg.data.cityscapes.build_dataloaders`` alone (decode, augment,
  collate; after its first batch, whose latency is the workers' start-up), in samples/s,
  for each worker count;
* training alone (a model's training step on in-memory batches), in samples/s consumed;
* training fed by the loader: the share of the time spent blocked on the next batch,
  and the time per step against the bare step (workers compete for the same cores);
* per-sample stage costs in one thread (read + CRC check, PNG decode, label mapping,
  each transform, collate), and alternatives for the costly stages, timed on the same
  samples: a uint8 lookup table for labelIds -> trainIds, cropping before resizing,
  PIL against torchvision decoding;
* the up-front validation of a split (what every trial pays when it builds its loaders).
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from seg.bench.report import Figure, Section, Table
from seg.bench.step import bench_config, model_name
from seg.config import IGNORE_INDEX, Config
from seg.data.labels import TRAIN_ID_LUT, VALID_LABEL_ID_MASK
from seg.probe import probe, train_step

__all__ = ["run_loader_part", "measure_loader", "measure_fed_training", "stage_breakdown",
           "fast_train_ids", "scale_crop_window"]

# labelIds -> trainIds in one uint8 lookup; ids Cityscapes does not define -> this sentinel
_INVALID = 254
_COMBINED_LUT = np.where(VALID_LABEL_ID_MASK, TRAIN_ID_LUT, _INVALID).astype(np.uint8)


def run_loader_part(device: torch.device, threads: int, *, crop=(256, 512), batch: int = 2,
                    workers: tuple[int, ...] = (0, 1, 2), loader_batches: int = 16, train_steps: int = 8,
                    model: tuple[str, str] = ("fcn32s", "resnet18"), full_size: bool = True,
                    full_size_images: int = 4, stage_samples: int = 3, log=print) -> Section:
    started = time.perf_counter()
    section = Section("loader", "2. Data pipeline")
    arch, backbone = model
    name = model_name(arch, backbone)

    # what training consumes: the fastest model of the step part, bare steps
    step = probe(bench_config(arch, backbone, batch, crop, threads, device), timed_steps=3, device=device)
    step_seconds = step.step_seconds
    consumed = batch / step_seconds
    log(f"[loader] training {name}: {step_seconds:.3f} s/step = {consumed:.2f} samples/s consumed")

    datasets: list[tuple[str, str | None]] = [("synthetic 256x512", None)]
    temporary = None
    if full_size:
        from seg.data.synthetic import write_synthetic_cityscapes

        full_size_images = max(full_size_images, batch)  # at least one full batch
        temporary = tempfile.TemporaryDirectory(prefix="seg-bench-fullsize-")
        written = time.perf_counter()
        root = write_synthetic_cityscapes(Path(temporary.name) / "cityscapes", train=full_size_images, val=1,
                                          height=1024, width=2048, seed=0)
        log(f"[loader] wrote {full_size_images + 1} full-size 2048x1024 samples in "
            f"{time.perf_counter() - written:.1f} s")
        datasets.append(("full-size 2048x1024", str(root)))

    rows = []
    try:
        model_state = _TrainingState(bench_config(arch, backbone, batch, crop, threads, device), device)
        for label, root in datasets:
            for count in workers:
                cfg = bench_config(arch, backbone, batch, crop, threads, device,
                                   **{"data.num_workers": count, "data.root": root})
                alone = measure_loader(cfg, device, loader_batches)
                fed = measure_fed_training(cfg, device, model_state, train_steps)
                log(f"[loader] {label}, {count} workers: loader {alone['samples_per_second']:.2f} samples/s "
                    f"(first batch {alone['first_batch_seconds']:.2f} s); fed training waits "
                    f"{100 * fed['wait_fraction']:.1f}% of {fed['seconds_per_step']:.3f} s/step")
                where = f"{label}, {count} worker{'s' if count != 1 else ''}"
                section.figures.append(Figure(
                    f"loader samples/s / training consumption ({where})", alone["samples_per_second"], "samples/s",
                    consumed, f"{name} bare steps", goal=(">=", 2.0), percent=False))
                section.figures.append(Figure(
                    f"time waiting for data / training time ({where})", fed["wait_seconds"], "s",
                    fed["total_seconds"], f"{train_steps} steps fed by the loader", goal=("<=", 0.05)))
                rows.append([label, count, round(alone["samples_per_second"], 2), round(consumed, 2),
                             f"{alone['samples_per_second'] / consumed:.2f}x", round(alone["first_batch_seconds"], 2),
                             round(fed["seconds_per_step"], 3), f"{fed['seconds_per_step'] / step_seconds:.2f}x",
                             f"{100 * fed['wait_fraction']:.1f}%"])
            if label.startswith("synthetic"):
                cfg = bench_config(arch, backbone, batch, crop, threads, device,
                                   **{"data.num_workers": 0, "data.root": root, "data.cache": True})
                alone = measure_loader(cfg, device, loader_batches, warm_epochs=1)
                rows.append([f"{label}, cache=true (warm)", 0, round(alone["samples_per_second"], 2),
                             round(consumed, 2), f"{alone['samples_per_second'] / consumed:.2f}x", "-", "-", "-", "-"])
        del model_state
        section.tables.append(Table(
            f"Loader vs training ({name}, batch {batch}, crop {crop[0]}x{crop[1]}, {threads} training threads)",
            ["images", "workers", "loader samples/s", "consumed samples/s", "loader/consumed", "first batch s",
             "fed s/step", "fed/bare step", "waiting"], rows))

        stage_rows, fix_rows, validation_rows = [], [], []
        for label, root in datasets:
            cfg = bench_config(arch, backbone, batch, crop, threads, device, **{"data.root": root})
            stages = stage_breakdown(cfg, stage_samples)
            stage_rows += [[label, stage, round(ms, 2)] for stage, ms in stages["stages"].items()]
            fix_rows += [[label, fix, round(before, 2), round(after, 2), f"{before / after:.1f}x" if after else "-"]
                         for fix, (before, after) in stages["alternatives"].items()]
            validation_rows.append([label, round(stages["validation_ms_per_sample"], 1),
                                    round(stages["validation_ms_per_sample"] * 500 / 1000, 1),
                                    round(stages["validation_fast_ms_per_sample"], 1),
                                    round(stages["validation_fast_ms_per_sample"] * 500 / 1000, 1)])
            section.data[f"stages {label}"] = stages
            log(f"[loader] {label}: per-sample stages (ms) {', '.join(f'{k} {v:.1f}' for k, v in stages['stages'].items())}")
        section.tables.append(Table("Per-sample cost of each stage, one thread, main process (ms, median)",
                                    ["images", "stage", "ms/sample"], stage_rows))
        section.tables.append(Table(
            "Alternatives measured on the same samples (ms per sample, median; see notes)",
            ["images", "stage: current -> alternative", "current ms", "alternative ms", "speed-up"], fix_rows))
        section.tables.append(Table(
            "Up-front label validation of a split (trial start-up: every trial builds its loaders)",
            ["images", "current ms/image", "500-image val split, s", "with uint8 LUT ms/image", "500 images, s"],
            validation_rows))
    finally:
        if temporary is not None:
            temporary.cleanup()
    section.notes += [
        "Training consumption = batch / bare step time of the model on in-memory batches (no loading), the "
        "most demanding of the step part's models for the loader. Fed training runs the same steps with "
        "batches from the loader; waiting = time blocked in next(loader). With workers on a 2-core machine the "
        "workers and the training threads share the cores, which shows as fed/bare step > 1 rather than as waiting.",
        "Labels: the current path converts the decoded uint8 labelIds to int64 (8 bytes/pixel) and indexes two "
        "tables with it (validity mask, then trainIds); the alternative indexes one uint8 numpy table "
        "(labelId -> trainId, undefined ids -> 254) with the uint8 array and checks for 254.",
        "Scale+crop: the current pipeline resizes the whole image (and mask) by the random scale, then crops; "
        "the alternative picks the crop window in source coordinates (crop size / scale) and resizes only that "
        "window (F.resized_crop; bilinear+antialias for the image, nearest for the mask): the same "
        "distribution of crops, a fraction of the pixels resampled.",
        "Decoded copy: each image decoded once and stored as uint8 HxWx3 .npy (6.3 MB per full-size image, "
        "18.7 GB for the 2975 training images; 4.7 GB at half resolution), read memory-mapped: only the crop "
        "window's rows are touched. Timed with the file in the page cache, as a data set that fits in memory is.",
    ]
    section.seconds = time.perf_counter() - started
    return section


# --- loader and fed training -----------------------------------------------------------------

def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def measure_loader(cfg: Config, device: torch.device, batches: int, warm_epochs: int = 0) -> dict[str, float]:
    """Samples/s of the train loader alone, after its first batch (timed separately)."""
    from seg.data.cityscapes import build_dataloaders

    previous = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        loader, _ = build_dataloaders(cfg, device)
        for _ in range(warm_epochs):
            for _ in loader:
                pass
        # Batches the workers prefetched while the first one was made arrive at once: the
        # rate is timed from the batch after them, when the queue is in a steady state.
        skip = cfg.data.num_workers * cfg.data.prefetch_factor
        iterator = _cycle(loader)
        started = time.perf_counter()
        next(iterator)
        first = time.perf_counter() - started
        for _ in range(skip):
            next(iterator)
        started = time.perf_counter()
        samples = 0
        for _ in range(batches):
            images, _targets = next(iterator)
            samples += images.shape[0]
        seconds = time.perf_counter() - started
        iterator.close()
        del iterator, loader
        gc.collect()
        return {"samples_per_second": samples / seconds, "first_batch_seconds": first, "batches": batches,
                "skipped": skip}
    finally:
        torch.set_num_threads(previous)


class _TrainingState:
    """A model, loss and optimiser kept across measurements of fed training."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from seg.losses import build_loss
        from seg.models import build_model_from_config
        from seg.optim import build_optimizer

        from seg.engine import autocast_dtype

        self.device = device
        # as fit trains: on CUDA with autocast and channels_last (per cfg.train), fp32 on CPU
        self.amp_dtype = autocast_dtype(device, cfg.train.amp)
        self.channels_last = cfg.train.channels_last and device.type == "cuda"
        self.model = build_model_from_config(cfg.model).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg, None).to(device)
        self.optimizer = build_optimizer(cfg.optim, self.model)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # .item(): the step is finished (on CUDA too) before the next batch is asked for
        train_step(self.model, images, targets, self.loss_fn, self.optimizer, self.amp_dtype).item()


def measure_fed_training(cfg: Config, device: torch.device, state: _TrainingState, steps: int) -> dict[str, float]:
    """Training steps fed by the loader: time blocked on data vs the whole time."""
    from seg.data.cityscapes import build_dataloaders

    previous = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        loader, _ = build_dataloaders(cfg, device)
        iterator = _cycle(loader)
        state.step(*next(iterator))  # workers started, first batch and the model warm
        wait = 0.0
        started = time.perf_counter()
        for _ in range(steps):
            before = time.perf_counter()
            images, targets = next(iterator)
            wait += time.perf_counter() - before
            state.step(images, targets)
        total = time.perf_counter() - started
        iterator.close()
        del iterator, loader
        gc.collect()
        return {"wait_seconds": wait, "total_seconds": total, "wait_fraction": wait / total,
                "seconds_per_step": total / steps}
    finally:
        torch.set_num_threads(previous)


# --- per-stage costs and alternatives --------------------------------------------------------

def _median_ms(function: Callable[[], Any], repeats: int = 3) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def fast_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """labelIds (uint8) -> trainIds (uint8) with one uint8 table lookup; ValueError on undefined ids."""
    train_ids = _COMBINED_LUT[label_ids.numpy()]
    if (train_ids == _INVALID).any():
        raise ValueError("undefined label ids")
    return torch.from_numpy(train_ids)


def scale_crop_window(height: int, width: int, crop: tuple[int, int], scale: float,
                      generator: torch.Generator) -> tuple[int, int, int, int]:
    """A crop window (top, left, h, w) in source pixels that becomes ``crop`` after scaling by ``scale``."""
    window_h, window_w = min(height, round(crop[0] / scale)), min(width, round(crop[1] / scale))
    top = int(torch.randint(0, height - window_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - window_w + 1, (1,), generator=generator))
    return top, left, window_h, window_w


def stage_breakdown(cfg: Config, samples: int = 3) -> dict[str, Any]:
    """Median ms per sample of each stage of the train pipeline, and of the alternatives."""
    from seg.data import cityscapes
    from seg.data.cityscapes import CityscapesSegmentation, resolve_data_root
    from seg.data.transforms import train_transform

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's view
    try:
        root = resolve_data_root(cfg.data.root)
        transform = train_transform(cfg.data)
        dataset = CityscapesSegmentation(root, cfg.data.train_split, transform, check_label_ids=False)
        indices = list(range(min(samples, len(dataset))))
        stages: dict[str, list[float]] = {}
        alternatives: dict[str, tuple[list[float], list[float]]] = {}

        def add(name: str, ms: float) -> None:
            stages.setdefault(name, []).append(ms)

        def compare(name: str, before: float, after: float) -> None:
            entry = alternatives.setdefault(name, ([], []))
            entry[0].append(before)
            entry[1].append(after)

        check_chunks = getattr(cityscapes, "_check_png_chunks", None)
        for index in indices:
            sample = dataset.samples[index]
            data = read_file(str(sample.image_path))
            add("read file", _median_ms(lambda: read_file(str(sample.image_path))))
            if check_chunks is not None:
                add("PNG CRC check", _median_ms(lambda: check_chunks(sample.image_path, memoryview(data.numpy()))))
            add("decode image (torchvision)", _median_ms(lambda: decode_png(data, mode=ImageReadMode.RGB)))
            add("read_image total", _median_ms(lambda: dataset.read_image(index)))
            add("read_train_ids total (decode + map)", _median_ms(lambda: dataset.read_train_ids(index)))
            label_data = read_file(str(sample.label_path))
            label_ids = decode_png(label_data, mode=ImageReadMode.UNCHANGED)[0]
            add("decode label", _median_ms(lambda: decode_png(label_data, mode=ImageReadMode.UNCHANGED)))

            current_map = _median_ms(lambda: _current_train_ids(label_ids))
            compare("labelIds -> trainIds: int64 + 2 lookups -> uint8 LUT", current_map,
                    _median_ms(lambda: fast_train_ids(label_ids)))
            compare("decode image: torchvision -> PIL", _median_ms(lambda: decode_png(data, mode=ImageReadMode.RGB)),
                    _median_ms(lambda: _decode_pil(sample.image_path)))

            image = tv_tensors.Image(dataset.read_image(index))
            mask = tv_tensors.Mask(dataset.read_train_ids(index))
            outputs = (image, mask)
            for step in transform.transforms:
                inputs = outputs
                torch.manual_seed(index)
                add(f"transform {_step_name(step)}", _median_ms(lambda: step(*inputs)))
                torch.manual_seed(index)
                outputs = step(*inputs)
            add("transform total", _median_ms(lambda: transform(image, mask)))
            add("__getitem__ total", _median_ms(lambda: dataset[(index, 1234 + index)]))

            # scale then crop (current) against crop then scale, at the mean scale of the range
            scale = sum(cfg.data.scale_range) / 2
            height, width = image.shape[-2:]
            size = [max(1, round(height * scale)), max(1, round(width * scale))]
            crop = list(cfg.data.crop_size)
            generator = torch.Generator().manual_seed(index)

            def scale_then_crop() -> None:
                scaled = F.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
                scaled_mask = F.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST)
                v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})(
                    scaled, scaled_mask)

            def crop_then_scale() -> None:
                top, left, h, w = scale_crop_window(height, width, tuple(crop), scale, generator)
                F.resized_crop(image, top, left, h, w, crop, interpolation=v2.InterpolationMode.BILINEAR,
                               antialias=True)
                F.resized_crop(mask, top, left, h, w, crop, interpolation=v2.InterpolationMode.NEAREST)

            compare(f"random scale ({scale:.3g}) + crop: resize whole image -> resize crop window",
                    _median_ms(scale_then_crop), _median_ms(crop_then_scale))

            # decoding the PNG against reading the crop window from a decoded copy (uint8, HxWx3,
            # memory-mapped: only the window's rows are touched), written once per image
            with tempfile.TemporaryDirectory(prefix="seg-bench-raw-") as raw_dir:
                raw_image, raw_mask = Path(raw_dir) / "image.npy", Path(raw_dir) / "train_ids.npy"
                np.save(raw_image, image.permute(1, 2, 0).contiguous().numpy())
                np.save(raw_mask, mask.numpy())
                top, left, h, w = scale_crop_window(height, width, tuple(crop), scale, generator)

                def read_window() -> torch.Tensor:
                    return _read_window(raw_image, top, left, h, w).permute(2, 0, 1)

                compare("image: decode PNG (whole) -> read crop window of a decoded .npy (memory-mapped)",
                        _median_ms(lambda: _decode_png_checked(sample.image_path)), _median_ms(read_window))
                compare("__getitem__: current -> decoded .npy crop windows + resize window",
                        _median_ms(lambda: dataset[(index, 1234 + index)]),
                        _median_ms(lambda: _raw_getitem(dataset, raw_image, raw_mask, cfg, generator)))

            # the whole sample: current __getitem__ against one with both alternatives
            compare("__getitem__: current -> uint8 LUT + crop window",
                    _median_ms(lambda: dataset[(index, 1234 + index)]),
                    _median_ms(lambda: _candidate_getitem(dataset, index, cfg, generator)))

        batch = [dataset[(i % len(dataset), i)] for i in range(cfg.data.batch_size)]
        add("collate (per sample)", _median_ms(lambda: default_collate(batch)) / len(batch))

        validation = _validation_ms(dataset, indices)
        return {
            "stages": {name: statistics.median(values) for name, values in stages.items()},
            "alternatives": {name: (statistics.median(b), statistics.median(a)) for name, (b, a) in alternatives.items()},
            "validation_ms_per_sample": validation[0], "validation_fast_ms_per_sample": validation[1],
            "samples": len(indices),
        }
    finally:
        torch.set_num_threads(previous)


def _decode_png_checked(path: Path) -> torch.Tensor:
    """Read, CRC-check and decode, as ``CityscapesSegmentation.read_image`` does."""
    from seg.data import cityscapes

    return cityscapes._decode_png(path, ImageReadMode.RGB)


def _current_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """What ``CityscapesSegmentation.read_train_ids`` does after decoding (for timing)."""
    as_long = label_ids.long()
    valid = torch.from_numpy(VALID_LABEL_ID_MASK)[as_long]
    if not bool(valid.all()):
        raise ValueError("undefined label ids")
    return torch.from_numpy(TRAIN_ID_LUT)[as_long]


def _decode_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _candidate_getitem(dataset: Any, index: int, cfg: Config, generator: torch.Generator) -> tuple:
    """``__getitem__`` with the uint8 LUT and the crop-window resize (timing only: no padding case)."""
    image = dataset.read_image(index)
    label_ids = decode_png(read_file(str(dataset.samples[index].label_path)), mode=ImageReadMode.UNCHANGED)[0]
    mask = fast_train_ids(label_ids)
    low, high = cfg.data.scale_range
    scale = float(torch.empty(1).uniform_(low, high, generator=generator))
    height, width = image.shape[-2:]
    crop = list(cfg.data.crop_size)
    top, left, h, w = scale_crop_window(height, width, tuple(crop), scale, generator)
    image = F.resized_crop(tv_tensors.Image(image), top, left, h, w, crop,
                           interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    mask = F.resized_crop(tv_tensors.Mask(mask), top, left, h, w, crop, interpolation=v2.InterpolationMode.NEAREST)
    rest = [step for step in dataset.transform.transforms if _step_name(step) not in ("RandomScale", "RandomCrop")]
    for step in rest:
        image, mask = step(image, mask)
    return image, mask


def _read_window(path: Path, top: int, left: int, height: int, width: int) -> torch.Tensor:
    array = np.load(path, mmap_mode="r")[top:top + height, left:left + width]
    return torch.from_numpy(np.ascontiguousarray(array))


def _raw_getitem(dataset: Any, raw_image: Path, raw_mask: Path, cfg: Config, generator: torch.Generator) -> tuple:
    """A sample from decoded copies: read the crop window of image and trainIds, resize it, then the rest."""
    low, high = cfg.data.scale_range
    scale = float(torch.empty(1).uniform_(low, high, generator=generator))
    height, width = np.load(raw_mask, mmap_mode="r").shape
    crop = list(cfg.data.crop_size)
    top, left, h, w = scale_crop_window(height, width, tuple(crop), scale, generator)
    image = tv_tensors.Image(_read_window(raw_image, top, left, h, w).permute(2, 0, 1))
    mask = tv_tensors.Mask(_read_window(raw_mask, top, left, h, w))
    image = F.resize(image, crop, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    mask = F.resize(mask, crop, interpolation=v2.InterpolationMode.NEAREST)
    rest = [step for step in dataset.transform.transforms if _step_name(step) not in ("RandomScale", "RandomCrop")]
    for step in rest:
        image, mask = step(image, mask)
    return image, mask


def _validation_ms(dataset: Any, indices: list[int]) -> tuple[float, float]:
    """ms per image of the up-front label check (decode + check + map): current, with the uint8 LUT."""
    current, fast = [], []
    for index in indices:
        path = str(dataset.samples[index].label_path)
        current.append(_median_ms(lambda: _current_train_ids(
            decode_png(read_file(path), mode=ImageReadMode.UNCHANGED)[0])))
        fast.append(_median_ms(lambda: fast_train_ids(decode_png(read_file(path), mode=ImageReadMode.UNCHANGED)[0])))
    return statistics.median(current), statistics.median(fast)


def _step_name(step: Any) -> str:
    name = type(step).__name__
    return "normalize (ToDtype+Normalize)" if name == "Compose" else name
