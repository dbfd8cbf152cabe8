"""The records of a search: trial states, tag and artifact names, logged param values.

These are the nouns every other module of the tuning layer reads and writes, defined
once here so that the writer of a tag and its readers cannot drift apart:

- :class:`State`, a trial's state (also the ``state`` tag of its MLflow run, and of the
  search's parent run); :func:`trial_state` derives a finished trial's state from its
  last result, :func:`optuna_state` says what Optuna is told of it and
  :data:`STATUS_OF_STATE` which status its MLflow run ends with;
- the tags (``TAG_*``) of a search's parent run and of its trials' child runs, and the
  roles (:class:`Role`) that tell those runs apart;
- the files a search keeps in its directory ``<storage>/<name>`` and the artifacts of
  its runs;
- :func:`param_value`, a logged MLflow param read back as the config value it was.

The runs themselves are created, found and closed by ``seg.tuning.runs``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import yaml
from optuna.trial import TrialState as OptunaState

from seg.config import Config, coerce
from seg.errors import ConfigError

__all__ = ["State", "FINAL_STATES", "SCORED_STATES", "STATUS_OF_STATE", "trial_state", "optuna_state", "Role",
           "TAG_PARENT", "TAG_ROLE", "TAG_STATE", "TAG_TRIAL_ID", "TAG_SEARCH", "TAG_SEARCH_DIR", "TAG_SPACE_FILE",
           "TAG_SAMPLED_KEYS", "TAG_FAILURE_REASON", "TAG_FAILURE_TYPE", "TAG_LAST_ERROR", "TAG_RETRIES",
           "TAG_EPOCHS", "TAG_SAMPLED_PREFIX", "TAG_RESUMED_FROM", "TAG_GIT_COMMIT", "TAG_MLFLOW_GIT_COMMIT",
           "TAG_MLFLOW_NOTE", "TAG_SEED", "TAG_METRIC", "TAG_MODE", "TAG_RESUMED", "TAG_TRIALS_RANKED",
           "TAG_TRIALS_FAILED", "TAG_BEST_TRIAL_ID", "TAG_BEST_RUN_ID",
           "SEARCH_RECORD", "SPACE_PICKLE", "SPACE_COPY", "SUMMARY_FILE", "PROBE_FILE", "TRIALS_SUBDIR",
           "BASE_CONFIG_ARTIFACT", "CONFIG_ARTIFACT", "CHECKPOINTS_ARTIFACT", "field_hints", "param_value"]


# --- trial states ----------------------------------------------------------------------------

class State(StrEnum):
    """What became of a trial; the value is the text of its run's ``state`` tag.

    ``running``, then ``completed`` (all epochs), ``early_stopped`` (stopped by the
    scheduler), ``failed`` (with ``failure_reason``) or ``interrupted`` (the search
    stopped before the trial finished; a resumed search reopens it). A run whose trial Ray
    forgot (a driver killed before Ray's next snapshot) ends ``lost`` and is deleted. The
    parent run of a search uses ``running``, ``completed``, ``interrupted`` and ``failed``.
    """

    RUNNING = "running"
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    LOST = "lost"


FINAL_STATES = (State.COMPLETED, State.EARLY_STOPPED, State.FAILED)  # a resumed search does not rerun these
SCORED_STATES = (State.COMPLETED, State.EARLY_STOPPED)  # trials ranked by their metric
# the MLflow status each final state ends its run with
STATUS_OF_STATE = {State.COMPLETED: "FINISHED", State.EARLY_STOPPED: "FINISHED", State.FAILED: "FAILED",
                   State.INTERRUPTED: "KILLED"}


def trial_state(result: Mapping[str, Any] | None, errored: bool, max_epochs: int) -> State:
    """A finished trial's state from its last result: failed, completed, early_stopped or interrupted."""
    result = result or {}
    if errored or result.get("failed"):
        return State.FAILED
    epoch = result.get("epoch") or 0
    if epoch >= max_epochs:
        return State.COMPLETED
    return State.EARLY_STOPPED if epoch >= 1 else State.INTERRUPTED


def optuna_state(state: State, errored: bool, has_value: bool) -> OptunaState:
    """What Optuna is told of a trial that ended in ``state`` (see ``seg.tuning.searcher``).

    COMPLETE when it ran all epochs and ``has_value`` (a finite value of the metric);
    PRUNED when the scheduler stopped it, or when it failed without ``errored``, that is
    because of its parameters (it reported ``failed``: diverged, impossible config), so
    that TPE ranks it below every completed trial; FAIL otherwise (a crash, which says
    nothing about the parameters, or a trial that never ran an epoch).
    """
    if state == State.COMPLETED and has_value:
        return OptunaState.COMPLETE
    if state == State.EARLY_STOPPED or (state == State.FAILED and not errored):
        return OptunaState.PRUNED
    return OptunaState.FAIL


class Role(StrEnum):
    """The ``seg.role`` tag: what a run of the tracking store is."""

    SEARCH = "search"  # the parent run of a search
    TRIAL = "trial"  # one trial, a child run of a search
    RETRAIN = "retrain"  # a retraining of trials (seg.tuning.retrain)
    RETRAIN_SEED = "retrain_seed"  # one seed of a retraining, its child run


# --- tags ------------------------------------------------------------------------------------

TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: a child run's parent
TAG_ROLE = "seg.role"  # a Role
TAG_STATE = "state"  # a State
TAG_FAILURE_REASON = "failure_reason"  # ExceptionType: message, when a run failed
TAG_FAILURE_TYPE = "failure_type"
TAG_RESUMED_FROM = "seg.resumed_from"  # the checkpoint a run resumed from
# on the parent run of a search (and its name, TAG_SEARCH, on each trial run too)
TAG_SEARCH = "seg.search"
TAG_SEARCH_DIR = "seg.search_dir"
TAG_SPACE_FILE = "seg.space_file"
TAG_GIT_COMMIT = "git_commit"
TAG_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
TAG_MLFLOW_NOTE = "mlflow.note.content"  # the description the MLflow UI shows
# MLflow UI's own, on an experiment: <prefix><key> holds a saved view of its runs page as JSON, opened
# by ?viewStateShareKey=<key> (what the UI's "Share" button writes; MLflow 3.17 reads plain JSON too)
TAG_SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
TAG_SEED = "seed"
TAG_METRIC = "metric"  # budget.metric and budget.mode (also logged as params)
TAG_MODE = "mode"
TAG_RESUMED = "resumed"  # when it was last resumed (seconds since the epoch)
TAG_TRIALS_RANKED = "trials_ranked"  # set when the search ends, like the three below
TAG_TRIALS_FAILED = "trials_failed"
TAG_BEST_TRIAL_ID = "best_trial_id"
TAG_BEST_RUN_ID = "best_run_id"
# on each trial run
TAG_TRIAL_ID = "trial_id"  # Ray's trial id: how a resumed search finds the trial's run
TAG_SAMPLED_KEYS = "seg.sampled_keys"  # the dotted config keys the search samples, comma-separated
TAG_EPOCHS = "epochs"  # epochs completed, once the trial ended
TAG_LAST_ERROR = "last_error"  # the latest crash of a trial Tune may still retry
TAG_RETRIES = "retries"
TAG_SAMPLED_PREFIX = "sampled."  # sampled.<key>: the sampled values of a trial whose config was refused


# --- files and artifacts ---------------------------------------------------------------------

# in the search directory <storage>/<name>
SEARCH_RECORD = "search.json"  # written when a search starts; read by --resume
SPACE_PICKLE = "search_space.pkl"  # the validated space the trials use, for --resume
SPACE_COPY = "search_space.yaml"  # the space's text; also an artifact of the parent run
SUMMARY_FILE = "summary.json"  # the ranked trials; also an artifact of the parent run
TRIALS_SUBDIR = "trials"  # <search dir>/trials/<trial id>: each trial's last.pt and best.pt
# artifacts
PROBE_FILE = "probe.json"  # the memory probe's results, on the parent run
BASE_CONFIG_ARTIFACT = "base_config.yaml"  # the search's base config as resolved, on the parent run
CONFIG_ARTIFACT = "config.yaml"  # the full Config of a training run (each trial's run too)
CHECKPOINTS_ARTIFACT = "checkpoints"  # the folder of a run's best.pt (and last.pt, outside a search)


# --- logged params ---------------------------------------------------------------------------

def field_hints() -> dict[str, Any]:
    """``{"optim.lr": float, "data.crop_size": tuple[int, int], ...}`` for every Config field."""
    hints = {}
    for section in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[section.name]
        for key, hint in typing.get_type_hints(section_type).items():
            hints[f"{section.name}.{key}"] = hint
    return hints


def param_value(key: str, text: str) -> Any:
    """A logged MLflow param (a string, see ``seg.tuning.tracking.log_config``) back to the
    config value of the dotted key ``key``: ``"None"`` is None, ``"[64, 128]"`` a tuple."""
    hint = field_hints().get(key)
    if text == "None":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if hint is None:
        return value
    try:
        return coerce(value, hint, key, "logged param")
    except ConfigError:
        return text  # e.g. a string field whose value reads as a number in YAML
