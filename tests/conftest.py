"""Shared fixtures: a tiny synthetic Cityscapes tree and a config that trains on it in seconds,
and the process state that tests calling the commands in this process must put back."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # before it is imported: its asserts explain themselves too

from helpers import NanLoss, ray_tmp_dir, restored_tracking_uri  # noqa: E402
from seg.config import Config  # noqa: E402

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


@pytest.fixture
def restore_process_state() -> Iterator[None]:
    """Scripts' ``main()`` set signal handlers and MLflow's URI process-wide: put them back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    with restored_tracking_uri():
        yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture
def nan_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training's loss (``seg.engine.build_loss``) returns NaN from the first step: a diverged run."""
    import seg.engine

    real_build_loss = seg.engine.build_loss
    monkeypatch.setattr(seg.engine, "build_loss", lambda cfg, weights=None: NanLoss(real_build_loss(cfg, weights)))


@pytest.fixture
def private_ray_tmp() -> Iterator[Path]:
    """``RAY_TMPDIR`` for a subprocess (see :func:`helpers.script_env`): a Ray started there
    is this test's alone and leaves its session directory there."""
    with ray_tmp_dir() as path:
        yield path


# fixtures that run a real Ray Tune search (tens of seconds each, once per module or session)
REAL_SEARCH_FIXTURES = frozenset({"small_search", "search", "ray_cluster", "sigint_search", "sigkill_search",
                                  "faulty"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start services (PostgreSQL, an MLflow server, a Ray cluster) or need a real
    search are slow too: ``pytest -m "not slow"`` leaves them out with the other tests of
    more than ~10 s, a loop of a few minutes."""
    for item in items:
        needs_search = REAL_SEARCH_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if (item.get_closest_marker("services") or needs_search) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
