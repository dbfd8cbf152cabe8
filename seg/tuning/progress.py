"""What a search prints while it runs: one line per trial start and end, a short table now and then.

Ray Tune's own progress output prints a box per trial start and per result, with every
reported metric (19 per-class IoUs each epoch): hundreds of lines for a small search.
This callback prints what a person follows instead, on the driver:

    [  14s] trial 1ae923b1 started: arch fcn8s, backbone resnet18, lr 2.6e-02, batch_size 4
    [  52s] trial 1ae923b1 completed 4 epochs: val_miou 0.3120 (best 0.3120)
    [  60s] trial ca7833f0 early_stopped after 1 epoch: val_miou 0.0306 (best 0.0306)
    [  30s] 5/32 trial-epochs; best val_miou 0.2011 (1ae923b1)
      trial     state    epoch  val_miou  loss  lr now  lr  weight_decay  ...

``scripts/tune.py --verbose`` gives Ray's own output instead. Tune runs callbacks in the
driver process (on the head under Ray Client), so printing here needs no worker.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

from seg.tuning.records import State, trial_state
from seg.tuning.space import short_names
from seg.tuning.tracker import error_reason

__all__ = ["SearchProgress", "format_value"]


def format_value(value: Any) -> str:
    """Short text of a sampled value: ``2.6e-02``, ``0.892``, ``fcn8s``, ``128x256``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 0.1 or abs(value) >= 1e4):  # learning rates, decays
            return f"{value:.1e}"
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


class SearchProgress(Callback):
    """Prints trial starts, ends and failures, and every ``interval`` seconds a table of trials.

    ``keys`` are the sampled config keys shown (by their last component where that is
    unambiguous), ``decode`` turns a trial's config into config values (the space's own
    decoding: crop sizes travel through Optuna as text), ``budget_epochs`` is the most
    trial-epochs the search can run (trials x max epochs).
    """

    def __init__(self, keys: tuple[str, ...], metric: str, mode: str, max_epochs: int, budget_epochs: int,
                 max_failures: int = 0, decode: Any = None, interval: float = 60.0,
                 stream: TextIO | None = None) -> None:
        self.keys = keys
        self.names = short_names(keys)
        self.metric, self.mode, self.max_epochs, self.budget_epochs = metric, mode, max_epochs, budget_epochs
        self.max_failures = max_failures
        self.decode = decode
        self.interval = interval
        self.stream = stream
        self._started = time.monotonic()
        self._last_table = self._started
        self._epochs: dict[str, int] = {}  # trial id -> epochs reported
        self._rows: dict[str, dict[str, Any]] = {}  # trial id -> the table's row
        self._best: tuple[float, str] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state: dict) -> None:
        # restored with the experiment (--resume): clocks are per process
        self.__dict__.update(state)
        self._started = self._last_table = time.monotonic()

    # --- Tune's hooks ---------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row["state"] = State.RUNNING
        params = ", ".join(f"{self.names[key]} {row[key]}" for key in self.keys if key in row)
        self._print(f"trial {trial.trial_id} started: {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = result.get("epoch")
        if not isinstance(epoch, (int, float)) or result.get("failed"):
            return
        self._epochs[trial.trial_id] = int(epoch)
        row = self._row(trial)
        row.update(epoch=int(epoch), loss=result.get("train_loss"), lr=result.get("lr"))
        value = result.get(self.metric)
        if _finite(value):
            row[self.metric] = value
            if not _finite(row.get("best")) or self._better(value, row["best"]):
                row["best"] = value
            if self._best is None or self._better(value, self._best[0]):
                self._best = (float(value), trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        state = trial_state(result, False, self.max_epochs)
        self._row(trial)["state"] = state
        epochs = self._epochs.get(trial.trial_id, 0)
        if state == State.FAILED:
            self._print(f"trial {trial.trial_id} failed after {_epochs(epochs)}: {result.get('failure_reason')}")
            return
        row = self._row(trial)
        value, best = row.get(self.metric), row.get("best")
        shown = f"{self.metric} {value:.4f} (best {best:.4f})" if _finite(value) else f"no {self.metric}"
        ending = f"completed {_epochs(epochs)}" if state == State.COMPLETED else f"{state} after {_epochs(epochs)}"
        self._print(f"trial {trial.trial_id} {ending}: {shown}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune retries a crashed trial from its last checkpoint (up to max_failures times)
        self._print(f"trial {trial.trial_id} crashed after {_epochs(self._epochs.get(trial.trial_id, 0))}, "
                    f"retry {trial.num_failures} of {self.max_failures}: {_first_line(error_reason(trial))}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # a crash with no retry left
        self._row(trial)["state"] = State.FAILED
        self._print(f"trial {trial.trial_id} failed after {_epochs(self._epochs.get(trial.trial_id, 0))}, "
                    f"{trial.num_failures} crash(es): {_first_line(error_reason(trial))}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_table >= self.interval and self._rows:
            self._last_table = now
            self._print(self.table())

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._print(f"{self.done()} trial-epochs run")

    # --- text -----------------------------------------------------------------------------
    def done(self) -> str:
        return f"{sum(self._epochs.values())}/{self.budget_epochs}"

    def table(self) -> str:
        """The progress line and one row per trial seen so far."""
        best = f"; best {self.metric} {self._best[0]:.4f} ({self._best[1]})" if self._best else ""
        header = ["trial", "state", "epoch", self.metric, "loss", "lr now", *(self.names[key] for key in self.keys)]
        rows = [[trial_id, row.get("state", ""), str(row.get("epoch", 0)), _number(row.get(self.metric), ".4f"),
                 _number(row.get("loss"), ".3f"), _number(row.get("lr"), ".1e"),
                 *(row.get(key, "") for key in self.keys)]
                for trial_id, row in self._rows.items()]
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
        lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
        return f"{self.done()} trial-epochs{best}\n" + "\n".join(f"    {line}" for line in lines)

    def _row(self, trial: Any) -> dict[str, Any]:
        if trial.trial_id not in self._rows:
            config = dict(trial.config or {})
            if self.decode is not None:
                config = self.decode(config)
            self._rows[trial.trial_id] = {key: format_value(config[key]) for key in self.keys if key in config}
        return self._rows[trial.trial_id]

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self._started:5.0f}s] {text}", file=self.stream or sys.stdout, flush=True)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if _finite(value) else "-"


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")
