"""What a search produced, once Tune's ``fit`` returns: its trials ranked, and no MLflow run left open.

:func:`summarise` ranks the trials of Tune's ResultGrid, their states read from their
runs' ``state`` tags (:class:`TrialSummary`, :class:`SearchResult`, written as
``summary.json``); the final sweep logs overlays and ``best.pt`` for trials the
scheduler stopped, deletes the runs of trials Ray forgot, ends every run still RUNNING
and closes the search's parent run (:func:`abort` does the same for a search that
stopped with an exception).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from seg.errors import ConfigError, SegError
from seg.tuning import runs, tracking
from seg.tuning.records import (CHECKPOINTS_ARTIFACT, FINAL_STATES, SCORED_STATES, TAG_BEST_RUN_ID, TAG_BEST_TRIAL_ID,
                                TAG_FAILURE_REASON, TAG_STATE, TAG_TRIAL_ID, TAG_TRIALS_FAILED, TAG_TRIALS_RANKED,
                                State, param_value, trial_state)
from seg.tuning.space import SearchSpace, short_names
from seg.tuning.tracker import exception_reason
from seg.tuning.trainable import trial_output_dir

__all__ = ["TrialSummary", "SearchResult", "summarise", "finish_stopped_trials", "delete_lost_runs",
           "drop_last_checkpoints", "sweep", "close_parent", "abort", "sampled_values"]

log = logging.getLogger(__name__)


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
        keys = list(dict.fromkeys(key for trial in self.trials for key in trial.params))[:max_params]
        short = short_names(keys)
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


def summarise(space: SearchSpace, search_dir: Path, grid: Any, experiment_id: str, parent_run_id: str,
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
                               run_id=run.info.run_id if run else None, params=sampled_values(space, sampled),
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


def finish_stopped_trials(summaries: list[TrialSummary], experiment_id: str, parent_run_id: str,
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


def delete_lost_runs(experiment_id: str, parent_run_id: str, trial_ids: set[str], client: Any) -> None:
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


def drop_last_checkpoints(search_dir: Path, summaries: list[TrialSummary]) -> None:
    """Finished trials keep ``best.pt`` only: their ``last.pt`` served resuming, which Tune's
    own checkpoint copy still allows (a VGG16 checkpoint is ~1 GB)."""
    for summary in summaries:
        if summary.state in FINAL_STATES:
            directory = trial_output_dir(search_dir, summary.trial_id)
            (directory / "last.pt").unlink(missing_ok=True)
            shutil.rmtree(directory / "report", ignore_errors=True)


def sweep(experiment_id: str, parent_run_id: str, states: Mapping[str, tuple[State, str | None]],
           client: Any) -> None:
    """End every child run still RUNNING: with its trial's state if known, else ``interrupted``."""
    for run in runs.trial_runs(experiment_id, parent_run_id, client):
        trial_id = run.data.tags.get(TAG_TRIAL_ID)
        state, reason = states.get(trial_id, (State.INTERRUPTED, None))
        if run.info.status == "RUNNING" or (trial_id in states and run.data.tags.get(TAG_STATE) != state):
            if state == State.INTERRUPTED and run.info.status != "RUNNING":
                continue
            runs.set_trial_state(run.info.run_id, state, reason=reason, client=client)


def close_parent(result: SearchResult, client: Any) -> None:
    """End the search's parent run: its final state, best trial and ``summary.json``."""
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


def abort(experiment_id: str, parent_run_id: str, error: BaseException, client: Any) -> None:
    """The search stopped with an exception: leave no run RUNNING, then let the error through."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        sweep(experiment_id, parent_run_id, {}, client)
        tracking.log_tags(parent_run_id, {TAG_STATE: State.INTERRUPTED if status == "KILLED" else State.FAILED}, client)
        tracking.end_run(parent_run_id, status, None if status == "KILLED" else error, client)
    except Exception as cleanup_error:  # noqa: BLE001 - the original error is the one to report
        log.warning("could not close the MLflow runs of the search: %s", cleanup_error)


def sampled_values(space: SearchSpace, config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled keys as config values (the space's decoding), else ``config`` as it is."""
    try:
        return space.decode({key: value for key, value in config.items() if key in space.keys})
    except SegError:
        return dict(config)


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
