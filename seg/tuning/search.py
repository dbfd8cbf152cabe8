"""``run_search``: a Ray Tune search with Optuna's TPE and ASHA, tracked in MLflow, resumable.

The pieces, in the order a search meets them:

1. Checks that need no cluster, before Ray starts: the space (``seg.tuning.space``), the
   data set (resolved to an absolute path and opened, so a bad root fails here),
   pretrained weights where asked for, a GPU where ``gpus_per_trial`` asks for one, and the
   memory probe (``seg.tuning.probing``, ``budget.probe``): one training step of each
   (arch, backbone) at the largest batch and crop, in a fresh process; what cannot fit is
   refused, and ``gpus_per_trial: auto`` becomes the share of a GPU at which the largest
   trials fit together. The probe's results are the parent run's ``probe.json``.
2. MLflow: the experiment (named after the space) and the search's parent run (budget,
   seed and git commit as params and tags, the space file and the base config as
   artifacts). ``<storage>/<name>/search.json`` records its id for ``--resume``.
3. Ray: a local instance (no dashboard, bound to 127.0.0.1, usage stats off, as many CPUs
   as the budget needs) unless ``address`` joins a cluster. Workers get absolute paths
   and the tracking URI through the trial context and ``runtime_env``.
4. Tune: :class:`SegOptunaSearch` (seeded multivariate TPE with the constant liar) in a
   ``ConcurrencyLimiter`` (without one Tune runs one trial at a time), ASHA on
   ``budget.metric`` with ``epoch`` as its clock, ``FailureConfig(max_failures)`` for
   crashes, the newest checkpoint kept per trial, reused trial processes, and
   :class:`SearchTracker`, the callback that ends each trial's MLflow run with its state.
   The trials themselves log params, per-epoch metrics and artifacts
   (``seg.tuning.trainable``): each process writes its own run, and the tracking
   helpers retry while SQLite is locked.
5. After ``fit``: overlays and ``best.pt`` for trials the scheduler stopped, a sweep that
   leaves no run RUNNING, the ranked trials, ``<storage>/<name>/summary.json``, and the
   parent run's final status (KILLED when interrupted). An exception (a second Ctrl-C)
   sweeps too before it propagates.

A resumed search (``Tuner.restore(resume_errored=True)``) continues the same Ray
experiment, Optuna study and MLflow runs: the parent run comes from ``search.json``, a
trial's run is found by its trial id before any is created, so nothing is duplicated;
runs a killed driver left RUNNING are marked ``interrupted`` until their trial resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from ray.tune import Callback

from seg.errors import ConfigError, SegError, TrackingError, WeightsNotFoundError
from seg.paths import safe_child
from seg.tuning import probing, runs, tracking
from seg.tuning.progress import SearchProgress
from seg.tuning.records import (BASE_CONFIG_ARTIFACT, CHECKPOINTS_ARTIFACT, FINAL_STATES, PROBE_FILE, SCORED_STATES,
                                SEARCH_RECORD, SPACE_COPY, SPACE_PICKLE, SUMMARY_FILE, TAG_BEST_RUN_ID,
                                TAG_BEST_TRIAL_ID, TAG_FAILURE_REASON, TAG_GIT_COMMIT, TAG_METRIC, TAG_MLFLOW_GIT_COMMIT,
                                TAG_MLFLOW_NOTE, TAG_MODE, TAG_RESUMED, TAG_SEARCH, TAG_SEED, TAG_SPACE_FILE, TAG_STATE,
                                TAG_TRIAL_ID, TAG_TRIALS_FAILED, TAG_TRIALS_RANKED, State, param_value, trial_state)
from seg.tuning.searcher import SegOptunaSearch, build_searcher
from seg.tuning.space import REPO_ROOT, SearchSpace
from seg.tuning.trainable import TrialContext, train_trial, trial_output_dir
from seg.tuning.tracker import SearchTracker, exception_reason

__all__ = ["SEARCH_RECORD", "SUMMARY_FILE", "PROBE_FILE", "SearchResult", "TrialSummary", "SegOptunaSearch",
           "SearchTracker", "run_search", "start_ray", "build_searcher", "trial_state", "trial_dirname",
           "default_storage"]

log = logging.getLogger(__name__)


def default_storage() -> Path:
    return REPO_ROOT / "ray_results"


@dataclass
class TrialSummary:
    """One trial, as ranked at the end of a search."""

    trial_id: str
    state: State  # completed, early_stopped, failed, interrupted
    rank: int | None = None  # None: not ranked (failed or interrupted)
    best: float = math.nan  # best value of the search metric over the trial's epochs
    best_epoch: int = 0
    epochs: int = 0  # epochs completed
    params: dict[str, Any] = field(default_factory=dict)  # sampled values, as config values
    config: dict[str, Any] = field(default_factory=dict)  # the trial's full Config.to_dict()
    run_id: str | None = None
    failure_reason: str | None = None
    train_seconds: float = 0.0  # sum of the trial's epoch times
    trial_seconds: float = 0.0  # Tune's time_total_s (setup and reporting included)
    checkpoint: str | None = None  # the trial's best.pt


@dataclass
class SearchResult:
    """What a search produced; ``summary_path`` holds the same as JSON."""

    name: str
    search_dir: Path
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    metric: str
    mode: str
    trials: list[TrialSummary]  # ranked ones first, best first
    interrupted: bool
    wall_seconds: float
    concurrency: int
    summary_path: Path | None = None
    # where the wall time went: checks (space, data, MLflow parent run), ray (start or
    # join), tune (Tuner.fit: every trial), finish (artifacts of stopped trials, sweep, summary)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> TrialSummary | None:
        return next((trial for trial in self.trials if trial.rank == 1), None)

    @property
    def train_seconds(self) -> float:
        return sum(trial.train_seconds for trial in self.trials)

    def table(self, max_params: int = 10):
        """The ranked trials as a pandas DataFrame (one column per sampled key)."""
        import pandas as pd

        keys = list(dict.fromkeys(key for trial in self.trials for key in trial.params))[:max_params]
        short = _short_names(keys)
        rows = []
        for trial in self.trials:
            row = {"rank": trial.rank if trial.rank is not None else "-", "trial": trial.trial_id,
                   "state": trial.state, f"{self.metric} (best)": trial.best, "epochs": trial.epochs}
            row.update({short[key]: _cell(trial.params.get(key)) for key in keys})
            row["train s"] = round(trial.train_seconds, 1)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "name": self.name, "search_dir": str(self.search_dir), "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri, "metric": self.metric,
            "mode": self.mode, "interrupted": self.interrupted, "wall_seconds": round(self.wall_seconds, 2),
            "train_seconds": round(self.train_seconds, 2), "concurrency": self.concurrency,
            "phases": {key: round(value, 2) for key, value in self.phases.items()},
            "best": _jsonable(dataclasses.asdict(best)) if best else None,
            "trials": [_jsonable(dataclasses.asdict(trial)) for trial in self.trials],
        }


# --- Ray --------------------------------------------------------------------------------------

CLIENT_CONNECT_ATTEMPTS = 3


def start_ray(num_cpus: int | None = None, address: str | None = None,
              env_vars: Mapping[str, str] | None = None) -> bool:
    """Join ``address`` (``auto`` or ``ray://...``) or start a local, loopback-only Ray.

    Returns whether this call started Ray (then the caller shuts it down). Does nothing
    when Ray is already initialised in this process.
    """
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Tune warns each time a checkpoint forces an experiment snapshot, which
    # CheckpointConfig(num_to_keep=1) does on purpose at every epoch
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                                **dict(env_vars or {})}}
    if address:
        for attempt in range(CLIENT_CONNECT_ATTEMPTS):
            try:
                ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
                break
            except ConnectionAbortedError as error:
                # Ray Client: the head starts a server process per connection, and that start
                # fails now and then ("Starting Ray client server failed"); a new connection
                # gets a new one. Other errors (wrong address, no cluster) are not retried.
                if not address.startswith("ray://") or attempt == CLIENT_CONNECT_ATTEMPTS - 1:
                    raise
                print(f"Ray Client connection to {address} failed ({str(error).strip().splitlines()[-1]}); "
                      f"retrying", file=sys.stderr)
                ray.shutdown()
                time.sleep(2.0)
    else:
        # On Linux Ray swaps 127.0.0.1 for the machine's outward address and its servers listen
        # on every interface; in its single-machine mode (the default on macOS and Windows)
        # it keeps loopback. The environment variable reaches the processes ray.init starts,
        # the constant this one, which has imported Ray already.
        from ray._private import ray_constants

        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        # "local": a new instance even when $RAY_ADDRESS names a cluster (that takes --address)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env, logging_level=logging.WARNING)
    return True


# --- run_search ------------------------------------------------------------------------------

def run_search(space: SearchSpace, *, storage: str | Path | None = None, name: str | None = None,
               resume: bool = False, address: str | None = None, tracking_uri: str | None = None,
               num_overlays: int = 3, verbose: int = 1) -> SearchResult:
    """Run (or with ``resume``, continue) the search ``space`` describes; see the module docstring.

    ``verbose``: 0 prints nothing while the search runs, 1 a line per trial start and end
    and a table of trials every 60 s (:class:`seg.tuning.progress.SearchProgress`), 2 Ray
    Tune's own progress output.

    ``storage``: Ray's storage directory (default ``<repo>/ray_results``); the search lives
    in ``<storage>/<name>``, ``name`` defaulting to the space's name (with ``-2``, ``-3``...
    when taken; with ``resume``, the newest of those). Raises ConfigError/DataError before
    Ray starts when the space, the data or the machine cannot run the search.
    """
    started = time.monotonic()
    storage = Path(storage).expanduser().absolute() if storage else default_storage()
    if resume:
        search_dir = _existing_search_dir(storage, name or space.name, explicit=name is not None)
        record = json.loads((search_dir / SEARCH_RECORD).read_text())
        space = _stored_space(search_dir, space)
        if tracking_uri and _absolute_uri(tracking_uri) != record["tracking_uri"]:
            raise ConfigError(f"{search_dir} was tracked in {record['tracking_uri']}; resume it there "
                              f"(drop --tracking-uri)")
        tracking_uri = record["tracking_uri"]
    else:
        search_dir = _new_search_dir(storage, name or space.name, explicit=name is not None)
        record = {}
    space = _with_checked_data(space)
    _check_resources(space, address)
    space, probe_report = probing.check_memory(space, address)

    tracking_uri = tracking.configure_mlflow(_absolute_uri(tracking_uri or tracking.default_tracking_uri()))
    client = tracking.get_client()
    _check_tracking_server(tracking_uri)
    try:
        if resume:
            experiment_id, parent_run_id = record["experiment_id"], record["parent_run_id"]
            runs.reopen_run(parent_run_id, client)
        else:
            experiment_id = tracking.get_or_create_experiment(space.name, client)
            parent_run_id = runs.start_search_run(experiment_id, str(search_dir), search_dir.name,
                                                  _search_tags(space, search_dir), client)
    except MlflowException as error:
        raise TrackingError(f"the tracking store {tracking_uri} refused the search's parent run: "
                            f"{str(error).splitlines()[0]}") from None
    budget = space.budget
    ray_started = False
    try:
        if resume:
            tracking.log_tags(parent_run_id, {TAG_STATE: State.RUNNING, TAG_RESUMED: int(time.time())}, client)
            # runs left RUNNING by a killed driver are interrupted until their trial resumes and reopens them
            _sweep(experiment_id, parent_run_id, {}, client)
        else:
            _log_search_params(parent_run_id, space, client)
            _write_record(search_dir, space, tracking_uri, experiment_id, parent_run_id)
        if probe_report is not None:
            tracking.call(client.log_text, parent_run_id, json.dumps(probe_report.to_dict(), indent=2), PROBE_FILE)
        context = TrialContext(space=space, tracking_uri=tracking_uri, experiment_id=experiment_id,
                               parent_run_id=parent_run_id, search_dir=str(search_dir), num_overlays=num_overlays)
        phases = {"checks": time.monotonic() - started}
        mark = time.monotonic()
        ray_started = start_ray(num_cpus=max(1, math.ceil(budget.concurrency * budget.cpus_per_trial)),
                                address=address, env_vars={"MLFLOW_TRACKING_URI": tracking_uri})
        phases["ray"] = time.monotonic() - mark
        mark = time.monotonic()
        tuner = _tuner(space, context, search_dir, resume, verbose)
        with _sigterm_as_sigint():
            grid = tuner.fit()
        phases["tune"] = time.monotonic() - mark
        mark = time.monotonic()
        summaries, interrupted = _summarise(space, search_dir, grid, experiment_id, parent_run_id, client)
        _delete_lost_runs(experiment_id, parent_run_id, {t.trial_id for t in summaries}, client)
        if not interrupted:
            _finish_stopped_trials(summaries, experiment_id, parent_run_id, num_overlays, client)
            _drop_last_checkpoints(search_dir, summaries)
        _sweep(experiment_id, parent_run_id, {t.trial_id: (t.state, t.failure_reason) for t in summaries}, client)
        result = SearchResult(name=space.name, search_dir=search_dir, experiment_id=experiment_id,
                              parent_run_id=parent_run_id, tracking_uri=tracking_uri, metric=budget.metric,
                              mode=budget.mode, trials=summaries, interrupted=interrupted,
                              wall_seconds=0.0, concurrency=budget.concurrency, phases=phases)
        result.summary_path = search_dir / SUMMARY_FILE
        phases["finish"] = time.monotonic() - mark
        result.wall_seconds = time.monotonic() - started
        result.summary_path.write_text(json.dumps(result.to_dict(), indent=2))
        _close_parent(result, client)
        return result
    except BaseException as error:
        _abort(experiment_id, parent_run_id, error, client)
        raise
    finally:
        if ray_started:
            import ray

            ray.shutdown()


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """While Tune runs, SIGTERM (``kill``, a job scheduler) stops the search like Ctrl-C:
    Tune saves its state and the runs are closed, so ``--resume`` continues it. (Ray's
    own handler, installed by ``ray.init``, would abort the driver.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _write_record(search_dir: Path, space: SearchSpace, tracking_uri: str, experiment_id: str,
                  parent_run_id: str) -> None:
    """What ``--resume`` needs that Ray does not keep: the validated space, the MLflow ids."""
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / SPACE_COPY).write_text(space.text or yaml.safe_dump(space.base_config.to_dict()))
    (search_dir / SPACE_PICKLE).write_bytes(pickle.dumps(space))
    record = {"name": space.name, "space_file": str(space.path), "tracking_uri": tracking_uri,
              "experiment_id": experiment_id, "parent_run_id": parent_run_id,
              "data_root": space.base_config.data.root, "budget": dataclasses.asdict(space.budget)}
    (search_dir / SEARCH_RECORD).write_text(json.dumps(record, indent=2))


def _tuner(space: SearchSpace, context: TrialContext, search_dir: Path, resume: bool, verbose: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    budget = space.budget
    trainable = tune.with_resources(tune.with_parameters(train_trial, context=context),
                                    {"cpu": budget.cpus_per_trial, "gpu": budget.gpus_per_trial})
    if resume:
        return tune.Tuner.restore(str(search_dir), trainable, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=budget.max_epochs, grace_period=budget.grace_period,
                              reduction_factor=budget.reduction_factor)
    tracker = SearchTracker(context.tracking_uri, context.experiment_id, context.parent_run_id, budget.max_epochs,
                            space.base_config.flat_dict())
    callbacks: list[Callback] = [tracker]
    if verbose == 1:
        callbacks.append(SearchProgress(space.keys, budget.metric, budget.mode, budget.max_epochs,
                                        budget.trials * budget.max_epochs, budget.max_failures,
                                        decode=functools.partial(_decoded, space)))
    return tune.Tuner(
        trainable,
        # reuse_actors: a trial's process outlives it and runs the next one, saving the
        # start-up (process, torch/ray/mlflow imports) that dominates short trials
        tune_config=tune.TuneConfig(metric=budget.metric, mode=budget.mode, search_alg=build_searcher(space),
                                    scheduler=scheduler, num_samples=budget.trials, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=search_dir.name, storage_path=str(search_dir.parent), callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=budget.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  verbose=1 if verbose >= 2 else 0),
    )


# --- after fit ---------------------------------------------------------------------------------

def trial_dirname(trial: Any) -> str:
    """Tune's directory of a trial: ``trial_<id>`` (the id is how results map to runs)."""
    return f"trial_{trial.trial_id}"


def _summarise(space: SearchSpace, search_dir: Path, grid: Any, experiment_id: str, parent_run_id: str,
               client: Any) -> tuple[list[TrialSummary], bool]:
    """Rank the trials of Tune's ResultGrid; their states come from the runs' ``state`` tags.

    Only a final tag (written by the trial or by :class:`SearchTracker`) says a trial
    finished: in Tune's results an early-stopped trial and one stopped by Ctrl-C look
    alike. A trial without one is ``interrupted`` unless its results say otherwise
    (an error, a reported failure, or all epochs done).
    """
    budget = space.budget
    by_trial = {run.data.tags.get(TAG_TRIAL_ID): run
                for run in runs.trial_runs(experiment_id, parent_run_id, client)}
    summaries = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or (
            Path(result.path).name.removeprefix("trial_") if result.path else None)
        if trial_id is None:
            continue  # created but never started: nothing to show
        run = by_trial.get(trial_id)
        tags = run.data.tags if run else {}
        last = result.metrics or {}
        history = _history(result)
        by_epoch = {int(row["epoch"]): row for row in history
                    if _finite(row.get("epoch")) and row["epoch"] >= 1 and not _finite(row.get("failed"))}
        if tags.get(TAG_STATE) in FINAL_STATES:
            state, reason = State(tags[TAG_STATE]), tags.get(TAG_FAILURE_REASON)
        else:
            state = trial_state({"epoch": max(by_epoch, default=0), "failed": last.get("failed")},
                                result.error is not None, budget.max_epochs)
            if state == State.EARLY_STOPPED:
                state = State.INTERRUPTED  # stopped by the scheduler or by Ctrl-C: only a final tag tells
            reason = None
            if state == State.FAILED:
                reason = exception_reason(result.error) if result.error is not None else last.get("failure_reason")
        sampled = result.config or last.get("config") or {}
        if not sampled and run is not None:  # a trial that never reported: its run has the params
            sampled = {key: param_value(key, run.data.params[key]) for key in space.keys if key in run.data.params}
        summary = TrialSummary(trial_id=trial_id, state=state, failure_reason=reason,
                               run_id=run.info.run_id if run else None, params=_decoded(space, sampled),
                               trial_seconds=float(last.get("time_total_s", 0.0) or 0.0))
        try:
            summary.config = space.config_for(sampled).to_dict()
        except ConfigError:
            summary.config = {}
        summary.epochs = max(by_epoch, default=0)
        summary.train_seconds = float(sum(row.get("epoch_seconds", 0.0) or 0.0 for row in by_epoch.values()))
        values = [(row.get(budget.metric), epoch) for epoch, row in by_epoch.items()]
        values = [(float(value), epoch) for value, epoch in values if _finite(value)]
        if values:
            pick = max if budget.mode == "max" else min
            summary.best, summary.best_epoch = pick(values, key=lambda item: item[0])
        best_file = trial_output_dir(search_dir, trial_id) / "best.pt"
        summary.checkpoint = str(best_file) if best_file.is_file() else None
        summaries.append(summary)

    sign = -1 if budget.mode == "max" else 1
    ranked = sorted((s for s in summaries if s.state in SCORED_STATES and math.isfinite(s.best)),
                    key=lambda s: (sign * s.best, -s.epochs, s.trial_id))
    for rank, summary in enumerate(ranked, 1):
        summary.rank = rank
    others = sorted((s for s in summaries if s.rank is None), key=lambda s: (s.state, s.trial_id))
    interrupted = any(s.state == State.INTERRUPTED for s in summaries) or len(summaries) < budget.trials
    return ranked + others, interrupted


def _history(result: Any) -> list[dict[str, Any]]:
    """Every result the trial reported (across sessions), else just its last one."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return [result.metrics] if result.metrics else []
    return frame.to_dict("records")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finish_stopped_trials(summaries: list[TrialSummary], experiment_id: str, parent_run_id: str,
                           num_overlays: int, client: Any) -> None:
    """Overlays and ``best.pt`` for trials the scheduler stopped (their process could not log them)."""
    for summary in summaries:
        if summary.state != State.EARLY_STOPPED or not summary.run_id or not summary.checkpoint:
            continue
        if runs.has_artifact(summary.run_id, f"{CHECKPOINTS_ARTIFACT}/best.pt", client):
            continue
        directory = Path(summary.checkpoint).parent
        logger = tracking.MlflowEpochLogger(summary.run_id, client=client, num_overlays=num_overlays,
                                            log_checkpoint_files=False)
        logger.checkpoint_dir = directory
        logger.finalize()
        tracking.log_checkpoints(summary.run_id, directory, names=("best.pt",), client=client)


def _delete_lost_runs(experiment_id: str, parent_run_id: str, trial_ids: set[str], client: Any) -> None:
    """Runs of trials Tune no longer knows: a driver killed before Tune's next snapshot of
    the experiment forgets the trials it started since, and the restored searcher suggests
    their configurations again under new ids. Tagged ``lost`` and deleted (MLflow keeps
    deleted runs restorable), so each configuration has one run."""
    for run in runs.trial_runs(experiment_id, parent_run_id, client):
        if run.data.tags.get(TAG_TRIAL_ID) not in trial_ids:
            tracking.log_tags(run.info.run_id, {TAG_STATE: State.LOST, TAG_FAILURE_REASON:
                                                "the search's driver was killed before Ray recorded this trial; "
                                                "its configuration was sampled again on --resume"}, client)
            if run.info.status == "RUNNING":
                tracking.call(client.set_terminated, run.info.run_id, "KILLED")
            tracking.call(client.delete_run, run.info.run_id)


def _drop_last_checkpoints(search_dir: Path, summaries: list[TrialSummary]) -> None:
    """Finished trials keep ``best.pt`` only: their ``last.pt`` served resuming, which Tune's
    own checkpoint copy still allows (a VGG16 checkpoint is ~1 GB)."""
    for summary in summaries:
        if summary.state in FINAL_STATES:
            directory = trial_output_dir(search_dir, summary.trial_id)
            (directory / "last.pt").unlink(missing_ok=True)
            shutil.rmtree(directory / "report", ignore_errors=True)


def _sweep(experiment_id: str, parent_run_id: str, states: Mapping[str, tuple[State, str | None]],
           client: Any) -> None:
    """End every child run still RUNNING: with its trial's state if known, else ``interrupted``."""
    for run in runs.trial_runs(experiment_id, parent_run_id, client):
        trial_id = run.data.tags.get(TAG_TRIAL_ID)
        state, reason = states.get(trial_id, (State.INTERRUPTED, None))
        if run.info.status == "RUNNING" or (trial_id in states and run.data.tags.get(TAG_STATE) != state):
            if state == State.INTERRUPTED and run.info.status != "RUNNING":
                continue
            runs.set_trial_state(run.info.run_id, state, reason=reason, client=client)


def _close_parent(result: SearchResult, client: Any) -> None:
    best = result.best
    tags = {TAG_STATE: State.INTERRUPTED if result.interrupted else State.COMPLETED,
            TAG_TRIALS_RANKED: sum(t.rank is not None for t in result.trials),
            TAG_TRIALS_FAILED: sum(t.state == State.FAILED for t in result.trials)}
    if best:
        tags.update({TAG_BEST_TRIAL_ID: best.trial_id, TAG_BEST_RUN_ID: best.run_id or ""})
        tracking.log_metrics(result.parent_run_id, {f"best_{result.metric}": best.best}, step=0, client=client)
    tracking.log_tags(result.parent_run_id, tags, client)
    tracking.call(client.log_artifact, result.parent_run_id, str(result.summary_path))
    tracking.call(client.set_terminated, result.parent_run_id, "KILLED" if result.interrupted else "FINISHED")


def _abort(experiment_id: str, parent_run_id: str, error: BaseException, client: Any) -> None:
    """The search stopped with an exception: leave no run RUNNING, then let the error through."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        _sweep(experiment_id, parent_run_id, {}, client)
        tracking.log_tags(parent_run_id, {TAG_STATE: State.INTERRUPTED if status == "KILLED" else State.FAILED}, client)
        tracking.end_run(parent_run_id, status, None if status == "KILLED" else error, client)
    except Exception as cleanup_error:  # noqa: BLE001 - the original error is the one to report
        log.warning("could not close the MLflow runs of the search: %s", cleanup_error)


# --- before Ray ------------------------------------------------------------------------------

def _with_checked_data(space: SearchSpace) -> SearchSpace:
    """The space with absolute ``data.root`` and ``model.weights``, after checking that both
    data splits open (DataError) and that pretrained weights are on disk (WeightsNotFoundError)."""
    from seg.data.cityscapes import CityscapesSegmentation, resolve_data_root

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
    from seg.models.backbones import imagenet_weights_path

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


def _check_resources(space: SearchSpace, address: str | None) -> None:
    budget = space.budget
    # gpus_per_trial: auto needs no GPU (none: CPU trials); probing.check_memory resolves it
    if address is None and budget.gpus_per_trial != "auto" and budget.gpus_per_trial > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{space.source}: budget.gpus_per_trial is {budget.gpus_per_trial}, but this "
                              f"machine has no GPU: set gpus_per_trial: 0, or --address a cluster with GPUs")
    if address is None and budget.concurrency * budget.cpus_per_trial > (os.cpu_count() or 1):
        log.warning("budget: %d concurrent trials x %s CPUs exceeds this machine's %d cores; trials will "
                    "share cores", budget.concurrency, budget.cpus_per_trial, os.cpu_count())


def _check_tracking_server(uri: str) -> None:
    """An http(s) tracking URI must answer now (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            pass
    except urllib.error.HTTPError:
        return  # it answered (e.g. 401 without credentials, or no /health behind a proxy)
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(f"cannot reach the MLflow tracking server {uri} ({error}): start it, or pass "
                            f"another --tracking-uri (default: a SQLite file in the repository)") from None


def _new_search_dir(storage: Path, name: str, explicit: bool) -> Path:
    path = safe_child(storage, name, "--name")
    if not path.exists():
        return path
    if explicit:
        raise ConfigError(f"{path} already holds a search: continue it with --resume, or choose another --name")
    taken = [int(m.group(1)) for p in storage.glob(f"{name}-*")
             if (m := re.fullmatch(rf"{re.escape(name)}-(\d+)", p.name))]
    return storage / f"{name}-{max(taken, default=1) + 1}"


def _existing_search_dir(storage: Path, name: str, explicit: bool) -> Path:
    """``<storage>/<name>`` if ``explicit``, else the newest of ``<name>``, ``<name>-2``, ``<name>-3``..."""
    from ray import tune

    if explicit:
        candidates = [safe_child(storage, name, "--name")]
    else:
        numbered = [p for p in storage.glob(f"{name}-*") if re.fullmatch(rf"{re.escape(name)}-\d+", p.name)]
        candidates = [storage / name] + sorted(numbered, key=lambda p: int(p.name.rsplit("-", 1)[1]))
    existing = [p for p in candidates if (p / SEARCH_RECORD).is_file()]
    if not existing:
        raise ConfigError(f"nothing to resume: no search {name!r} in {storage}; start one without --resume")
    path = existing[-1]
    if not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"{path}: the search stopped before Ray saved any state; start it again "
                          f"without --resume")
    return path


def _stored_space(search_dir: Path, given: SearchSpace) -> SearchSpace:
    try:
        stored: SearchSpace = pickle.loads((search_dir / SPACE_PICKLE).read_bytes())
    except (OSError, pickle.UnpicklingError, AttributeError, ImportError, TypeError) as error:
        raise ConfigError(f"{search_dir / SPACE_PICKLE}: cannot read the space this search started with "
                          f"({type(error).__name__}: {error}); was it written by another version of seg?") from None
    if given.text and stored.text and given.text != stored.text:
        raise ConfigError(f"{given.source} changed since the search in {search_dir} started; a resumed search "
                          f"continues with the space it started with (a copy is in {search_dir / SPACE_COPY}). "
                          f"Restore the file, or start a new search without --resume.")
    return stored


def _absolute_uri(uri: str) -> str:
    """``sqlite:///relative.db`` -> ``sqlite:////abs/relative.db`` (workers run elsewhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    if "://" not in uri:
        return str(Path(uri).absolute())
    return uri


def _search_tags(space: SearchSpace, search_dir: Path) -> dict[str, Any]:
    commit = runs.git_commit(str(REPO_ROOT))
    return {TAG_SEARCH: space.name, TAG_SPACE_FILE: str(space.path), TAG_STATE: State.RUNNING,
            TAG_GIT_COMMIT: commit, TAG_MLFLOW_GIT_COMMIT: commit, TAG_SEED: space.budget.seed,
            TAG_METRIC: space.budget.metric, TAG_MODE: space.budget.mode,
            TAG_MLFLOW_NOTE: space.description or f"Search {space.name}: {len(space.params)} sampled fields"}


def _log_search_params(run_id: str, space: SearchSpace, client: Any) -> None:
    from mlflow.entities import Param

    params = {f"budget.{key}": value for key, value in dataclasses.asdict(space.budget).items()}
    params.update({f"space.{param.key}": param.describe() for param in space.params})
    params.update({f"fixed.{key}": value for key, value in space.fixed.items()})
    params["base_config"] = str(space.base_path) if space.base_path else "defaults"
    entries = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for chunk in range(0, len(entries), 100):
        tracking.call(client.log_batch, run_id, params=entries[chunk:chunk + 100])
    if space.text:
        tracking.call(client.log_text, run_id, space.text, SPACE_COPY)
    tracking.call(client.log_text, run_id, yaml.safe_dump(space.base_config.to_dict(), sort_keys=False),
                  BASE_CONFIG_ARTIFACT)


# --- helpers ---------------------------------------------------------------------------------

def _decoded(space: SearchSpace, config: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return space.decode({key: value for key, value in config.items() if key in space.keys})
    except SegError:
        return dict(config)


def _short_names(keys: list[str]) -> dict[str, str]:
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def _cell(value: Any) -> Any:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
