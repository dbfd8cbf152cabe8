"""Training checkpoints: atomic writes, safe loads, and every RNG the training loop draws from.

A checkpoint is one ``torch.save`` file holding a plain dict::

    model, optimizer, scheduler, scaler (state dicts; scaler None without fp16 AMP),
    epoch (completed epochs), config (Config.to_dict()), metrics (last val metrics),
    best_miou, best_epoch, history (per-epoch metric dicts), rng, version

Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: a checkpoint from an untrusted source cannot run code.
RNG states are stored as tensors for the same reason (numpy's and Python's states are
tuples of ints that ``weights_only`` would refuse as numpy arrays).

Writes go to a temporary file in the target's directory, are fsynced, then renamed over
the target with ``os.replace``: a crash or a full disk leaves either the old file or the
new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg.config import Config, config_from_dict
from seg.errors import CheckpointError, ConfigError
from seg.paths import atomic_write, fsync_directory

__all__ = ["CHECKPOINT_VERSION", "REQUIRED_KEYS", "save_checkpoint", "load_checkpoint", "copy_checkpoint",
           "remove_stale_temporaries", "load_model_state", "model_from_checkpoint", "capture_rng_state", "restore_rng_state"]

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "config")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same directory, fsync, rename).

    Adds ``version`` when missing. On any failure the temp file is removed and a previous
    file at ``path`` is left untouched. Returns the path.
    """
    path = Path(path)
    with atomic_write(path, durable=True) as file:
        torch.save({"version": CHECKPOINT_VERSION, **state}, file)
    return path


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete what an interrupted :func:`save_checkpoint` or :func:`copy_checkpoint` left in
    ``directory`` (a process killed mid-write cannot clean up after itself). Call it only
    while no other process writes checkpoints there. Returns what was removed."""
    removed = []
    for stale in [*Path(directory).glob(".*.pt.*.tmp"), *Path(directory).glob(".*.pt.*.link")]:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Make ``target`` hold the same bytes as ``source``, atomically.

    A hard link where the file system allows it (no copy; ``source`` being replaced later
    by :func:`save_checkpoint` does not change ``target``, since that makes a new inode),
    otherwise a copy. Used for ``best.pt``, which is the ``last.pt`` of its epoch.
    """
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network or FUSE file systems)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb") as file:
                os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(target.parent)
    return target


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises CheckpointError naming the file when it is missing, truncated, corrupt, holds
    anything but tensors and plain values (e.g. a pickled object with code), lacks the
    keys of a checkpoint, or was written by a newer version of this code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load fails in many ways on bad bytes; all mean the same
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            reason = ("it holds objects other than tensors and plain values, which are refused "
                      "because loading them could run code")
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason}). It may be truncated by an "
                              f"interrupted copy or not a file written by seg; use another checkpoint "
                              f"(e.g. best.pt instead of last.pt) or retrain.") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        found = sorted(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a training checkpoint of seg: expected keys "
                              f"{', '.join(REQUIRED_KEYS)}, found {found}")
    version = state.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is newer than this code supports "
                              f"({CHECKPOINT_VERSION}); update seg")
    return state


def load_model_state(model: nn.Module, state: dict[str, Any], path: str | Path = "checkpoint") -> None:
    """Load ``state["model"]`` into ``model``; a mismatch raises CheckpointError naming the model."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        model_cfg = state.get("config", {}).get("model", {})
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit this model ({first}). The checkpoint was written "
                              f"for model.arch={model_cfg.get('arch')} model.backbone="
                              f"{model_cfg.get('backbone')}: use that model config.") from None


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """The model a checkpoint was trained with, its weights loaded, in eval mode on ``device``.

    Built from the checkpoint's own config, without pretrained weights (the checkpoint
    holds all of them), so no backbone file needs to be present.
    """
    from seg.models import build_model_from_config  # the models are only needed here

    state = load_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"], source=f"{path} (config)")
    except ConfigError as error:
        raise CheckpointError(f"{path}: its config is not valid for this version of seg: {error}") from None
    model = build_model_from_config(dataclasses.replace(cfg.model, pretrained=False, weights=None))
    load_model_state(model, state, path)
    return model.to(device).eval(), cfg


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The states of torch (CPU and CUDA), numpy, Python ``random`` and ``generator``, as tensors."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([position, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(cached_gauss, dtype=torch.float64),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_version": version,
        "python_gauss": torch.tensor(math.nan if gauss_next is None else gauss_next, dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA and generator states only where present)."""
    torch.set_rng_state(state["torch"].cpu())
    position, has_gauss = (int(v) for v in state["numpy_extra"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), position, has_gauss,
                         float(state["numpy_gauss"])))
    gauss = float(state["python_gauss"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"]),
                     None if math.isnan(gauss) else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].cpu())
