"""Part ``loader``: the data pipeline against what training consumes.

Measured for the embedded synthetic set (``DEFAULT_SYNTHETIC``: 128x256 PNGs) and for full-size 2048x1024 PNGs written
into a temporary directory, at the benchmark's batch and crop:

* the train loader of ``seg.data.cityscapes.build_dataloaders`` alone (decode, augment,
  collate; after its first batch, whose latency is the workers' start-up), in samples/s,
  for each worker count;
* training alone (a model's training step on in-memory batches), in samples/s consumed;
* training fed by the loader: the share of the time spent blocked on the next batch,
  and the time per step against the bare step (workers compete for the same cores);
* per-sample stage costs in one thread (read + CRC check, PNG decode, label mapping,
  each transform, collate), and, timed on the same samples, what each costly stage cost
  before it was made faster (labelIds -> trainIds through int64 and two tables, resizing
  the whole image before cropping, decoding instead of ``data.cache: disk``) and PIL
  against torchvision decoding;
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
from seg.data.labels import CHECKED_TRAIN_ID_LUT, TRAIN_ID_LUT, UNDEFINED_LABEL_ID, VALID_LABEL_ID_MASK
from seg.data.synthetic import DEFAULT_SYNTHETIC
from seg.data.transforms import RandomScaleCrop
from seg.probe import probe, torch_threads, train_step

__all__ = ["run_loader_part", "measure_loader", "measure_fed_training", "stage_breakdown"]


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

    datasets: list[tuple[str, str | None]] = [
        (f"synthetic {DEFAULT_SYNTHETIC['height']}x{DEFAULT_SYNTHETIC['width']}", None)]
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
        # decoded once into .npy copies, then read memory-mapped (the first pass writes them)
        datasets.append(("full-size 2048x1024, cache: disk", str(root)))

    rows = []
    try:
        model_state = _TrainingState(bench_config(arch, backbone, batch, crop, threads, device), device)
        for label, root in datasets:
            options = {"data.root": root}
            if label.endswith("cache: disk"):
                options.update({"data.cache": "disk", "data.cache_dir": str(Path(temporary.name) / "decoded")})
            for count in workers:
                cfg = bench_config(arch, backbone, batch, crop, threads, device,
                                   **{"data.num_workers": count, **options})
                alone = measure_loader(cfg, device, loader_batches, warm_epochs=int("data.cache" in options))
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
        for label, root in datasets[:2]:
            cfg = bench_config(arch, backbone, batch, crop, threads, device, **{"data.root": root})
            stages = stage_breakdown(cfg, stage_samples)
            stage_rows += [[label, stage, round(ms, 2)] for stage, ms in stages["stages"].items()]
            fix_rows += [[label, fix, round(before, 2), round(after, 2), f"{before / after:.1f}x" if after else "-"]
                         for fix, (before, after) in stages["alternatives"].items()]
            validation_rows.append([label, round(stages["validation_before_ms_per_sample"], 1),
                                    round(stages["validation_before_ms_per_sample"] * 500 / 1000, 1),
                                    round(stages["validation_ms_per_sample"], 1),
                                    round(stages["validation_ms_per_sample"] * 500 / 1000, 1)])
            section.data[f"stages {label}"] = stages
            log(f"[loader] {label}: per-sample stages (ms) {', '.join(f'{k} {v:.1f}' for k, v in stages['stages'].items())}")
        section.tables.append(Table("Per-sample cost of each stage, one thread, main process (ms, median)",
                                    ["images", "stage", "ms/sample"], stage_rows))
        section.tables.append(Table(
            "Before and now, measured on the same samples (ms per sample, median; see notes)",
            ["images", "stage: before -> now", "before ms", "now ms", "speed-up"], fix_rows))
        section.tables.append(Table(
            "Up-front label validation of a split (trial start-up: every trial builds its loaders)",
            ["images", "before (int64, 2 tables) ms/image", "500 images, s", "now (uint8 LUT) ms/image",
             "500 images, s"], validation_rows))
    finally:
        if temporary is not None:
            temporary.cleanup()
    section.notes += [
        "Training consumption = batch / bare step time of the model on in-memory batches (no loading), the "
        "most demanding of the step part's models for the loader. Fed training runs the same steps with "
        "batches from the loader; waiting = time blocked in next(loader). With workers on a 2-core machine the "
        "workers and the training threads share the cores, which shows as fed/bare step > 1 rather than as waiting.",
        "Labels: before, the decoded uint8 labelIds were converted to int64 (8 bytes/pixel) to index two "
        "tables (validity mask, then trainIds); now one uint8 numpy table (labelId -> trainId, undefined ids -> "
        "254) is indexed with the uint8 array (seg.data.labels.CHECKED_TRAIN_ID_LUT).",
        "Scale+crop: before, the whole image (and mask) was resized by the random scale, then cropped; now "
        "RandomScaleCrop picks the crop window in source coordinates (crop size / scale) and resizes only that "
        "window (bilinear+antialias for the image, nearest for the mask): the same distribution of crops, a "
        "fraction of the pixels resampled. Timed at the mean scale of the range.",
        "cache: disk: each image decoded once and stored as uint8 HxWx3 .npy (6.3 MB per full-size image, "
        "18.7 GB for the 2975 training images), read memory-mapped: only the crop window's rows are touched. "
        "Timed with the files in the page cache, as a data set that fits in memory is; from a cold disk the "
        "window's rows are read instead (~1-2 MB per sample).",
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

    with torch_threads(cfg.train.num_threads or None):
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


class _TrainingState:
    """A model, loss and optimiser kept across measurements of fed training."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from seg.losses import build_loss
        from seg.models import build_model_from_config
        from seg.optim import build_optimizer

        from seg.engine import precision_settings

        self.device = device
        # as fit trains: autocast and channels_last per cfg.train and the device
        self.amp_dtype, self.channels_last = precision_settings(cfg.train, device)
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

    with torch_threads(cfg.train.num_threads or None):
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


# --- per-stage costs and alternatives --------------------------------------------------------

def _median_ms(function: Callable[[], Any], repeats: int = 3) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def stage_breakdown(cfg: Config, samples: int = 3) -> dict[str, Any]:
    """Median ms per sample of each stage of the train pipeline, and of the alternatives."""
    from seg.data import cityscapes
    from seg.data.cityscapes import CityscapesSegmentation, resolve_data_root
    from seg.data.transforms import train_transform

    with torch_threads(1):  # a loader worker's view
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

            compare("labelIds -> trainIds: int64 + 2 tables -> one uint8 LUT",
                    _median_ms(lambda: _previous_train_ids(label_ids)),
                    _median_ms(lambda: _train_ids(label_ids)))
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

            # resizing the whole image then cropping (before) against RandomScaleCrop (now)
            scale = sum(cfg.data.scale_range) / 2
            height, width = image.shape[-2:]
            size = [max(1, round(height * scale)), max(1, round(width * scale))]
            crop = list(cfg.data.crop_size)
            scale_crop = RandomScaleCrop(cfg.data.crop_size, (scale, scale))

            def scale_then_crop() -> None:
                scaled = F.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
                scaled_mask = F.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST)
                v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})(
                    scaled, scaled_mask)

            compare(f"random scale ({scale:.3g}) + crop: resize whole image -> resize crop window",
                    _median_ms(scale_then_crop), _median_ms(lambda: scale_crop(image, mask)))

            # decoding the PNGs (before) against reading decoded copies (cache: disk)
            with tempfile.TemporaryDirectory(prefix="seg-bench-decoded-") as decoded:
                cached = CityscapesSegmentation(root, cfg.data.train_split, transform, check_label_ids=False,
                                                cache="disk", cache_dir=decoded)
                cached[(index, 0)]  # writes the copies

                def read_window() -> torch.Tensor:
                    return scale_crop(tv_tensors.Image(cached.read_image(index)),
                                      tv_tensors.Mask(cached.read_train_ids(index)))

                compare("image + label: decode PNGs -> crop window of the decoded copies (cache: disk)",
                        _median_ms(lambda: (dataset.read_image(index), dataset.read_train_ids(index))),
                        _median_ms(read_window))
                compare("__getitem__: cache false -> cache: disk",
                        _median_ms(lambda: dataset[(index, 1234 + index)]),
                        _median_ms(lambda: cached[(index, 1234 + index)]))

        batch = [dataset[(i % len(dataset), i)] for i in range(cfg.data.batch_size)]
        add("collate (per sample)", _median_ms(lambda: default_collate(batch)) / len(batch))

        before, now = _validation_ms(dataset, indices)
        return {
            "stages": {name: statistics.median(values) for name, values in stages.items()},
            "alternatives": {name: (statistics.median(b), statistics.median(a)) for name, (b, a) in alternatives.items()},
            "validation_before_ms_per_sample": before, "validation_ms_per_sample": now,
            "samples": len(indices),
        }


def _previous_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """How ``CityscapesSegmentation.read_train_ids`` mapped labels before: int64, two tables."""
    as_long = label_ids.long()
    valid = torch.from_numpy(VALID_LABEL_ID_MASK)[as_long]
    if not bool(valid.all()):
        raise ValueError("undefined label ids")
    return torch.from_numpy(TRAIN_ID_LUT)[as_long]


def _train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """How it maps them now (see ``read_train_ids``): one uint8 lookup that also flags bad ids."""
    train_ids = CHECKED_TRAIN_ID_LUT[label_ids.numpy()]
    if (train_ids == UNDEFINED_LABEL_ID).any():
        raise ValueError("undefined label ids")
    return torch.from_numpy(train_ids)


def _decode_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _validation_ms(dataset: Any, indices: list[int]) -> tuple[float, float]:
    """ms per image of the up-front label check (decode + check + map): before, now."""
    before, now = [], []
    for index in indices:
        path = str(dataset.samples[index].label_path)
        before.append(_median_ms(lambda: _previous_train_ids(
            decode_png(read_file(path), mode=ImageReadMode.UNCHANGED)[0])))
        now.append(_median_ms(lambda: _train_ids(decode_png(read_file(path), mode=ImageReadMode.UNCHANGED)[0])))
    return statistics.median(before), statistics.median(now)


def _step_name(step: Any) -> str:
    name = type(step).__name__
    return "normalize (ToDtype+Normalize)" if name == "Compose" else name
