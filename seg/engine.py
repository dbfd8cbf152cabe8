"""Training and evaluation loops: plain functions, as in torchvision's segmentation reference.

``fit(cfg, out_dir)`` builds everything from a Config, trains for ``cfg.train.epochs``
epochs, validates, writes ``last.pt`` every epoch and ``best.pt`` when val mIoU improves,
then calls ``on_epoch_end`` (the tuning and tracking layers hook in there).

Non-finite losses. A NaN or inf loss stops training with DivergenceError (epoch, step,
loss, lr and what to change). On CPU the loss is read every step (``.item()`` costs
nothing there), so no optimiser step is ever taken on a bad loss. On CUDA reading it
every step would stall the host on each step, so finiteness is tracked on the device and
read every ``log_every`` steps and at the end of the epoch: up to ``log_every - 1`` steps
may run after the first bad loss, but only in memory: the error is raised before the
epoch's evaluation, checkpoint or report, so NaN weights are never saved or reported, and
the error names the first bad step.

Determinism. ``fit`` seeds torch, numpy and random from ``cfg.train.seed``; the train
loader's sampler (``seg.data.cityscapes.SeededSampler``) makes the batch order and every
sample's augmentation a function of (seed, epoch), whichever worker loads it; and a
checkpoint holds the state of every other RNG the loop draws from (dropout, the loader's
generator). Same config and seed give the same metrics on CPU, and a run resumed after
epoch k ends with the metrics of an uninterrupted run. (CUDA kernels are not bitwise
deterministic, so on GPU the numbers agree only closely.)
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.checkpoint import (capture_rng_state, copy_checkpoint, load_checkpoint, load_model_state,
                            remove_stale_temporaries, restore_rng_state, save_checkpoint)
from seg.config import IGNORE_INDEX, NUM_CLASSES, Config, TrainConfig
from seg.data.cityscapes import build_dataloaders
from seg.errors import CheckpointError, ConfigError, DataError, DivergenceError
from seg.losses import build_loss, median_frequency_weights
from seg.metrics import ConfusionMatrix
from seg.models import build_model_from_config
from seg.optim import build_optimizer, build_scheduler

__all__ = ["EpochResult", "FitResult", "select_device", "autocast_dtype", "precision_settings", "seed_everything",
           "train_one_epoch", "evaluate", "fit"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochResult:
    """What ``fit`` reports after each epoch, once its checkpoint is on disk.

    ``metrics`` is flat: ``train_loss``, ``lr``, ``epoch_seconds`` and, on epochs that
    validate (every ``train.eval_every``-th and the last), ``val_loss``, ``val_miou``,
    ``val_pixel_accuracy``, ``val_mean_class_accuracy`` and ``val_iou/<class name>``.
    """

    epoch: int  # 1-based
    metrics: dict[str, float]
    checkpoint_dir: Path  # holds last.pt and, once there is one, best.pt
    is_best: bool


@dataclass(frozen=True)
class FitResult:
    best_miou: float  # NaN when no epoch validated
    best_epoch: int  # 0 when no epoch validated
    history: list[dict[str, float]] = field(default_factory=list)  # {"epoch": n, **EpochResult.metrics}
    out_dir: Path = Path(".")


def select_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else CPU; ``cpu``, ``cuda``, ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is '{name}' but no CUDA device is available: "
                              f"use train.device=auto or train.device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device is '{name}' but only {torch.cuda.device_count()} CUDA "
                              f"device(s) exist: use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def autocast_dtype(device: torch.device, amp: bool, cpu_amp: bool = False) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``: on CUDA with ``amp`` bf16 where supported,
    else fp16; on CPU with ``cpu_amp`` bf16; otherwise None (fp32)."""
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None
    return torch.bfloat16 if cpu_amp and device.type == "cpu" else None


def precision_settings(train: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """What ``fit`` trains ``train`` with on ``device``: (autocast dtype or None, channels_last)."""
    amp_dtype = autocast_dtype(device, train.amp, train.cpu_amp)
    channels_last = train.channels_last and (device.type == "cuda" or amp_dtype is not None)
    return amp_dtype, channels_last


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loss_fn: nn.Module, device: torch.device, *, epoch: int = 1,
                    max_steps: int | None = None, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    grad_clip: float | None = None, log_every: int = 20,
                    check_every_step: bool | None = None,
                    on_step: Callable[[int, int | None, float | None], None] | None = None) -> dict[str, float]:
    """One pass over ``loader`` (at most ``max_steps`` batches), stepping ``scheduler`` per step.

    Returns ``loss`` (mean over steps), ``lr`` (of the last step), ``steps`` and
    ``seconds``. Raises DivergenceError on a non-finite loss, checked before every
    optimiser step when ``check_every_step`` (default: unless on CUDA), else on the
    device and read every ``log_every`` steps (see the module docstring).
    ``on_step(step, total, loss)`` is called after each step (a progress bar); ``loss`` is
    None on the steps where reading it would make the host wait for the device.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    check_each_step = device.type != "cuda" if check_every_step is None else check_every_step
    total = _num_steps(loader, max_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # tracked on the device (CUDA)
    bad_loss = torch.zeros((), dtype=torch.float32, device=device)
    logged_step, logged_sum, logged_time = 0, 0.0, time.perf_counter()
    start = logged_time
    lr = optimizer.param_groups[0]["lr"]
    step = 0
    for images, targets in loader:
        if max_steps is not None and step >= max_steps:
            break
        step += 1
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        lr = optimizer.param_groups[0]["lr"]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), targets)
        value = None
        if check_each_step:
            value = loss.item()
            if not math.isfinite(value):
                raise _divergence(epoch, step, total, value, lr)
        else:
            newly_bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
            first_bad = torch.where(newly_bad, step, first_bad)
            bad_loss = torch.where(newly_bad, loss.detach().float(), bad_loss)
        loss_sum += loss.detach()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if on_step is not None:
            on_step(step, total, value)
        if step % log_every == 0 or step == total:
            if not check_each_step:
                _raise_if_bad(first_bad, bad_loss, epoch, total, optimizer)
            current, now = loss_sum.item(), time.perf_counter()  # on CUDA, the window's one host sync
            steps = step - logged_step
            log.info("epoch %d step %d/%s loss %.4f lr %.3g %.2f s/step", epoch, step, total or "?",
                     (current - logged_sum) / steps, lr, (now - logged_time) / steps)
            logged_step, logged_sum, logged_time = step, current, now
    if not check_each_step:
        _raise_if_bad(first_bad, bad_loss, epoch, total, optimizer)
    if step == 0:
        raise DataError("the training loader yielded no batch: the train split holds fewer images than "
                        "data.batch_size (the last incomplete batch is dropped); lower data.batch_size")
    return {"loss": loss_sum.item() / step, "lr": lr, "steps": step, "seconds": time.perf_counter() - start}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, num_classes: int = NUM_CLASSES, *,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, Any]:
    """Metrics over the whole loader: ``seg.metrics.segmentation_metrics`` plus ``loss``.

    One confusion matrix is accumulated on ``device`` over the split. ``loss`` is the
    unweighted cross entropy per valid pixel of the split, whatever the training loss's
    class weights, so it is comparable between runs.
    """
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    pixels = torch.zeros((), dtype=torch.int64, device=device)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        pixels += (targets != IGNORE_INDEX).sum()
        matrix.update(logits.argmax(dim=1), targets)
    metrics = matrix.compute()
    count = pixels.item()
    metrics["loss"] = loss_sum.item() / count if count else math.nan
    return metrics


def fit(cfg: Config, out_dir: str | Path, on_epoch_end: Callable[[EpochResult], None] | None = None,
        resume: str | Path | None = None,
        on_step: Callable[[int, int, int | None, float | None], None] | None = None) -> FitResult:
    """Train ``cfg`` from scratch, or from the checkpoint ``resume``, writing checkpoints to ``out_dir``.

    After each epoch: ``out_dir/last.pt`` is written, ``out_dir/best.pt`` too when val mIoU
    improved, then ``on_epoch_end(EpochResult)`` is called; whatever it raises propagates
    (that is how Ray Tune stops a trial). ``on_step(epoch, step, steps, loss)`` is called
    after every training step (see :func:`train_one_epoch`). Raises DivergenceError on a
    non-finite loss.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out_dir):
        log.info("removed %s, left by an interrupted checkpoint write", stale)
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    device = select_device(cfg.train.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: autotuned kernels pay off
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype, channels_last = precision_settings(cfg.train, device)

    train_loader, val_loader = build_dataloaders(cfg, device)
    model = build_model_from_config(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    class_weights = None
    if cfg.train.class_weights == "median_frequency":
        class_weights = median_frequency_weights(train_loader.dataset)
        log.info("median frequency class weights: %s", [round(w, 3) for w in class_weights.tolist()])
    loss_fn = build_loss(cfg, class_weights).to(device)
    steps_per_epoch = _num_steps(train_loader, cfg.train.max_steps_per_epoch)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer, total_iters=cfg.train.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = getattr(train_loader, "generator", None)

    start_epoch, best_miou, best_epoch, history = 0, -math.inf, 0, []
    if resume is not None:
        state = load_checkpoint(resume)
        _check_resume_config(state, cfg, resume)
        load_model_state(model, state, resume)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{resume}: optimiser state does not fit this config ({error}); "
                                  f"resume with the config the checkpoint was written with") from None
        if "rng" in state:
            restore_rng_state(state["rng"], generator)
        start_epoch, history = state["epoch"], list(state.get("history", []))
        best_miou = state.get("best_miou", -math.inf)
        best_epoch = state.get("best_epoch", 0)
        log.info("resumed from %s after epoch %d (best val mIoU %.4f)", resume, start_epoch, best_miou)

    log.info("training %s/%s on %s%s: %d epochs of %d steps, %s", cfg.model.arch, cfg.model.backbone,
             device, f" ({amp_dtype})".replace("torch.", "") if amp_dtype else "", cfg.train.epochs,
             steps_per_epoch, out_dir)
    last_val: dict[str, float] = {}
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        started = time.perf_counter()
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch - 1)  # the order and augmentation of this epoch, also when resuming
        train = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, device, epoch=epoch,
                                max_steps=cfg.train.max_steps_per_epoch, scaler=scaler, amp_dtype=amp_dtype,
                                channels_last=channels_last, grad_clip=cfg.optim.grad_clip,
                                on_step=None if on_step is None else functools.partial(on_step, epoch))
        metrics = {"train_loss": train["loss"], "lr": train["lr"]}
        is_best = False
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            val = evaluate(model, val_loader, device, NUM_CLASSES, amp_dtype=amp_dtype,
                           channels_last=channels_last)
            last_val = _flat_val_metrics(val)
            metrics.update(last_val)
            # NaN (e.g. no labelled val pixel) never counts as an improvement
            is_best = val["miou"] > best_miou
            if is_best:
                best_miou, best_epoch = val["miou"], epoch
        metrics["epoch_seconds"] = time.perf_counter() - started
        history.append({"epoch": epoch, **metrics})

        rng = capture_rng_state(generator)
        save_checkpoint(out_dir / "last.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch, "config": cfg.to_dict(), "metrics": last_val, "best_miou": best_miou,
            "best_epoch": best_epoch, "history": history, "rng": rng,
        })
        if is_best:
            copy_checkpoint(out_dir / "last.pt", out_dir / "best.pt")
        log.info("epoch %d/%d  train_loss %.4f  %slr %.3g  %.1f s%s", epoch, cfg.train.epochs,
                 metrics["train_loss"],
                 f"val_loss {metrics['val_loss']:.4f}  val_miou {metrics['val_miou']:.4f}  "
                 f"pixel_acc {metrics['val_pixel_accuracy']:.4f}  " if "val_miou" in metrics else "",
                 metrics["lr"], metrics["epoch_seconds"], "  (best)" if is_best else "")
        if on_epoch_end is not None:
            on_epoch_end(EpochResult(epoch=epoch, metrics=dict(metrics), checkpoint_dir=out_dir, is_best=is_best))
            # a callback that draws random numbers must not change the training that follows
            restore_rng_state(rng, generator)

    return FitResult(best_miou=best_miou if best_epoch else math.nan, best_epoch=best_epoch,
                     history=history, out_dir=out_dir)


def _flat_val_metrics(val: dict[str, Any]) -> dict[str, float]:
    flat = {"val_loss": val["loss"], "val_miou": val["miou"], "val_pixel_accuracy": val["pixel_accuracy"],
            "val_mean_class_accuracy": val["mean_class_accuracy"]}
    flat.update({f"val_iou/{name}": value for name, value in val["iou"].items()})
    return flat


def _num_steps(loader: Iterable, max_steps: int | None) -> int | None:
    try:
        steps = len(loader)  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length
        return max_steps
    return steps if max_steps is None else min(steps, max_steps)


def _divergence(epoch: int, step: int, total: int | None, loss: float, lr: float) -> DivergenceError:
    error = DivergenceError(
        f"training diverged: loss is {loss} at epoch {epoch}, step {step}/{total or '?'} (lr {lr:.3g}). "
        f"Lower optim.lr, add warmup (optim.warmup_iters) or clip gradients (optim.grad_clip).")
    error.epoch, error.step, error.loss, error.lr = epoch, step, loss, lr
    return error


def _raise_if_bad(first_bad: Tensor, bad_loss: Tensor, epoch: int, total: int | None,
                  optimizer: torch.optim.Optimizer) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise _divergence(epoch, step, total, float(bad_loss.item()), optimizer.param_groups[0]["lr"])


def _check_resume_config(state: dict[str, Any], cfg: Config, path: str | Path) -> None:
    saved = state["config"]
    saved_model = saved.get("model", {})
    if (saved_model.get("arch"), saved_model.get("backbone")) != (cfg.model.arch, cfg.model.backbone):
        raise CheckpointError(f"{path}: written for model.arch={saved_model.get('arch')} model.backbone="
                              f"{saved_model.get('backbone')}, but the config asks for model.arch="
                              f"{cfg.model.arch} model.backbone={cfg.model.backbone}: resume with the "
                              f"checkpoint's model settings")
    changed = sorted(key for key, value in cfg.flat_dict().items()
                     if saved.get(key.split(".")[0], {}).get(key.split(".")[1], value) != value)
    if changed:
        log.warning("resuming %s with settings that differ from the checkpoint's: %s", path, ", ".join(changed))
