"""MLflow tracking: store location, idempotent lookups, run end states, metrics, artifacts, locking."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import seg
from helpers import artifact_paths
from seg.config import Config
from seg.data.labels import CLASS_NAMES
from seg.engine import EpochResult
from seg.errors import DivergenceError
from seg.tuning import tracking


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module (creating its tables takes seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.fixture
def mlflow_uri(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    yield store_uri
    mlflow.set_tracking_uri(None)  # configure_mlflow set it process-wide; back to the environment's


@pytest.fixture
def client(mlflow_uri: str) -> MlflowClient:
    tracking.configure_mlflow(mlflow_uri)
    return MlflowClient(mlflow_uri)


def test_default_uri_is_sqlite_in_the_repo_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.mlflow, "set_tracking_uri", lambda uri: None)  # keep the process's URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.default_tracking_uri()
    assert uri == f"sqlite:///{Path(seg.__file__).resolve().parent.parent / 'mlflow.db'}"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.default_tracking_uri() == "sqlite:////elsewhere/x.db"
    assert tracking.configure_mlflow("sqlite:////given/y.db") == "sqlite:////given/y.db"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_experiments_are_created_once_with_artifacts_next_to_the_database(client: MlflowClient,
                                                                         mlflow_uri: str) -> None:
    first = tracking.get_or_create_experiment("my search")
    assert tracking.get_or_create_experiment("my search") == first
    location = client.get_experiment(first).artifact_location
    database_dir = Path(mlflow_uri.removeprefix("sqlite:///")).parent
    assert location == (database_dir / "mlartifacts" / "my_search").as_uri()


def test_find_run_by_tag_and_parent_child_runs(client: MlflowClient) -> None:
    experiment = tracking.get_or_create_experiment("search")
    assert tracking.find_run(experiment, "seg.trial_id", "t1") is None
    parent = tracking.start_run(experiment, "parent")
    child = tracking.start_run(experiment, "trial-1", tags={"seg.trial_id": "t1"}, parent_run_id=parent)
    found = tracking.find_run(experiment, "seg.trial_id", "t1")
    assert found is not None and found.info.run_id == child
    assert found.data.tags["mlflow.parentRunId"] == parent
    assert found.info.run_name == "trial-1" and found.info.status == "RUNNING"


def test_checkpoints_in_a_local_artifact_store_are_linked_not_copied(client: MlflowClient, tmp_path: Path) -> None:
    experiment = tracking.get_or_create_experiment("checkpoint links")
    run_id = tracking.start_run(experiment, "trial")
    (tmp_path / "best.pt").write_bytes(b"weights" * 1000)
    assert tracking.log_checkpoints(run_id, tmp_path, client=client) == ["best.pt"]  # no last.pt here
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]
    logged = Path(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path / "download")))
    assert logged.read_bytes() == b"weights" * 1000
    artifact = tracking._local_artifact_dir(client.get_run(run_id).info.artifact_uri) / "checkpoints" / "best.pt"
    assert os.path.samefile(artifact, tmp_path / "best.pt")  # one file on disk, two names
    # a new best.pt replaces the name (rename), so the logged checkpoint keeps its bytes
    (tmp_path / "new.pt").write_bytes(b"better")
    os.replace(tmp_path / "new.pt", tmp_path / "best.pt")
    assert artifact.read_bytes() == b"weights" * 1000


@pytest.mark.parametrize("uri, expected", [
    ("file:///data/mlartifacts/1/abc/artifacts", "/data/mlartifacts/1/abc/artifacts"),
    ("file://localhost/data/a%20b/artifacts", "/data/a b/artifacts"),
    ("/data/mlruns/1/abc/artifacts", "/data/mlruns/1/abc/artifacts"),
    ("file://otherhost/data/artifacts", None),
    ("mlflow-artifacts:/1/abc/artifacts", None),
    ("s3://bucket/1/abc/artifacts", None),
    ("", None),
])
def test_only_local_artifact_uris_are_linked_into(uri: str, expected: str | None) -> None:
    found = tracking._local_artifact_dir(uri)
    assert (str(found) if found is not None else None) == expected


def test_run_context_ends_runs_finished_failed_or_killed(client: MlflowClient) -> None:
    experiment = tracking.get_or_create_experiment("states")

    class Stop(Exception):
        pass

    outcomes = {}
    for name, error in [("ok", None), ("failed", DivergenceError("loss is nan; lower optim.lr")),
                        ("killed", KeyboardInterrupt()), ("stopped", Stop("scheduler stop"))]:
        run_id = tracking.start_run(experiment, name)
        try:
            with tracking.run_context(run_id, finished_on=(Stop,)):
                if error is not None:
                    raise error
        except (DivergenceError, KeyboardInterrupt, Stop) as raised:
            assert raised is error  # always re-raised
        outcomes[name] = client.get_run(run_id)
    assert {name: run.info.status for name, run in outcomes.items()} == {
        "ok": "FINISHED", "failed": "FAILED", "killed": "KILLED", "stopped": "FINISHED"}
    tags = outcomes["failed"].data.tags
    assert tags["failure_type"] == "DivergenceError" and "lower optim.lr" in tags["failure_reason"]
    assert "failure_reason" not in outcomes["ok"].data.tags


def test_config_params_and_epoch_metrics(client: MlflowClient) -> None:
    run_id = tracking.start_run(tracking.get_or_create_experiment("metrics"))
    cfg = Config().with_overrides({"optim.lr": 0.02})
    tracking.log_config(run_id, cfg)
    for epoch in (1, 2):
        tracking.log_metrics(run_id, {"train_loss": 1.0 / epoch, "val_iou/traffic light": math.nan,
                                      "val_iou/road": 0.5 * epoch}, step=epoch)
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["data.root"] == "None"
    assert set(run.data.params) == set(cfg.flat_dict())
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_iou/road")] == [(1, 0.5), (2, 1.0)]
    assert math.isnan(run.data.metrics["val_iou/traffic light"])
    assert "config.yaml" in artifact_paths(client, run_id)


def test_epoch_logger_logs_metrics_and_the_best_epochs_iou_table(client: MlflowClient, tmp_path: Path) -> None:
    run_id = tracking.start_run(tracking.get_or_create_experiment("logger"))
    logger = tracking.MlflowEpochLogger(run_id, num_overlays=0)
    metrics = {"train_loss": 0.7, "val_miou": 0.4, **{f"val_iou/{name}": 0.4 for name in CLASS_NAMES}}
    logger(EpochResult(epoch=1, metrics=metrics, checkpoint_dir=tmp_path, is_best=True))
    logger(EpochResult(epoch=2, metrics={**metrics, "val_miou": 0.3}, checkpoint_dir=tmp_path, is_best=False))
    (tmp_path / "last.pt").write_bytes(b"x")  # finalize logs whichever checkpoints exist
    logger.finalize()
    run = client.get_run(run_id)
    assert run.data.metrics["val_miou"] == 0.3 and run.data.metrics["best_val_miou"] == 0.4
    assert run.data.tags["best_epoch"] == "1"
    assert artifact_paths(client, run_id) == {"per_class_iou.csv", "per_class_iou.md", "checkpoints/last.pt"}
    csv = client.download_artifacts(run_id, "per_class_iou.csv", str(tmp_path))
    lines = Path(csv).read_text().splitlines()
    assert lines[0] == "class,iou" and lines[1] == "road,0.4000" and len(lines) == 1 + 19 + 1


def test_locked_database_is_retried_and_other_errors_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.call(flaky) == "ok" and len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no run")

    calls.clear()
    with pytest.raises(MlflowException, match="no run"):
        tracking.call(broken)
    assert len(calls) == 1


def test_concurrent_processes_write_to_one_sqlite_store(client: MlflowClient, mlflow_uri: str) -> None:
    experiment = tracking.get_or_create_experiment("parallel")  # creates the database first
    code = textwrap.dedent(f"""
        import sys
        from seg.tuning import tracking
        tracking.configure_mlflow({mlflow_uri!r})
        run_id = tracking.start_run({experiment!r}, "worker-" + sys.argv[1], tags={{"seg.trial_id": sys.argv[1]}})
        with tracking.run_context(run_id):
            for step in range(20):
                tracking.log_metrics(run_id, {{"a": step, "b": -step}}, step=step)
    """)
    workers = [subprocess.Popen([sys.executable, "-c", code, str(i)], stderr=subprocess.PIPE, text=True)
               for i in range(3)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
    for i in range(3):
        run = tracking.find_run(experiment, "seg.trial_id", str(i))
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "a")) == 20


def test_divergence_ends_the_tracked_run_failed_with_the_reason(client: MlflowClient, tiny_config: Config,
                                                               tmp_path: Path, nan_loss: None) -> None:
    run_id = tracking.start_run(tracking.get_or_create_experiment("diverge"))
    with pytest.raises(DivergenceError, match="optim.lr"):
        tracking.tracked_fit(tiny_config, tmp_path / "out", run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_type"] == "DivergenceError"
    assert "epoch 1, step 1" in run.data.tags["failure_reason"]
    assert run.data.params["optim.lr"] == str(tiny_config.optim.lr)
