"""The report of a search: its trials ranked, what mattered, how they learned.

Everything is read back from MLflow (the search's parent run and its child runs, see
``seg.tuning.runs``), so a report can be written at any time, for any search in the
store, on any machine that sees the store:

- ``trials.csv`` / ``trials.md``: every trial, ranked by the best value of the search's
  objective over the epochs it ran (its ``budget.metric`` and ``budget.mode``, as the
  search ranked them: ``val_miou``, higher is better, unless it said otherwise); failed
  and unfinished trials last, with their state and reason;
- ``<metric>_over_trials.png``: each trial's score in launch order and the running best;
- ``param_importance.png``: fANOVA importance (``optuna.importance`` with
  ``FanovaImportanceEvaluator(seed=0)``, deterministic) computed on an in-memory Optuna
  study rebuilt from the runs' params and scores. Only trials with a score (completed
  or early stopped) take part; with fewer than ``MIN_TRIALS_FOR_IMPORTANCE`` of them,
  or when they all score the same, the report says so instead;
- ``parallel_coordinates.png``: the sampled hyperparameters against the score;
- ``learning_curves.png``: the metric per epoch of the ``TOP_CURVES`` best trials;
- ``per_class_iou.png``: per-class IoU of the best trial at its best epoch;
- ``report.md`` tying them together (and ``seed_robust.md`` when ``scripts/retrain.py
  --top-k`` wrote one into the same directory).

The files are also logged to the parent run under ``report/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import optuna
import pandas as pd
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from seg.config import Config, config_from_dict
from seg.data.labels import CLASS_NAMES
from seg.errors import SegError, TrackingError
from seg.tuning import tracking
from seg.tuning.records import (BASE_CONFIG_ARTIFACT, CONFIG_ARTIFACT, SPACE_COPY, TAG_FAILURE_REASON, TAG_ROLE,
                                TAG_SAMPLED_KEYS, TAG_STATE, TAG_TRIAL_ID, Role, State, field_hints, param_value)
from seg.tuning.records import SCORED_STATES as FINISHED_STATES  # trials with a score
from seg.tuning.runs import trial_runs
from seg.tuning.space import METRICS, SearchSpace, space_from_dict

__all__ = ["METRIC", "MODE", "FINISHED_STATES", "MIN_TRIALS_FOR_IMPORTANCE", "TOP_CURVES", "Trial", "Search", "connect",
           "sqlite_path", "find_search_run", "objective", "load_search", "sampled_keys", "config_from_run",
           "param_value", "trials_table", "markdown_table", "importance", "write_report", "log_report"]

# the objective of a search whose parent run records none (see objective())
METRIC = "val_miou"
MODE = "max"  # higher is better
MIN_TRIALS_FOR_IMPORTANCE = 3
TOP_CURVES = 5


@dataclass(frozen=True)
class Trial:
    """One trial of a search, as its MLflow child run recorded it."""

    run_id: str
    name: str
    trial_id: str
    state: str  # completed, early_stopped, failed, interrupted or running
    reason: str  # why it failed ('' otherwise)
    params: Mapping[str, str]  # as logged (strings)
    metrics: Mapping[str, float]  # latest value of each metric
    history: Mapping[int, float]  # epoch -> the search's metric
    start_time: int  # ms since the epoch
    mode: str = MODE  # the search's: max (higher is better) or min

    @property
    def best_epoch(self) -> int:
        """The epoch of the best value of the metric (the first of equals; 0 when no epoch validated)."""
        sign = 1 if self.mode == "max" else -1
        finite = {epoch: value for epoch, value in self.history.items() if math.isfinite(value)}
        return max(finite, key=lambda epoch: (sign * finite[epoch], -epoch)) if finite else 0

    @property
    def score(self) -> float:
        """Best value of the metric over the epochs it ran (NaN when none validated)."""
        return self.history[self.best_epoch] if self.best_epoch else math.nan

    @property
    def epochs(self) -> int:
        return max(self.history, default=0)

    @property
    def has_score(self) -> bool:
        return self.state in FINISHED_STATES and math.isfinite(self.score)


@dataclass(frozen=True)
class Search:
    """A search: its parent run, trials (in launch order) and sampled keys."""

    name: str  # the parent run's name: the search directory's name (``quick``, ``quick-2``...)
    experiment_name: str  # the search space's name
    experiment_id: str
    run: Run  # the parent run
    trials: tuple[Trial, ...]
    keys: tuple[str, ...]  # the sampled hyperparameters (dotted config keys)
    space: SearchSpace | None = None  # rebuilt from the parent run's artifacts
    tracking_uri: str = ""
    metric: str = METRIC  # the objective the search ranked by (see :func:`objective`)
    mode: str = MODE

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def better(self) -> str:
        """``higher`` or ``lower``: which values of the metric are better."""
        return "higher" if self.mode == "max" else "lower"

    def ranked(self) -> list[Trial]:
        """Trials with a score, best first, then the others in launch order."""
        sign = -1 if self.mode == "max" else 1
        scored = sorted((t for t in self.trials if t.has_score), key=lambda t: (sign * t.score, t.start_time))
        return scored + [t for t in self.trials if not t.has_score]

    def best(self, count: int = 1) -> list[Trial]:
        """The ``count`` best trials; TrackingError when no trial finished with a score."""
        scored = [t for t in self.ranked() if t.has_score]
        if not scored:
            states = ", ".join(f"{t.name}: {t.state}" for t in self.trials) or "no trial runs at all"
            raise TrackingError(f"search '{self.name}' has no completed trial with a {self.metric} ({states})")
        return scored[:count]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions of the sampled keys: from the search space, else inferred from values."""
        if self.space is not None:
            return self.space.distributions()
        return {key: _inferred_distribution([t.params.get(key) for t in self.trials]) for key in self.keys}

    def encoded_params(self, trial: Trial) -> dict[str, Any] | None:
        """The trial's sampled values as Optuna holds them (None if one is missing)."""
        encoded = {}
        by_key = {param.key: param for param in self.space.params} if self.space is not None else {}
        for key in self.keys:
            if key not in trial.params:
                return None
            value = param_value(key, trial.params[key])
            encoded[key] = by_key[key].encode(value) if key in by_key else _category(value)
        return encoded


def connect(tracking_uri: str | None = None) -> MlflowClient:
    """A client for ``tracking_uri`` (default: ``tracking.default_tracking_uri()``), checked to answer.

    A SQLite store that does not exist is an error (rather than a new empty store).
    """
    uri = tracking.configure_mlflow(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in our output
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(f"no tracking store at {path} (from {uri}): run a search first "
                            f"(scripts/tune.py), or pass --tracking-uri")
    try:
        client = MlflowClient(tracking_uri=uri)
        tracking.call(client.search_experiments, max_results=1)
    except (MlflowException, OSError) as error:
        raise TrackingError(f"cannot open the tracking store {uri}: {_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and HTTP errors of a bad URI
        if type(error).__module__.split(".")[0] not in ("sqlalchemy", "requests", "urllib3"):
            raise
        raise TrackingError(f"cannot open the tracking store {uri}: {_first_line(error)}") from None
    return client


def find_search_run(client: MlflowClient, name: str | None = None) -> Run:
    """The parent run of search ``name``; None: the newest search in the store.

    ``name`` is, in this order: a parent run id, a search's name (its parent run's name,
    which is its directory's name: ``quick``, ``quick-2``...), or a search space's name
    (its MLflow experiment; then the newest search in it).
    """
    experiments = tracking.call(client.search_experiments)
    if not experiments:
        raise TrackingError(f"the tracking store {client.tracking_uri} holds no experiment: run a search first "
                            f"(scripts/tune.py SPACE.yaml)")
    ids = [e.experiment_id for e in experiments]
    is_search = f"tags.`{TAG_ROLE}` = '{Role.SEARCH}'"
    if name is None:
        runs = _search_runs(client, ids, is_search, max_results=1)
        if not runs:
            raise TrackingError(f"no search in {client.tracking_uri}: run one first (scripts/tune.py SPACE.yaml)")
        return runs[0]
    if re.fullmatch(r"[0-9a-f]{32}", name):
        with contextlib.suppress(MlflowException):
            run = tracking.call(client.get_run, name)
            if run.data.tags.get(TAG_ROLE) == Role.SEARCH:
                return run
    runs = _search_runs(client, ids, f"{is_search} and attributes.run_name = '{_quoted(name)}'", max_results=1)
    if not runs:
        matching = [e.experiment_id for e in experiments if e.name == name]
        runs = _search_runs(client, matching, is_search, max_results=1) if matching else []
    if not runs:
        known = sorted({r.info.run_name for r in _search_runs(client, ids, is_search)})
        raise TrackingError(f"no search named '{name}' in {client.tracking_uri}. "
                            f"Searches there: {', '.join(known) or 'none'}")
    return runs[0]


def objective(run: Run) -> tuple[str, str]:
    """(metric, mode) the search of parent run ``run`` ranked its trials by: the run's
    ``budget.metric`` and ``budget.mode`` params (``seg.tuning.search`` logs the budget
    there, command-line overrides included); ``(METRIC, MODE)`` when it records none."""
    params = run.data.params
    metric = params.get("budget.metric", METRIC)
    mode = params.get("budget.mode") or METRICS.get(metric, MODE)
    if mode not in ("max", "min"):
        raise TrackingError(f"search run {run.info.run_id} records budget.mode {mode!r}: expected max or min")
    return metric, mode


def load_search(client: MlflowClient, name: str | None = None) -> Search:
    """The search ``name`` (see :func:`find_search_run`) with its trials and the histories of its metric."""
    run = find_search_run(client, name)
    experiment = tracking.call(client.get_experiment, run.info.experiment_id)
    metric, mode = objective(run)
    children = [child for child in trial_runs(run.info.experiment_id, run.info.run_id, client)
                if child.data.tags.get(TAG_ROLE, Role.TRIAL) == Role.TRIAL]
    trials = tuple(sorted((_trial(client, child, metric, mode) for child in children),
                          key=lambda t: (t.start_time, t.name)))
    space = _logged_space(client, run)
    keys = sampled_keys(children) or (list(space.keys) if space is not None else []) or _varying_keys(trials)
    return Search(name=run.info.run_name or run.info.run_id, experiment_name=experiment.name,
                  experiment_id=run.info.experiment_id, run=run, trials=trials, keys=tuple(keys), space=space,
                  tracking_uri=client.tracking_uri, metric=metric, mode=mode)


def sampled_keys(trials: Iterable[Run]) -> list[str]:
    """The dotted keys the trial runs' search sampled (their ``seg.sampled_keys`` tags), in order."""
    return list(dict.fromkeys(key for run in trials
                              for key in run.data.tags.get(TAG_SAMPLED_KEYS, "").split(",") if key))


def config_from_run(client: MlflowClient, run: Run) -> Config:
    """The Config a run trained with: its ``config.yaml`` artifact, else its dotted-key params."""
    source = f"run {run.info.run_id}"
    with tempfile.TemporaryDirectory() as directory:
        try:
            path = tracking.call(client.download_artifacts, run.info.run_id, CONFIG_ARTIFACT, directory)
        except (MlflowException, OSError):
            path = None
        if path is not None:
            return config_from_dict(yaml.safe_load(Path(path).read_text()), source=f"{source} (config.yaml)")
    hints = field_hints()
    tree: dict[str, dict[str, Any]] = {}
    for key, text in run.data.params.items():
        if key in hints:
            section, _, name = key.partition(".")
            tree.setdefault(section, {})[name] = param_value(key, text)
    if not tree:
        raise TrackingError(f"{source} has neither a config.yaml artifact nor config params: "
                            f"is it a trial of a search?")
    return config_from_dict(tree, source=f"{source} (params)")


def trials_table(search: Search) -> pd.DataFrame:
    """One row per trial, ranked: rank (empty when unscored), scores, state, reason, sampled values."""
    rows = []
    rank = 0
    for trial in search.ranked():
        rank += trial.has_score
        row = {
            "rank": rank if trial.has_score else None,
            "trial": trial.name,
            "state": trial.state,
            search.metric: trial.score,
            "best_epoch": trial.best_epoch or None,
            "epochs": trial.epochs,
            f"final_{search.metric}": trial.history.get(trial.epochs, math.nan),
            "train_loss": trial.metrics.get("train_loss", math.nan),
        }
        for key in search.keys:
            text = trial.params.get(key)
            row[key] = None if text is None else _cell(param_value(key, text))
        row["reason"] = trial.reason
        row["trial_id"] = trial.trial_id
        row["run_id"] = trial.run_id
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not rows:
        return frame
    return frame.astype({"rank": "Int64", "best_epoch": "Int64"})


def markdown_table(frame: pd.DataFrame, max_chars: int = 80) -> str:
    """A GitHub Markdown table (floats to 4 significant digits, long cells cut)."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
            return ""
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_chars else text[:max_chars - 3] + "..."

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def importance(search: Search) -> tuple[dict[str, float] | None, optuna.Study | None, str]:
    """(fANOVA importances, the rebuilt study, a note). Importances are None, with the note
    saying why, when they cannot be computed; the study is None when it holds no trial."""
    scored = [t for t in search.trials if t.has_score]
    if not search.keys:
        return None, None, "The search sampled no hyperparameter, so there is nothing to rank."
    distributions = search.distributions()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=search.name, direction="maximize" if search.mode == "max" else "minimize")
    skipped = []
    for trial in scored:
        params = search.encoded_params(trial)
        if params is None:
            skipped.append(f"{trial.name} (a sampled value is missing)")
            continue
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=trial.score))
        except ValueError as error:  # a value outside the space: the space changed after the run
            skipped.append(f"{trial.name} ({error})")
    count = len(study.trials)
    note = f" Left out: {'; '.join(skipped)}." if skipped else ""
    if count < MIN_TRIALS_FOR_IMPORTANCE:
        return None, study if count else None, (
            f"Hyperparameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE} trials with a {search.metric}; "
            f"this search has {count}.{note} Run more trials to see which hyperparameters matter.")
    values = [t.value for t in study.trials]
    if max(values) - min(values) == 0:
        return None, study, (f"All {count} scored trials have the same {search.metric}: importance is "
                             f"undefined.{note}")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    scores = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return ({key: float(value) for key, value in scores.items()}, study,
            f"fANOVA importance (optuna, seed 0) over {count} scored trials (early-stopped ones with the best "
            f"{search.metric} they reached); failed and unfinished trials are left out.{note}")


def write_report(search: Search, out_dir: str | Path, client: MlflowClient, log_to_parent: bool = True) -> Path:
    """Write the report files into ``out_dir`` (and log them to the parent run); returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(search)
    table.to_csv(out / "trials.csv", index=False)
    shown = table.drop(columns=["run_id", "trial_id"], errors="ignore")
    (out / "trials.md").write_text(markdown_table(shown))
    written = [out / "trials.csv", out / "trials.md"]

    importances, study, importance_note = importance(search)
    figures = {_over_trials_file(search): _plot_over_trials(search)}
    if importances is not None:
        figures["param_importance.png"] = _plot_importance(importances, search.metric)
    if study is not None and len(study.trials) >= 2:
        figures["parallel_coordinates.png"] = _plot_parallel(study, search.keys, search.metric)
    scored = [t for t in search.ranked() if t.has_score]
    if scored:
        figures["learning_curves.png"] = _plot_curves(scored[:TOP_CURVES], search.metric)
        per_class = _per_class_iou(client, scored[0])
        figures["per_class_iou.png"] = _plot_per_class(per_class, scored[0], search.metric)
    else:
        per_class = {}
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        written.append(out / name)

    text = _report_markdown(search, shown, importances, importance_note, figures, per_class, out)
    (out / "report.md").write_text(text)
    written.append(out / "report.md")
    if log_to_parent:
        log_report(client, search.run_id, written + [p for p in (out / "seed_robust.csv", out / "seed_robust.md")
                                                      if p.is_file()])
    return out / "report.md"


def log_report(client: MlflowClient, run_id: str, paths: Iterable[Path]) -> None:
    """Log ``paths`` to the run under ``report/`` (the run may be finished)."""
    for path in paths:
        tracking.call(client.log_artifact, run_id, str(path), "report")


# -- reading runs ---------------------------------------------------------------------------------

def _search_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str,
                 max_results: int | None = None) -> list[Run]:
    return list(tracking.call(client.search_runs, experiment_ids, filter_string=filter_string,
                              max_results=max_results or 1000, order_by=["attributes.start_time DESC"]))


def _trial(client: MlflowClient, run: Run, metric: str, mode: str) -> Trial:
    tags = run.data.tags
    history = {m.step: m.value for m in tracking.call(client.get_metric_history, run.info.run_id, metric)}
    # a run without a state tag (not a search's trial, or one that never started): its MLflow status tells
    # what it can; this reads a record back, so it is not seg.tuning.records.trial_state
    state = tags.get(TAG_STATE) or {"FINISHED": State.COMPLETED, "FAILED": State.FAILED}.get(run.info.status,
                                                                                              State.RUNNING)
    return Trial(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                 trial_id=tags.get(TAG_TRIAL_ID, ""), state=state, reason=tags.get(TAG_FAILURE_REASON, ""),
                 params=dict(run.data.params), metrics=dict(run.data.metrics), history=history,
                 start_time=run.info.start_time or 0, mode=mode)


def _logged_space(client: MlflowClient, run: Run) -> SearchSpace | None:
    """The search space, rebuilt from the parent run's ``search_space.yaml`` and ``base_config.yaml``
    (None when they are missing or no longer validate: the report then infers the ranges)."""
    try:
        listed = {item.path for item in tracking.call(client.list_artifacts, run.info.run_id)}
    except (MlflowException, OSError):
        return None
    if SPACE_COPY not in listed:
        return None
    with tempfile.TemporaryDirectory() as directory:
        try:
            path = Path(tracking.call(client.download_artifacts, run.info.run_id, SPACE_COPY, directory))
            text = path.read_text()
            tree = yaml.safe_load(text)
            if BASE_CONFIG_ARTIFACT in listed and isinstance(tree, dict):
                # the base as the search resolved it (the file it named may have moved since)
                tree["base"] = tracking.call(client.download_artifacts, run.info.run_id, BASE_CONFIG_ARTIFACT,
                                             directory)
            return space_from_dict(tree, source=path, text=text)
        except (SegError, MlflowException, OSError, yaml.YAMLError):
            return None


def _varying_keys(trials: Sequence[Trial]) -> list[str]:
    """Config keys whose logged value differs between trials (the sampled ones, when no space was logged)."""
    hints = field_hints()
    keys = sorted({key for t in trials for key in t.params if key in hints})
    return [key for key in keys if len({t.params.get(key) for t in trials}) > 1]


def _inferred_distribution(texts: list[str | None]) -> optuna.distributions.BaseDistribution:
    values = [yaml.safe_load(t) if t not in (None, "None") else None for t in texts]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and len(numbers) == len(values):
        low, high = float(min(numbers)), float(max(numbers))
        if low == high:
            high = low + 1.0
        return optuna.distributions.FloatDistribution(low, high, log=low > 0 and high / low >= 100)
    return optuna.distributions.CategoricalDistribution(sorted({_category(v) for v in values}, key=str))


def _category(value: Any) -> Any:
    """Optuna categories must be None, bool, int, float or str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _cell(value: Any) -> Any:
    return str(list(value)) if isinstance(value, tuple) else value


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(_cell(value))


def _per_class_iou(client: MlflowClient, trial: Trial) -> dict[str, float]:
    """Per-class IoU of the trial at its best epoch (from the ``val_iou/<class>`` histories)."""
    result = {}
    for name in CLASS_NAMES:
        history = tracking.call(client.get_metric_history, trial.run_id, f"val_iou/{name}")
        values = [m.value for m in history if m.step == trial.best_epoch]
        result[name] = values[-1] if values else math.nan
    return result


# -- plots (matplotlib's object API: no global state, no display needed) ----------------------------

def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _over_trials_file(search: Search) -> str:
    return f"{search.metric}_over_trials.png"


def _plot_over_trials(search: Search) -> Any:
    figure = _figure(7, 3.6)
    axes = figure.add_subplot()
    order = np.arange(1, len(search.trials) + 1)
    keep = max if search.mode == "max" else min
    running, best = [], math.nan
    for trial in search.trials:
        if trial.has_score:
            best = trial.score if math.isnan(best) else keep(best, trial.score)
        running.append(best)
    styles = {State.COMPLETED: ("o", "tab:blue"), State.EARLY_STOPPED: ("s", "tab:orange")}
    for state, (marker, colour) in styles.items():
        points = [(n, t.score) for n, t in zip(order, search.trials) if t.state == state and t.has_score]
        if points:
            axes.scatter(*zip(*points), marker=marker, color=colour, label=state.replace("_", " "), zorder=3)
    others = [n for n, t in zip(order, search.trials) if not t.has_score]
    if others:
        worst = min if search.mode == "max" else max
        floor = worst([t.score for t in search.trials if t.has_score], default=0.0)
        axes.scatter(others, [floor] * len(others), marker="x", color="tab:red", label="failed / no score", zorder=3)
    axes.step(order, running, where="post", color="black", linewidth=1, label="best so far")
    axes.set_xlabel("trial (launch order)")
    axes.set_ylabel(f"best {search.metric} ({search.better} is better)")
    axes.set_title(f"{search.name}: {search.metric} over trials")
    axes.set_xticks(order)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def _plot_importance(importances: Mapping[str, float], metric: str) -> Any:
    names = list(importances)[::-1]
    figure = _figure(7, 0.5 * len(names) + 1.4)
    axes = figure.add_subplot()
    axes.barh(names, [importances[n] for n in names], color="tab:blue")
    for y, name in enumerate(names):
        axes.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize="small")
    axes.set_xlabel(f"fANOVA importance (share of the variance of {metric})")
    axes.set_xlim(0, max(1.0, max(importances.values()) * 1.15))
    axes.set_title("Hyperparameter importance")
    return figure


def _plot_parallel(study: optuna.Study, keys: Sequence[str], metric: str) -> Any:
    """Each scored trial as a line through its (normalised) hyperparameters, coloured by its score."""
    from matplotlib import colormaps

    trials = study.trials
    values = np.array([t.value for t in trials])
    low, high = values.min(), values.max()
    colour = colormaps["viridis"]
    figure = _figure(max(6, 1.8 * (len(keys) + 1)), 4)
    axes = figure.add_subplot()
    columns, labels = [], []
    for key in keys:
        distribution = study.trials[0].distributions[key]
        raw = [t.params[key] for t in trials]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            choices = list(distribution.choices)
            column = np.array([choices.index(v) for v in raw], dtype=float) / max(1, len(choices) - 1)
            labels.append((key, [str(c) for c in choices]))
        else:
            numbers = np.array(raw, dtype=float)
            lo, hi = float(distribution.low), float(distribution.high)
            if distribution.log:
                numbers, lo, hi = np.log10(numbers), math.log10(lo), math.log10(hi)
            column = (numbers - lo) / ((hi - lo) or 1.0)
            labels.append((key, [f"{distribution.low:.3g}", f"{distribution.high:.3g}"]))
        columns.append(column)
    columns.append((values - low) / ((high - low) or 1.0))
    labels.append((metric, [f"{low:.3g}", f"{high:.3g}"]))
    data = np.stack(columns, axis=1)
    xs = np.arange(data.shape[1])
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    for row, value in sorted(zip(data, values), key=lambda pair: sign * pair[1]):  # best drawn last, on top
        axes.plot(xs, row, color=colour((value - low) / ((high - low) or 1.0)), alpha=0.8, linewidth=1.5)
    for x, (key, ticks) in zip(xs, labels):
        axes.axvline(x, color="grey", linewidth=0.8)
        for position, tick in zip(np.linspace(0, 1, len(ticks)), ticks):
            axes.text(x + 0.03, position, tick, fontsize="x-small", va="center")
    axes.set_xticks(xs, [key for key, _ in labels], rotation=20, ha="right", fontsize="small")
    axes.set_yticks([])
    axes.set_ylim(-0.05, 1.05)
    axes.set_title(f"Parallel coordinates ({len(trials)} scored trials, colour = {metric})")
    return figure


def _plot_curves(trials: Sequence[Trial], metric: str) -> Any:
    figure = _figure(7, 3.8)
    axes = figure.add_subplot()
    for rank, trial in enumerate(trials, 1):
        epochs = sorted(trial.history)
        axes.plot(epochs, [trial.history[e] for e in epochs], marker="o", markersize=3,
                  label=f"#{rank} {trial.name} ({trial.score:.3f})")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"Learning curves of the top {len(trials)} trials")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def _plot_per_class(per_class: Mapping[str, float], trial: Trial, metric: str) -> Any:
    figure = _figure(7, 5)
    axes = figure.add_subplot()
    names = list(per_class)[::-1]
    values = [0.0 if math.isnan(per_class[n]) else per_class[n] for n in names]
    axes.barh(names, values, color="tab:green")
    for y, name in enumerate(names):
        axes.text(values[y], y, " n/a" if math.isnan(per_class[name]) else f" {per_class[name]:.2f}",
                  va="center", fontsize="x-small")
    axes.set_xlim(0, 1.08)
    axes.set_xlabel("IoU")
    axes.set_title(f"Per-class IoU of the best trial {trial.name} (epoch {trial.best_epoch}, "
                   f"{metric} {trial.score:.3f})")
    return figure


# -- report.md --------------------------------------------------------------------------------------

def _report_markdown(search: Search, table: pd.DataFrame, importances: Mapping[str, float] | None,
                     importance_note: str, figures: Mapping[str, Any], per_class: Mapping[str, float],
                     out: Path) -> str:
    counts = pd.Series([t.state for t in search.trials], dtype=object).value_counts()
    started = dt.datetime.fromtimestamp((search.run.info.start_time or 0) / 1000).strftime("%Y-%m-%d %H:%M")
    lines = [f"# Search report: {search.name}", "",
             f"- Parent run `{search.run_id}` in experiment `{search.experiment_name}` (id {search.experiment_id})"
             f" of `{search.tracking_uri}`, started {started}",
             f"- Trials: {len(search.trials)} ("
             + ", ".join(f"{count} {state.replace('_', ' ')}" for state, count in counts.items()) + ")",
             f"- Sampled hyperparameters: {', '.join(f'`{k}`' for k in search.keys) or 'none'}",
             f"- Ranking: best `{search.metric}` over the epochs a trial ran ({search.better} is better)", ""]
    scored = [t for t in search.ranked() if t.has_score]
    if scored:
        best = scored[0]
        values = ", ".join(f"`{k}` = {_shown(param_value(k, best.params[k]))}" for k in search.keys
                           if k in best.params)
        lines += ["## Best trial", "",
                  f"**{best.name}** (run `{best.run_id}`): {search.metric} **{best.score:.4f}** at epoch "
                  f"{best.best_epoch} of {best.epochs}" + (f"; {values}" if values else "") + ".", "",
                  f"Retrain it: `python scripts/retrain.py --search {search.name}`", ""]
    else:
        lines += ["## Best trial", "", f"No trial finished with a {search.metric}: nothing to rank.", ""]
    lines += ["## Trials", "", markdown_table(table), "CSV with full precision and run ids: `trials.csv`.", ""]
    failed = [t for t in search.trials if not t.has_score]
    if failed:
        lines += ["### Trials without a score", ""]
        lines += [f"- {t.name}: {t.state}" + (f": {t.reason}" if t.reason else "") for t in failed]
        lines.append("")
    over_trials = _over_trials_file(search)
    if over_trials in figures:
        lines += [f"## {search.metric} over trials", "", f"![{search.metric} over trials]({over_trials})", ""]
    lines += ["## Hyperparameter importance", "", importance_note, ""]
    if importances is not None:
        lines += ["| hyperparameter | importance |", "|---|---:|"]
        lines += [f"| `{k}` | {v:.3f} |" for k, v in importances.items()]
        lines += ["", "![importance](param_importance.png)", ""]
    if "parallel_coordinates.png" in figures:
        lines += ["## Parallel coordinates", "", "![parallel coordinates](parallel_coordinates.png)", ""]
    if "learning_curves.png" in figures:
        lines += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    if per_class:
        lines += ["## Per-class IoU of the best trial", "", "![per-class IoU](per_class_iou.png)", "",
                  "| class | IoU |", "|---|---:|"]
        lines += [f"| {k} | {'n/a' if math.isnan(v) else f'{v:.4f}'} |" for k, v in per_class.items()]
        lines += ["", "n/a: the class occurs neither in the ground truth nor in the predictions.", ""]
    robust = out / "seed_robust.md"
    if robust.is_file():
        lines += ["## Seed-robust comparison of the top trials", "", robust.read_text(), ""]
    return "\n".join(lines)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    location = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return None if location in ("", ":memory:") else Path(location).absolute()


def _quoted(text: str) -> str:
    if "'" in text:
        raise TrackingError(f"search name {text!r}: quotes are not allowed")
    return text


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
