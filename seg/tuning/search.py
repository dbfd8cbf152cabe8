"""``run_search``: a Ray Tune search with Optuna's TPE and ASHA, tracked in MLflow, resumable.

This module runs a search from start to end: Ray's lifecycle, the Tuner, resume. The
pieces, in the order a search meets them:

1. Checks that need no cluster, before Ray starts (``seg.tuning.preflight``): the space
   (``seg.tuning.space``), the data set (resolved to an absolute path and opened, so a
   bad root fails here), pretrained weights where asked for, a GPU where
   ``gpus_per_trial`` asks for one, and the memory probe (``seg.tuning.probing``,
   ``budget.probe``): one training step of each (arch, backbone) at the largest batch and
   crop, in a fresh process; what cannot fit is refused, and ``gpus_per_trial: auto``
   becomes the share of a GPU at which the largest trials fit together. The probe's
   results are the parent run's ``probe.json``.
2. MLflow: the experiment (named after the space) and the search's parent run (budget,
   seed and git commit as params and tags, the space file and the base config as
   artifacts). ``<storage>/<name>/search.json`` records its id for ``--resume``. The names
   of every tag and file are ``seg.tuning.records``'.
3. Ray: a local instance (no dashboard, bound to 127.0.0.1, usage stats off, as many CPUs
   as the budget needs) unless ``address`` joins a cluster. Workers get absolute paths
   and the tracking URI through the trial context and ``runtime_env``.
4. Tune: :class:`SegOptunaSearch` (``seg.tuning.searcher``: seeded multivariate TPE with
   the constant liar) in a ``ConcurrencyLimiter`` (without one Tune runs one trial at a
   time), ASHA on ``budget.metric`` with ``epoch`` as its clock,
   ``FailureConfig(max_failures)`` for crashes, the newest checkpoint kept per trial,
   reused trial processes, and :class:`SearchTracker` (``seg.tuning.tracker``), the
   callback that ends each trial's MLflow run with its state. The trials themselves log
   params, per-epoch metrics and artifacts (``seg.tuning.trainable``): each process writes
   its own run, and the tracking helpers retry while SQLite is locked.
5. After ``fit`` (``seg.tuning.results``): overlays and ``best.pt`` for trials the
   scheduler stopped, a sweep that leaves no run RUNNING, the ranked trials,
   ``<storage>/<name>/summary.json``, and the parent run's final status (KILLED when
   interrupted). An exception (a second Ctrl-C) sweeps too before it propagates.

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
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from ray import tune
from ray._private import ray_constants
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from seg.errors import ConfigError, TrackingError
from seg.paths import safe_child
from seg.tuning import runs, tracking
from seg.tuning.preflight import check_tracking_server, checked_space
from seg.tuning.progress import SearchProgress
from seg.tuning.records import (BASE_CONFIG_ARTIFACT, PROBE_FILE, SEARCH_RECORD, SPACE_COPY, SPACE_PICKLE, SUMMARY_FILE,
                                TAG_GIT_COMMIT, TAG_METRIC, TAG_MLFLOW_GIT_COMMIT, TAG_MLFLOW_NOTE, TAG_MODE,
                                TAG_RESUMED, TAG_SEARCH, TAG_SEED, TAG_SPACE_FILE, TAG_STATE, State, trial_state)
from seg.tuning.records import param_value as param_value  # imported from here by older code and tests
from seg.tuning.results import (SearchResult, TrialSummary, abort, close_parent, delete_lost_runs,
                                drop_last_checkpoints, finish_stopped_trials, sampled_values, summarise, sweep)
from seg.tuning.searcher import SegOptunaSearch, build_searcher
from seg.tuning.space import REPO_ROOT, SearchSpace
from seg.tuning.trainable import TrialContext, train_trial
from seg.tuning.tracker import SearchTracker

__all__ = ["SEARCH_RECORD", "SUMMARY_FILE", "PROBE_FILE", "SearchResult", "TrialSummary", "SegOptunaSearch",
           "SearchTracker", "run_search", "start_ray", "build_searcher", "trial_state", "trial_dirname",
           "default_storage"]

log = logging.getLogger(__name__)

_summarise = summarise  # its name before seg.tuning.results; tests import it from here


def default_storage() -> Path:
    return REPO_ROOT / "ray_results"


# --- Ray --------------------------------------------------------------------------------------

CLIENT_CONNECT_ATTEMPTS = 3


def start_ray(num_cpus: int | None = None, address: str | None = None,
              env_vars: Mapping[str, str] | None = None) -> bool:
    """Join ``address`` (``auto`` or ``ray://...``) or start a local, loopback-only Ray.

    Returns whether this call started Ray (then the caller shuts it down). Does nothing
    when Ray is already initialised in this process.
    """
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
    space, probe_report = checked_space(space, address)

    tracking_uri = tracking.configure_mlflow(_absolute_uri(tracking_uri or tracking.default_tracking_uri()))
    client = tracking.get_client()
    check_tracking_server(tracking_uri)
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
            sweep(experiment_id, parent_run_id, {}, client)
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
        summaries, interrupted = summarise(space, search_dir, grid, experiment_id, parent_run_id, client)
        delete_lost_runs(experiment_id, parent_run_id, {t.trial_id for t in summaries}, client)
        if not interrupted:
            finish_stopped_trials(summaries, experiment_id, parent_run_id, num_overlays, client)
            drop_last_checkpoints(search_dir, summaries)
        sweep(experiment_id, parent_run_id, {t.trial_id: (t.state, t.failure_reason) for t in summaries}, client)
        result = SearchResult(name=space.name, search_dir=search_dir, experiment_id=experiment_id,
                              parent_run_id=parent_run_id, tracking_uri=tracking_uri, metric=budget.metric,
                              mode=budget.mode, trials=summaries, interrupted=interrupted,
                              wall_seconds=0.0, concurrency=budget.concurrency, phases=phases)
        result.summary_path = search_dir / SUMMARY_FILE
        phases["finish"] = time.monotonic() - mark
        result.wall_seconds = time.monotonic() - started
        result.summary_path.write_text(json.dumps(result.to_dict(), indent=2))
        close_parent(result, client)
        return result
    except BaseException as error:
        abort(experiment_id, parent_run_id, error, client)
        raise
    finally:
        if ray_started:
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
                                        decode=functools.partial(sampled_values, space)))
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


def trial_dirname(trial: Any) -> str:
    """Tune's directory of a trial: ``trial_<id>`` (the id is how results map to runs)."""
    return f"trial_{trial.trial_id}"


# --- the search directory and its parent run ----------------------------------------------

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

