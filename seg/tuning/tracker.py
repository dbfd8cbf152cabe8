"""The driver's callback that ends each trial's MLflow run with its state while Tune runs.

A trial's own process may never reach its ``finally`` (a scheduler stop, a crash), so the
driver records what became of it: :class:`SearchTracker` tags the run with the trial's
state (``seg.tuning.records``) and ends it with the matching status, and counts retries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cloudpickle
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from seg.tuning import runs, tracking
from seg.tuning.records import TAG_EPOCHS, TAG_LAST_ERROR, TAG_RETRIES, TAG_STATE, State, trial_state

__all__ = ["SearchTracker", "exception_reason", "error_reason"]

log = logging.getLogger(__name__)


class SearchTracker(Callback):
    """Ends each trial's MLflow run with its final state, from wherever Tune runs.

    A trial's own process cannot be relied on for this: a scheduler stop may end it
    before any ``finally`` runs, and a crash may kill it. The state tags it writes are
    what :func:`run_search` reads back to tell an early-stopped trial from an interrupted
    one, which also works when Tune runs on a cluster's head (Ray Client). Failures to
    reach the tracking store are logged, not raised (they must not stop the search); the
    sweep at the end of the search catches up. Tune pickles this object with the
    experiment, so it holds only plain values.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, max_epochs: int,
                 defaults: Mapping[str, Any] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.defaults = dict(defaults or {})  # the base config's flat dict: names the runs it creates
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(trial, lambda run_id: tracking.log_tags(
            run_id, {TAG_RETRIES: trial.num_failures, TAG_LAST_ERROR: error_reason(trial)}, self.client))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        state = trial_state(result, False, self.max_epochs)
        self._finish(trial, state, result.get("failure_reason"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, State.FAILED, error_reason(trial))

    def _finish(self, trial: Any, state: State, reason: str | None) -> None:
        epochs = (trial.last_result or {}).get("epoch", 0)

        def end(run_id: str) -> None:
            run = tracking.call(self.client.get_run, run_id)
            if run.data.tags.get(TAG_STATE) == state and run.info.status != "RUNNING":
                return  # the trial recorded it itself
            runs.set_trial_state(run_id, state, reason=reason, extra_tags={TAG_EPOCHS: epochs}, client=self.client)

        self._safely(trial, end, create=True)

    def _safely(self, trial: Any, action: Any, create: bool = False) -> None:
        try:
            run = runs.find_trial_run(self.experiment_id, self.parent_run_id, trial.trial_id, self.client)
            if run is None and not create:
                return
            run_id = run.info.run_id if run else runs.start_trial_run(
                self.experiment_id, self.parent_run_id, trial.trial_id,
                runs.trial_run_name(trial.config or {}, self.defaults, trial.trial_id), client=self.client)[0]
            action(run_id)
        except (MlflowException, OSError) as error:
            log.warning("could not update the MLflow run of trial %s (%s); the end of the search retries",
                        trial.trial_id, error)


def exception_reason(error: BaseException) -> str:
    """``ExceptionType: message`` of the original exception inside Ray's wrappers."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"[:2000]


def error_reason(trial: Any) -> str:
    """``ExceptionType: message`` of the trial's latest error, from Tune's error files."""
    path = trial.pickled_error_file
    if path and os.path.isfile(path):
        with open(path, "rb") as file:
            return exception_reason(cloudpickle.load(file))
    path = trial.error_file
    if path and os.path.isfile(path):
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        return lines[-1][:2000] if lines else "unknown error"
    return "unknown error (no error file)"
