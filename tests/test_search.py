"""A real search on the synthetic data: Ray Tune + Optuna + ASHA, tracked in MLflow, interrupted and resumed.

One search per module (about a minute on 2 cores): 4 trials of FCN-32s/ResNet-18 on
the tiny ``synthetic_root`` images, 2 at a time, 2 epochs of 2 steps. The first trial is
an ``initial`` point with a learning rate of 10, which diverges. The search is stopped
with SIGINT (what Ctrl-C sends) once a trial has finished, then resumed with
``resume=True``; the tests check what the two sessions left behind together.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import LR, REPO, restored_tracking_uri, shared_tmp_path, small_search_space, tiny_space

TRIALS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray once for the module (run_search uses it and leaves it running)."""
    import ray

    from seg.tuning.search import start_ray

    started = start_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def _interrupt_when_a_trial_finishes(uri: str, stop: threading.Event) -> threading.Thread:
    """Send this process SIGINT (Ctrl-C) once a trial run has a final state."""
    from mlflow.tracking import MlflowClient

    def watch() -> None:
        client = MlflowClient(tracking_uri=uri)
        while not stop.wait(0.5):
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          filter_string="tags.`seg.role` = 'trial'")
            except Exception:  # noqa: BLE001 - the store may not exist yet
                continue
            finished = [r for r in runs if r.data.tags.get("state") in ("completed", "early_stopped", "failed")]
            if finished:
                os.kill(os.getpid(), signal.SIGINT)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def search(ray_cluster, synthetic_root, tmp_path_factory, request):
    """(first session's result, resumed session's result, tracking URI, space)."""
    from seg.tuning.search import run_search
    from seg.tuning.space import load_space

    with shared_tmp_path(request, tmp_path_factory, "search") as directory:
        space_file = directory / "tiny.yaml"
        space_file.write_text(small_search_space(synthetic_root, max_failures=1))
        uri = f"sqlite:///{directory / 'mlflow.db'}"
        space = load_space(space_file)
        # Tune handles the first SIGINT and restores this handler afterwards: a late signal
        # must not become a KeyboardInterrupt in pytest
        previous_handler = signal.signal(signal.SIGINT, lambda *_: None)
        stop = threading.Event()
        try:
            with restored_tracking_uri():
                _interrupt_when_a_trial_finishes(uri, stop)
                first = run_search(space, storage=directory / "ray", tracking_uri=uri, num_overlays=1, verbose=0)
                stop.set()
                resumed = run_search(load_space(space_file), storage=directory / "ray", resume=True, num_overlays=1,
                                     verbose=0)
        finally:
            stop.set()
            signal.signal(signal.SIGINT, previous_handler)
        yield first, resumed, uri, space


@pytest.fixture(scope="module")
def client(search):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=search[2])


@pytest.fixture(scope="module")
def child_runs(search, client):
    from seg.tuning.runs import trial_runs

    result = search[1]
    return trial_runs(result.experiment_id, result.parent_run_id, client)


@pytest.mark.slow
def test_interrupted_search_resumes_without_losing_or_duplicating(search, child_runs, client):
    first, resumed, _, _ = search
    assert first.interrupted and not resumed.interrupted
    assert first.parent_run_id == resumed.parent_run_id and first.search_dir == resumed.search_dir
    assert len(resumed.trials) == TRIALS
    finished_before = {t.trial_id: t for t in first.trials if t.state != "interrupted"}
    assert finished_before, "the interruption came before any trial finished"
    after = {t.trial_id: t for t in resumed.trials}
    for trial_id, trial in finished_before.items():  # finished trials were kept, not rerun
        assert after[trial_id].state == trial.state and after[trial_id].run_id == trial.run_id
        if math.isfinite(trial.best):
            assert after[trial_id].best == trial.best
    # one run per trial: no duplicate from the restore
    assert sorted(r.data.tags["trial_id"] for r in child_runs) == sorted(after)
    parent = client.get_run(resumed.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["state"] == "completed"
    assert parent.data.tags["seg.role"] == "search"
    assert parent.data.params["budget.trials"] == str(TRIALS) and parent.data.tags["seed"] == "0"
    assert "git_commit" in parent.data.tags
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"search_space.yaml", "summary.json"}


def test_one_child_run_per_trial_with_params_metrics_and_states(search, child_runs, client):
    result = search[1]
    by_trial = {t.trial_id: t for t in result.trials}
    assert len(child_runs) == TRIALS
    for run in child_runs:
        tags, params = run.data.tags, run.data.params
        trial = by_trial[tags["trial_id"]]
        assert run.info.status != "RUNNING"
        assert tags["mlflow.parentRunId"] == result.parent_run_id
        assert tags["state"] == trial.state
        expected_status = {"completed": "FINISHED", "early_stopped": "FINISHED", "failed": "FAILED"}
        assert run.info.status == expected_status[trial.state]
        for key, value in trial.params.items():  # every sampled value, as the config holds it
            assert float(params[key]) == pytest.approx(value)
        assert params["model.arch"] == "fcn32s" and params["train.epochs"] == "2"  # the full config too
        assert tags["seg.sampled_keys"] == "optim.lr,optim.momentum"
        if trial.state == "failed":
            continue
        logged = set(run.data.metrics)
        assert {"train_loss", "val_miou", "val_pixel_accuracy", "lr", "epoch_seconds", "val_iou/road"} <= logged
        history = client.get_metric_history(run.info.run_id, "val_miou")
        assert sorted({m.step for m in history}) == list(range(1, trial.epochs + 1))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"checkpoints", "overlays", "per_class_iou.csv", "per_class_iou.md", "config.yaml"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    states = {t.state for t in result.trials}
    assert "completed" in states and states <= {"completed", "early_stopped", "failed"}


def test_diverged_trial_fails_with_its_reason_and_is_not_chosen(search, child_runs):
    result = search[1]
    diverged = [t for t in result.trials if t.params["optim.lr"] == pytest.approx(10.0)]
    assert len(diverged) == 1
    trial = diverged[0]
    assert trial.state == "failed" and trial.rank is None
    assert "DivergenceError" in trial.failure_reason and "diverged" in trial.failure_reason
    run = next(r for r in child_runs if r.data.tags["trial_id"] == trial.trial_id)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["failure_reason"]
    assert result.best is not None and result.best.trial_id != trial.trial_id


def test_best_trial_is_the_argmax_of_the_reported_metric(search, child_runs, client):
    result = search[1]
    best_logged = {}
    for run in child_runs:
        if run.data.tags["state"] in ("completed", "early_stopped"):
            values = [m.value for m in client.get_metric_history(run.info.run_id, "val_miou")]
            best_logged[run.data.tags["trial_id"]] = max(v for v in values if math.isfinite(v))
    assert result.best.trial_id == max(best_logged, key=best_logged.get)
    assert result.best.best == pytest.approx(best_logged[result.best.trial_id])
    ranked = [t for t in result.trials if t.rank is not None]
    assert [t.rank for t in ranked] == list(range(1, len(ranked) + 1))
    assert [t.best for t in ranked] == sorted((t.best for t in ranked), reverse=True)
    assert Path(result.best.checkpoint).is_file()


def test_summary_file_and_table(search):
    result = search[1]
    summary = json.loads(result.summary_path.read_text())
    assert summary["parent_run_id"] == result.parent_run_id and summary["experiment_id"] == result.experiment_id
    assert summary["best"]["trial_id"] == result.best.trial_id
    assert summary["best"]["config"]["optim"]["lr"] == pytest.approx(result.best.params["optim.lr"])
    assert [t["trial_id"] for t in summary["trials"]] == [t.trial_id for t in result.trials]
    table = result.table()
    assert list(table.columns[:5]) == ["rank", "trial", "state", "val_miou (best)", "epochs"]
    assert {"lr", "momentum"} <= set(table.columns) and len(table) == TRIALS


def test_optuna_study_has_no_trial_left_running(search):
    from optuna.trial import TrialState

    result = search[1]
    state_files = sorted(result.search_dir.glob("searcher-state-*.pkl"))
    study = pickle.loads(state_files[-1].read_bytes())["_ot_study"]
    states = {trial.state for trial in study.trials}
    assert TrialState.RUNNING not in states
    # the diverged trial (lr 10) is PRUNED, which TPE ranks below every completed trial;
    # as FAIL, TPE would ignore it and keep sampling learning rates that diverge
    diverged = [t for t in study.trials if t.params.get("optim.lr") == pytest.approx(10.0)]
    assert [t.state for t in diverged] == [TrialState.PRUNED]
    by_value = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert by_value and max(t.value for t in by_value) == pytest.approx(result.best.best)


def test_a_trial_that_sampled_none_has_its_full_config_in_the_summary(tmp_path):
    # a trial that never reported: Tune holds no config for it, so the summary reads its run's params,
    # where a sampled null was logged as "None"
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from seg.tuning import runs, tracking
    from seg.tuning.search import _summarise, param_value
    from seg.tuning.space import load_space

    assert param_value("optim.grad_clip", "None") is None
    space_file = tmp_path / "clip.yaml"
    space_file.write_text(tiny_space(None, budget={"trials": 1, "max_epochs": 2},
                                     space={**LR, "optim.grad_clip": "{choice: [null, 1.0]}"}))
    space = load_space(space_file)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.get_or_create_experiment("clip", client)
    parent = runs.start_search_run(experiment_id, str(tmp_path), "clip", {}, client)
    run_id, _ = runs.start_trial_run(experiment_id, parent, "abc", "trial_abc", client=client)
    cfg = space.config_for({"optim.lr": 0.01, "optim.grad_clip": None})
    tracking.log_config(run_id, cfg, client)
    runs.set_trial_state(run_id, "failed", reason="RuntimeError: before the first epoch", client=client)
    result = SimpleNamespace(metrics={}, path=str(tmp_path / "trial_abc"), config={}, error=RuntimeError("x"),
                             metrics_dataframe=None)

    (summary,), _ = _summarise(space, tmp_path, [result], experiment_id, parent, client)
    assert summary.run_id == run_id and summary.state == "failed"
    assert summary.params == {"optim.lr": 0.01, "optim.grad_clip": None}
    assert summary.config == cfg.to_dict()


def test_resources_and_data_are_checked_before_ray(tmp_path, synthetic_root):
    from seg.errors import ConfigError, DataError
    from seg.tuning.search import run_search
    from seg.tuning.space import load_space

    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(small_search_space(synthetic_root, max_failures=1))
    with pytest.raises(ConfigError, match="gpus_per_trial"):
        run_search(load_space(space_file, overrides={"gpus_per_trial": 0.5}), storage=tmp_path / "ray",
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    missing = tmp_path / "missing"
    space_file.write_text(small_search_space(missing, max_failures=1))
    with pytest.raises(DataError, match=str(missing)):
        run_search(load_space(space_file), storage=tmp_path / "ray", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked either

    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "tune.py"), str(space_file), "--storage",
                           str(tmp_path / "ray")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr and str(missing) in done.stderr
    assert time.monotonic() - started < 60
