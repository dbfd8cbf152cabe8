"""scripts/train.py end to end, in a subprocess, against a private SQLite tracking store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import seg.engine
from helpers import REPO, SCRIPTS, artifact_paths, load_script, shared_tmp_path, write_config
from seg.config import Config
from seg.data.labels import CLASS_NAMES

SCRIPT = SCRIPTS / "train.py"


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """One tracking store for the module (creating its tables takes seconds); tests use their own experiments.
    It holds the runs' checkpoints (about 180 MB): deleted with the module's last test."""
    with shared_tmp_path(request, tmp_path_factory, "tracking") as directory:
        yield f"sqlite:///{directory / 'mlflow.db'}"


def train(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) \
        -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    environment.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=environment)


def test_train_logs_a_finished_run_with_params_metrics_and_artifacts(tiny_config: Config, tmp_path: Path,
                                                                      store_uri: str) -> None:
    config = write_config(tiny_config.with_overrides({"train.epochs": 2, "train.max_steps_per_epoch": 2}),
                          tmp_path / "tiny.yaml")
    uri = store_uri
    done = train([config, "optim.lr=0.02", "--out-dir", tmp_path / "out", "--tracking-uri", uri,
                  "--experiment", "e2e", "--run-name", "tiny-run"], cwd=tmp_path,
                 env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'env.db'}"})  # --tracking-uri wins
    assert done.returncode == 0, done.stdout + done.stderr
    assert "epoch 1/2" in done.stdout and "epoch 2/2" in done.stdout and "val_miou" in done.stdout
    assert not (tmp_path / "env.db").exists()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"best.pt", "last.pt"}

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-run"
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["model.arch"] == "fcn32s"
    for name in ("train_loss", "val_miou", "val_pixel_accuracy", "val_mean_class_accuracy", "lr", "epoch_seconds",
                 "val_iou/road"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "per_class_iou.csv", "per_class_iou.md",
            "config.yaml"} <= artifacts
    overlays = sorted(a for a in artifacts if a.startswith("overlays/"))
    assert len(overlays) == 3 and all(a.endswith(".png") for a in overlays)
    table = Path(client.download_artifacts(run.info.run_id, "per_class_iou.csv", str(tmp_path))).read_text()
    assert all(name in table for name in CLASS_NAMES)


@pytest.mark.parametrize("args, expected", [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["optim.lr=fast"], "optim.lr"),
    (["train.epochs=2.5"], "train.epochs"),
    (["--run-name", "../escape"], "--run-name"),
])
def test_bad_arguments_fail_before_anything_is_logged(tmp_path: Path, args: list[str], expected: str) -> None:
    config = write_config(Config(), tmp_path / "default.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = train([config, *args, "--tracking-uri", uri], cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and expected in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (REPO / "outputs" / "escape").exists()


def test_misspelled_arch_fails_before_a_run_is_created(tmp_path: Path) -> None:
    config = write_config(Config(), tmp_path / "default.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = train([config, "model.arch=fcn9s", "--tracking-uri", uri], cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    if (tmp_path / "mlflow.db").exists():
        client = MlflowClient(uri)
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert "mlflow run" not in done.stdout
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "model.arch" in done.stderr and "fcn9s" in done.stderr and "fcn8s" in done.stderr


def test_missing_config_is_a_one_line_error(tmp_path: Path) -> None:
    done = train([tmp_path / "absent.yaml", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                 cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "absent.yaml" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture
def train_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """scripts/train.py imported, for calling ``main()`` in this process (fast: no new interpreter)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    module = load_script("train")
    handler = signal.getsignal(signal.SIGTERM)
    yield module
    signal.signal(signal.SIGTERM, handler)  # main() installs its own
    mlflow.set_tracking_uri(None)  # main() sets it process-wide


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_divergence_exits_2_with_one_line_and_a_failed_run(train_module: ModuleType, tiny_config: Config,
                                                           tmp_path: Path, store_uri: str, nan_loss: None,
                                                           capsys: pytest.CaptureFixture) -> None:
    uri = store_uri
    code = train_module.main([str(write_config(tiny_config, tmp_path / "tiny.yaml")), "--out-dir",
                              str(tmp_path / "out"), "--tracking-uri", uri, "--experiment", "nan"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.startswith("error: training diverged") and len(stderr.strip().splitlines()) == 1
    run = only_run(uri, "nan")
    assert run.info.status == "FAILED" and run.data.tags["failure_type"] == "DivergenceError"


def test_sigterm_ends_the_run_killed(train_module: ModuleType, tiny_config: Config, tmp_path: Path, store_uri: str,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real_save = seg.engine.save_checkpoint

    def save_then_get_terminated(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would, mid-training

    monkeypatch.setattr(seg.engine, "save_checkpoint", save_then_get_terminated)
    cfg = tiny_config.with_overrides({"train.max_steps_per_epoch": 1})
    uri = store_uri
    code = train_module.main([str(write_config(cfg, tmp_path / "tiny.yaml")), "--out-dir", str(tmp_path / "out"),
                              "--tracking-uri", uri, "--experiment", "term"])
    assert code == 130 and "terminated by signal" in capsys.readouterr().err
    run = only_run(uri, "term")
    assert run.info.status == "KILLED"
    assert (tmp_path / "out" / "last.pt").is_file()


def test_an_existing_checkpoint_is_never_overwritten_silently(tmp_path: Path) -> None:
    config = write_config(Config(), tmp_path / "default.yaml")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last.pt").write_bytes(b"an earlier run")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = train([config, "--out-dir", tmp_path / "out", "--tracking-uri", uri], cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "--resume" in done.stderr
    done = train([config, "--resume", tmp_path / "absent.pt", "--tracking-uri", uri], cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "absent.pt" in done.stderr
    assert (tmp_path / "out" / "last.pt").read_bytes() == b"an earlier run"
    assert not (tmp_path / "mlflow.db").exists()
