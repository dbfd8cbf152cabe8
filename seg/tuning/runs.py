"""MLflow runs of a search: one parent run per search, one child run per trial, found again by tags.

Both are created idempotently, so that a restored search (``--resume``) or a retried
trial continues the runs it already has instead of duplicating them:

- the parent run's id is recorded in the search directory (``search.json``) and reopened;
- a trial's run is found by its parent and its Ray trial id (tags ``mlflow.parentRunId``
  and ``trial_id``).

A trial's run carries a ``state`` tag (``seg.tuning.records.State``): ``running`` until
the trial ends, then its final state, with the matching MLflow status. The tag and state
names are ``seg.tuning.records``'; the calls build on ``seg.tuning.tracking`` (its client
calls retry while SQLite is locked).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from seg.tuning import tracking
from seg.tuning.records import (STATUS_OF_STATE, TAG_FAILURE_REASON, TAG_FAILURE_TYPE, TAG_PARENT, TAG_ROLE,
                                TAG_SEARCH_DIR, TAG_STATE, TAG_TRIAL_ID, Role, State, trial_state)
from seg.tuning.tracking import call, get_client, log_tags

# the records' names re-exported here are those older code and tests import from this module
__all__ = ["trial_state", "trial_run_name", "TAG_TRIAL_ID", "TAG_STATE", "TAG_SEARCH_DIR", "TAG_ROLE",
           "STATUS_OF_STATE", "git_commit", "start_search_run", "find_trial_run", "start_trial_run", "trial_runs",
           "set_trial_state", "reopen_run", "has_artifact"]


def trial_run_name(config: Mapping[str, Any], defaults: Mapping[str, Any], trial_id: str) -> str:
    """What a trial's MLflow run is called: ``fcn16s-resnet18-lr5.6e-03-a1b2c3d4``.

    ``config`` holds the trial's sampled dotted keys, ``defaults`` the base config's
    (``Config.flat_dict()``) for the keys it does not sample.
    """
    def value(key: str) -> Any:
        return config.get(key, defaults.get(key))

    lr = value("optim.lr")
    lr_text = f"lr{lr:.1e}" if isinstance(lr, (int, float)) else f"lr{lr}"
    return f"{value('model.arch')}-{value('model.backbone')}-{lr_text}-{trial_id}"


def git_commit(repo: str) -> str:
    """``<sha>`` of HEAD, with ``-dirty`` when the tree has changes; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def start_search_run(experiment_id: str, search_dir: str, run_name: str, tags: Mapping[str, Any],
                     client: MlflowClient | None = None) -> str:
    """A new parent run for the search whose Ray experiment lives in ``search_dir``.

    Always new: a search restored with ``--resume`` reopens the run recorded in its
    directory (:func:`reopen_run`) instead of calling this.
    """
    return tracking.start_run(experiment_id, run_name=run_name, client=client,
                              tags={**tags, TAG_SEARCH_DIR: search_dir, TAG_ROLE: Role.SEARCH})


def find_trial_run(experiment_id: str, parent_run_id: str, trial_id: str,
                   client: MlflowClient | None = None) -> Run | None:
    """The run of trial ``trial_id`` under the parent run, or None."""
    return _find(experiment_id, {TAG_PARENT: parent_run_id, TAG_TRIAL_ID: trial_id}, client)


def start_trial_run(experiment_id: str, parent_run_id: str, trial_id: str, run_name: str,
                    tags: Mapping[str, Any] | None = None, client: MlflowClient | None = None) -> tuple[str, bool]:
    """The trial's run (reopened as RUNNING if it exists), or a new child run. Returns (id, created)."""
    client = get_client(client)
    existing = find_trial_run(experiment_id, parent_run_id, trial_id, client)
    if existing is not None:
        reopen_run(existing.info.run_id, client)
        log_tags(existing.info.run_id, {TAG_STATE: State.RUNNING}, client)
        return existing.info.run_id, False
    run_id = tracking.start_run(experiment_id, run_name=run_name, parent_run_id=parent_run_id, client=client,
                                tags={**(tags or {}), TAG_TRIAL_ID: trial_id, TAG_ROLE: Role.TRIAL,
                                      TAG_STATE: State.RUNNING})
    return run_id, True


def trial_runs(experiment_id: str, parent_run_id: str, client: MlflowClient | None = None) -> list[Run]:
    """Every child run of the parent run (all pages)."""
    client = get_client(client)
    runs, token = [], None
    while True:
        page = call(client.search_runs, [experiment_id], filter_string=_filter({TAG_PARENT: parent_run_id}),
                    max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def set_trial_state(run_id: str, state: State, reason: str | None = None, failure_type: str | None = None,
                    extra_tags: Mapping[str, Any] | None = None, client: MlflowClient | None = None) -> None:
    """Tag the run with its final ``state`` (and reason) and end it with the matching status."""
    client = get_client(client)
    tags = {TAG_STATE: state, **(extra_tags or {})}
    if reason:
        tags[TAG_FAILURE_REASON] = reason
    if failure_type:
        tags[TAG_FAILURE_TYPE] = failure_type
    log_tags(run_id, tags, client)
    call(client.set_terminated, run_id, STATUS_OF_STATE[state])


def reopen_run(run_id: str, client: MlflowClient | None = None) -> None:
    """Mark a run RUNNING again (a resumed search or a retried trial continues it)."""
    client = get_client(client)
    if call(client.get_run, run_id).info.status != "RUNNING":
        call(client.update_run, run_id, status="RUNNING")


def has_artifact(run_id: str, path: str, client: MlflowClient | None = None) -> bool:
    """Whether the run holds the artifact ``path`` (e.g. ``checkpoints/best.pt``)."""
    directory, _, _ = path.rpartition("/")
    listed = call(get_client(client).list_artifacts, run_id, directory or None)
    return any(item.path == path for item in listed)


def _find(experiment_id: str, tags: Mapping[str, str], client: MlflowClient | None) -> Run | None:
    runs = call(get_client(client).search_runs, [experiment_id], filter_string=_filter(tags), max_results=1,
                order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def _filter(tags: Mapping[str, str]) -> str:
    for key, value in tags.items():
        if "'" in value or "`" in key:
            raise ValueError(f"tag {key!r}={value!r}: quotes are not supported in lookups")
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
