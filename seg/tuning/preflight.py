"""The checks of a search that need no cluster, made before Ray starts, so that bad input fails in seconds.

The data set opens (its root made absolute: workers have their own working directory),
pretrained weights are on disk, a GPU is there where ``gpus_per_trial`` asks for one, the
memory probe's policy (``seg.tuning.probing``, ``budget.probe``) refuses what cannot fit
and resolves ``gpus_per_trial: auto``, and an http(s) tracking server answers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from seg.data.cityscapes import CityscapesSegmentation, resolve_data_root
from seg.errors import ConfigError, TrackingError, WeightsNotFoundError
from seg.models.backbones import imagenet_weights_path
from seg.tuning import probing
from seg.tuning.probing import ProbeReport
from seg.tuning.space import SearchSpace

__all__ = ["checked_space", "with_checked_data", "check_resources", "check_tracking_server"]

log = logging.getLogger(__name__)


def checked_space(space: SearchSpace, address: str | None) -> tuple[SearchSpace, ProbeReport | None]:
    """``space`` as its trials will run it, once every check before Ray passed (ConfigError,
    DataError, WeightsNotFoundError otherwise), with the memory probe's report (None when
    it did not probe). ``address``: the cluster the search joins (None: this machine)."""
    space = with_checked_data(space)
    check_resources(space, address)
    return probing.check_memory(space, address)


def with_checked_data(space: SearchSpace) -> SearchSpace:
    """The space with absolute ``data.root`` and ``model.weights``, after checking that both
    data splits open (DataError) and that pretrained weights are on disk (WeightsNotFoundError)."""
    cfg = space.base_config
    root = resolve_data_root(cfg.data.root)
    for split in (cfg.data.train_split, cfg.data.val_split):
        CityscapesSegmentation(root, split)
    settings: dict[str, Any] = {"data.root": str(root)}
    if cfg.model.weights is not None:
        weights = Path(cfg.model.weights).expanduser().absolute()
        if not weights.is_file():
            raise WeightsNotFoundError(f"{space.source}: model.weights {weights} does not exist")
        settings["model.weights"] = str(weights)
    else:
        _check_imagenet_weights(space)
    return dataclasses.replace(space, base_config=cfg.with_overrides(settings))


def _check_imagenet_weights(space: SearchSpace) -> None:
    """Every backbone a trial may pretrain must have its ImageNet weights in the torch hub cache."""
    def values(key: str, default: Any) -> tuple:
        param = next((p for p in space.params if p.key == key), None)
        return param.choices if param else (default,)

    if True not in values("model.pretrained", space.base_config.model.pretrained):
        return
    for backbone in values("model.backbone", space.base_config.model.backbone):
        path = imagenet_weights_path(backbone)
        if not path.is_file():
            raise WeightsNotFoundError(f"{space.source}: model.pretrained needs torchvision's ImageNet weights "
                                       f"of {backbone} at {path} (no download is attempted): put the file there, "
                                       f"set model.weights, or set model.pretrained=false")


def check_resources(space: SearchSpace, address: str | None) -> None:
    budget = space.budget
    # gpus_per_trial: auto needs no GPU (none: CPU trials); probing.check_memory resolves it
    if address is None and budget.gpus_per_trial != "auto" and budget.gpus_per_trial > 0:
        if not torch.cuda.is_available():
            raise ConfigError(f"{space.source}: budget.gpus_per_trial is {budget.gpus_per_trial}, but this "
                              f"machine has no GPU: set gpus_per_trial: 0, or --address a cluster with GPUs")
    if address is None and budget.concurrency * budget.cpus_per_trial > (os.cpu_count() or 1):
        log.warning("budget: %d concurrent trials x %s CPUs exceeds this machine's %d cores; trials will "
                    "share cores", budget.concurrency, budget.cpus_per_trial, os.cpu_count())


def check_tracking_server(uri: str) -> None:
    """An http(s) tracking URI must answer now (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            pass
    except urllib.error.HTTPError:
        return  # it answered (e.g. 401 without credentials, or no /health behind a proxy)
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(f"cannot reach the MLflow tracking server {uri} ({error}): start it, or pass "
                            f"another --tracking-uri (default: a SQLite file in the repository)") from None
