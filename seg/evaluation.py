"""Evaluating prediction files in the official Cityscapes result format, and writing them.

A prediction is a single-channel PNG of labelIds (not trainIds), the size of the GT,
whose file name starts with ``{city}_{seq}_{frame}`` and ends in ``.png``, anywhere under
the prediction directory: the matching rule of the official ``evalPixelLevelSemanticLabeling``.
Predicted labelIds that are not evaluated (``unlabeled``, ``parking``, ... or ids
Cityscapes does not define) count as misses of the GT class, as in the official script,
so :func:`evaluate_prediction_dir` gives the official numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from seg.config import IGNORE_INDEX, NUM_CLASSES
from seg.data.labels import CLASS_NAMES, TRAIN_ID_LUT, VALID_LABEL_ID_MASK, colorize, train_ids_to_label_ids
from seg.errors import DataError
from seg.metrics import confusion_matrix, segmentation_metrics
from seg.paths import atomic_write

__all__ = [
    "find_ground_truth", "match_predictions", "evaluate_prediction_dir", "evaluate_pairs",
    "predict_to_dir", "evaluate_checkpoint", "write_metrics_json", "format_metrics",
]

GT_SUFFIX = "_gtFine_labelIds.png"
PREDICTION_SUFFIX = "_leftImg8bit.png"  # what we write: {city}_{seq}_{frame}_leftImg8bit.png
_STEM = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<frame>\d+)$")


def find_ground_truth(data_root: str | Path, split: str = "val") -> list[Path]:
    """The split's ``gtFine/{split}/*/*_gtFine_labelIds.png`` files, sorted."""
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory. Pass --data-root pointing at the folder "
                        f"that holds gtFine/ and leftImg8bit/")
    split_dir = root / "gtFine" / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in (root / "gtFine").iterdir() if p.is_dir()) if (root / "gtFine").is_dir() else []
        raise DataError(f"{split_dir} does not exist: no split '{split}' in {root}. "
                        f"Splits found: {', '.join(found) or 'none (is this a Cityscapes root?)'}")
    files = sorted(split_dir.glob(f"*/*{GT_SUFFIX}"))
    if not files:
        raise DataError(f"no *{GT_SUFFIX} files under {split_dir}/<city>/")
    return files


def gt_stem(gt_file: Path) -> str:
    """``aachen_000000_000019`` for ``.../aachen_000000_000019_gtFine_labelIds.png``."""
    stem = gt_file.name[: -len(GT_SUFFIX)]
    if not _STEM.match(stem):
        raise DataError(f"{gt_file}: not a Cityscapes name ({{city}}_{{seq}}_{{frame}}{GT_SUFFIX})")
    return stem


def match_predictions(gt_files: Sequence[Path], prediction_dir: str | Path) -> list[tuple[Path, Path]]:
    """Pair each GT file with the one PNG under ``prediction_dir`` named ``{stem}*.png``.

    Raises DataError naming the images that have no prediction, or that have several.
    PNGs that match no GT image are ignored, as in the official script.
    """
    prediction_dir = Path(prediction_dir)
    if not prediction_dir.is_dir():
        raise DataError(f"prediction directory {prediction_dir} does not exist or is not a directory")
    stems = {gt_stem(path): path for path in gt_files}
    lengths = sorted({len(stem) for stem in stems})
    found: dict[str, list[Path]] = {stem: [] for stem in stems}
    for directory, _, names in os.walk(prediction_dir):  # like the official script: no symlinked dirs
        for name in names:
            if not name.endswith(".png"):
                continue
            for length in lengths:  # fnmatch("{stem}*.png") == startswith(stem) and endswith(".png")
                if length + 4 <= len(name) and name[:length] in found:
                    found[name[:length]].append(Path(directory) / name)
    missing = [stem for stem, paths in found.items() if not paths]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"no prediction for {len(missing)} of {len(stems)} ground-truth images under "
                        f"{prediction_dir}: {shown}. Each needs a labelIds PNG named "
                        f"'{missing[0]}*.png' (e.g. {missing[0]}{PREDICTION_SUFFIX})")
    for stem, paths in found.items():
        if len(paths) > 1:
            raise DataError(f"several predictions match ground truth {stem}: "
                            f"{', '.join(str(p) for p in sorted(paths))}. Keep one PNG per image under "
                            f"{prediction_dir} (colour images belong in another directory)")
    return [(stems[stem], found[stem][0]) for stem in stems]


def evaluate_pairs(pairs: Sequence[tuple[Path, Path]], num_threads: int | None = None) -> dict[str, Any]:
    """Metrics over (GT labelIds PNG, prediction labelIds PNG) pairs, one matrix for all.

    Returns :func:`seg.metrics.segmentation_metrics` plus ``num_images``,
    ``undefined_prediction_pixels`` (predicted ids Cityscapes does not define; they count as
    misses) and ``confusion_matrix`` (trainId rows; the last column counts predictions that
    are not an evaluated class).
    """
    if not pairs:
        raise DataError("nothing to evaluate: no (ground truth, prediction) pairs")
    threads = num_threads or min(4, os.cpu_count() or 1)
    matrix = torch.zeros(NUM_CLASSES, NUM_CLASSES + 1, dtype=torch.long)
    undefined = 0
    pool = ThreadPoolExecutor(max_workers=threads)  # PNG decoding releases the GIL
    try:
        for counts, undefined_pixels in pool.map(lambda pair: _evaluate_pair(*pair), pairs):
            matrix += counts
            undefined += undefined_pixels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, skip the images not started
    metrics = segmentation_metrics(matrix, CLASS_NAMES)
    metrics.update(num_images=len(pairs), undefined_prediction_pixels=undefined,
                   confusion_matrix=matrix.tolist())
    return metrics


def evaluate_prediction_dir(prediction_dir: str | Path, data_root: str | Path | None = None,
                            split: str = "val", num_threads: int | None = None) -> dict[str, Any]:
    """Official-format predictions under ``prediction_dir`` against ``gtFine/{split}``.

    ``data_root`` None means the embedded synthetic data set; only its ``gtFine/`` is
    read. See :func:`evaluate_pairs` for the result.
    """
    if data_root is None:
        from seg.data.cityscapes import resolve_data_root

        root = resolve_data_root(None)
    else:
        root = Path(data_root).expanduser().resolve()
    pairs = match_predictions(find_ground_truth(root, split), prediction_dir)
    metrics = evaluate_pairs(pairs, num_threads=num_threads)
    metrics.update(split=split, data_root=str(root), predictions=str(Path(prediction_dir).resolve()))
    return metrics


def _evaluate_pair(gt_file: Path, prediction_file: Path) -> tuple[torch.Tensor, int]:
    gt = _read_png(gt_file, "ground truth")
    prediction = _read_png(prediction_file, "prediction")
    if prediction.ndim != 2:
        raise DataError(f"{prediction_file}: prediction has {prediction.shape[2]} channels; write a "
                        f"single-channel PNG of labelIds (a colour image is not a prediction)")
    if prediction.shape != gt.shape:
        raise DataError(f"{prediction_file}: size {prediction.shape[1]}x{prediction.shape[0]} (WxH) differs "
                        f"from its ground truth {gt_file} ({gt.shape[1]}x{gt.shape[0]}); predict at full "
                        f"resolution")
    if gt.ndim != 2 or gt.dtype != np.uint8:
        raise DataError(f"{gt_file}: expected a single-channel 8-bit labelIds PNG")
    present = np.flatnonzero(np.bincount(gt.ravel(), minlength=256))
    unknown = [int(i) for i in present if not VALID_LABEL_ID_MASK[i]]
    if unknown:
        raise DataError(f"{gt_file}: unknown label ids {unknown} (Cityscapes defines 0..33)")
    if prediction.dtype == np.uint8:
        undefined = int(np.count_nonzero(~VALID_LABEL_ID_MASK[prediction]))
        prediction_train = TRAIN_ID_LUT[prediction]
    else:  # 16-bit or wider PNGs: ids beyond 255 are no class either
        prediction_ids = prediction.astype(np.int64)
        in_range = (prediction_ids >= 0) & (prediction_ids < 256)
        clipped = np.where(in_range, prediction_ids, 0)
        undefined = int(np.count_nonzero(~in_range | ~VALID_LABEL_ID_MASK[clipped]))
        prediction_train = np.where(in_range, TRAIN_ID_LUT[clipped], IGNORE_INDEX)  # not a class -> miss
    counts = confusion_matrix(torch.from_numpy(prediction_train), torch.from_numpy(TRAIN_ID_LUT[gt]),
                              NUM_CLASSES, IGNORE_INDEX)
    return counts, undefined


def _read_png(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read {what} PNG: {error}") from None


def write_metrics_json(metrics: dict[str, Any], path: str | Path) -> Path:
    """Write metrics as JSON (NaN -> null), atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as file:
        file.write((json.dumps(_json_safe(metrics), indent=2) + "\n").encode())
    return path


def format_metrics(metrics: dict[str, Any]) -> str:
    """A human-readable table: per-class IoU, then the averages."""
    def show(value: float) -> str:
        return "  nan" if value is None or math.isnan(value) else f"{value:.4f}"

    lines = [f"{'class':<15} IoU", "-" * 22]
    lines += [f"{name:<15} {show(value)}" for name, value in metrics["iou"].items()]
    lines += ["-" * 22,
              f"{'mIoU':<15} {show(metrics['miou'])}",
              f"{'pixel acc':<15} {show(metrics['pixel_accuracy'])}",
              f"{'mean class acc':<15} {show(metrics['mean_class_accuracy'])}"]
    if "num_images" in metrics:
        lines.append(f"{'images':<15} {metrics['num_images']}")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@torch.inference_mode()
def predict_to_dir(model: nn.Module, dataset: Any, out_dir: str | Path, device: torch.device,
                   color_dir: str | Path | None = None) -> list[Path]:
    """Predict every image of ``dataset`` and write official-format labelIds PNGs.

    ``dataset`` is a ``CityscapesSegmentation`` (its ``samples`` give the names and the
    full-resolution size); its transform may rescale the image: logits are resized back
    to the GT size before the argmax. Writes ``out_dir/{city}/{stem}_leftImg8bit.png`` and,
    with ``color_dir``, a Cityscapes-palette image of the same name there. Returns the
    prediction files.
    """
    out_dir = Path(out_dir)
    model.eval().to(device)
    written = []
    for index, sample in enumerate(dataset.samples):
        image, _ = dataset[index]
        with Image.open(sample.label_path) as label:
            width, height = label.size
        logits = model(image.unsqueeze(0).to(device))
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        train_ids = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        path = out_dir / sample.city / f"{sample.stem}{PREDICTION_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(train_ids_to_label_ids(train_ids), dtype=np.uint8)).save(path)
        written.append(path)
        if color_dir is not None:
            color_path = Path(color_dir) / sample.city / path.name
            color_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colorize(train_ids)).save(color_path)
    return written


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path, data_root: str | Path | None = None,
                        split: str = "val", device: str = "auto") -> dict[str, Any]:
    """Load a checkpoint, predict ``split``, write predictions and colour images, evaluate.

    Layout: ``out_dir/predictions/{city}/*.png`` (labelIds, official format),
    ``out_dir/color/{city}/*.png`` and ``out_dir/metrics.json``. Returns the metrics.
    """
    from seg.checkpoint import model_from_checkpoint
    from seg.data.cityscapes import CityscapesSegmentation, resolve_data_root
    from seg.data.transforms import eval_transform
    from seg.engine import select_device

    checkpoint = Path(checkpoint)
    model, cfg = model_from_checkpoint(checkpoint)
    root = resolve_data_root(None if data_root is None else str(data_root))
    dataset = CityscapesSegmentation(root, split, transform=eval_transform(cfg.data))
    out_dir = Path(out_dir)
    prediction_dir = out_dir / "predictions"
    predict_to_dir(model, dataset, prediction_dir, select_device(device), color_dir=out_dir / "color")
    metrics = evaluate_prediction_dir(prediction_dir, root, split)
    metrics.update(checkpoint=str(checkpoint.resolve()), model=f"{cfg.model.arch}/{cfg.model.backbone}")
    write_metrics_json(metrics, out_dir / "metrics.json")
    return metrics
