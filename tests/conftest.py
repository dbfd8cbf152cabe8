"""Shared fixtures: a tiny synthetic Cityscapes tree and a config that trains on it in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from seg.config import Config

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data set in the official layout: 6 train and 3 val images of 64x128."""
    from seg.data.synthetic import write_synthetic_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    return write_synthetic_cityscapes(root, train=6, val=3, height=64, width=128, seed=0)


@pytest.fixture
def tiny_config(synthetic_root: Path) -> Config:
    """Trains FCN-32s/ResNet-18 on 64x128 images: a couple of seconds an epoch on CPU."""
    return Config().with_overrides({
        "data.root": str(synthetic_root),
        "data.crop_size": [64, 128],
        "data.scale_range": [1.0, 1.0],
        "data.batch_size": 2,
        "data.eval_batch_size": 3,
        "data.num_workers": 0,
        "model.arch": "fcn32s",
        "model.backbone": "resnet18",
        "train.epochs": 2,
        "train.device": "cpu",
        "train.num_threads": 1,
    })


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private SQLite tracking store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
