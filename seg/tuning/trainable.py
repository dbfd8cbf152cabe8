"""The function trainable: one Ray Tune trial is one ``seg.engine.fit``, tracked in a child MLflow run.

Each epoch, in ``fit``'s ``on_epoch_end``: the metrics go to the trial's MLflow run, then
to Tune with ``tune.report(metrics, checkpoint=...)``, whose checkpoint directory holds
only a hard link to the epoch's ``last.pt`` (never ``best.pt``: one file per report is
all a resume needs, and for VGG16 each file is ~1 GB). Tune copies it into the trial's
storage directory and keeps the newest (``CheckpointConfig(num_to_keep=1)``); a retried
or restored trial resumes from it through ``fit(resume=...)``.

What ends a trial, and who records it. The final ``state`` tag and status of the run
are written by the driver's callback (``seg.tuning.tracker.SearchTracker``), once Tune has
processed the trial's last result, so MLflow never says "completed" about an epoch Tune
has not seen (an interrupted search resumes it):

- the last epoch: before its report (Tune may stop the trial inside it, which is how
  ASHA stops a trial at ``max_t``) the trial logs overlays and ``best.pt``; the callback
  ends the run ``completed``;
- a stop by the scheduler arrives as ``SystemExit`` inside ``tune.report``: the trial
  lets it through untouched; the callback ends the run ``early_stopped`` and the driver
  logs its overlays and ``best.pt`` after the search;
- divergence (``DivergenceError``, including a non-finite validation loss) and other
  deterministic errors (an impossible config, missing pretrained weights) are reported
  to Tune as a final result (``failed: 1``, ``failure_reason``, metric NaN) and the trial
  returns: retrying would fail the same way, so they never reach Tune's retry logic; the
  callback ends the run ``failed`` with the reason;
- any other exception (a crash) propagates: Tune retries the trial up to
  ``budget.max_failures`` times, resuming from its last checkpoint, in the same run;
  ``on_trial_error`` ends the run ``failed`` once no retry is left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from seg.checkpoint import copy_checkpoint
from seg.engine import EpochResult, fit
from seg.errors import ConfigError, DivergenceError, WeightsNotFoundError
from seg.tuning import runs, tracking
from seg.tuning.records import (TAG_EPOCHS, TAG_FAILURE_REASON, TAG_FAILURE_TYPE, TAG_LAST_ERROR, TAG_RESUMED_FROM,
                                TAG_SAMPLED_KEYS, TAG_SAMPLED_PREFIX, TAG_SEARCH, TRIALS_SUBDIR)
from seg.tuning.space import SearchSpace

__all__ = ["TrialContext", "NOT_RETRIED", "train_trial", "trial_output_dir"]

# deterministic failures: a retry would fail the same way
NOT_RETRIED = (DivergenceError, ConfigError, WeightsNotFoundError)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a search shares; paths and URIs absolute (workers have their own cwd)."""

    space: SearchSpace
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    search_dir: str  # <storage>/<name>: Ray's experiment directory
    num_overlays: int = 3


def trial_output_dir(search_dir: str | os.PathLike, trial_id: str) -> Path:
    """Where a trial's ``fit`` writes ``last.pt``/``best.pt``: ``<search dir>/trials/<trial id>``.

    Under the search directory rather than Tune's per-session trial directory, so that
    a restored search, a retried trial and the driver all find the same files.
    """
    return Path(search_dir) / TRIALS_SUBDIR / trial_id


def train_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: train the sampled ``config`` (dotted keys) and report every epoch."""
    # Ray logs "Checkpoint successfully created at: ..." at INFO for every report, to the driver's terminal
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    tracking.configure_mlflow(context.tracking_uri)
    client = tracking.get_client()
    tune_context = tune.get_context()
    trial_id = tune_context.get_trial_id()
    space = context.space
    metric = space.budget.metric

    run_id, created = runs.start_trial_run(context.experiment_id, context.parent_run_id, trial_id,
                                           run_name=runs.trial_run_name(config, space.base_config.flat_dict(),
                                                                        trial_id), client=client,
                                           tags={TAG_SEARCH: space.name, TAG_SAMPLED_KEYS: ",".join(space.keys)})
    reported_epochs = 0
    artifacts_logged = False

    def fail(error: BaseException) -> None:
        """A deterministic failure: its reason goes to MLflow and, as the trial's last result, to
        Tune (whose callback then ends the run ``failed``); the trial returns, so Tune never retries it."""
        reason = f"{type(error).__name__}: {error}"
        # epochs completed: a resumed trial may diverge before its first report of this session
        epochs = getattr(error, "epoch", reported_epochs + 1) - 1
        tracking.log_tags(run_id, {TAG_FAILURE_REASON: reason, TAG_FAILURE_TYPE: type(error).__name__}, client)
        tune.report({metric: math.nan, "epoch": epochs, "failed": 1, "failure_reason": reason})

    try:
        cfg = space.config_for(config)
    except ConfigError as error:
        if created:
            tracking.log_tags(run_id, {f"{TAG_SAMPLED_PREFIX}{key}": value for key, value in config.items()}, client)
        fail(error)
        return
    if created:
        tracking.log_config(run_id, cfg, client)

    out_dir = trial_output_dir(context.search_dir, trial_id) if "://" not in context.search_dir else \
        Path.cwd() / TRIALS_SUBDIR / trial_id  # cloud storage: the trial's local working directory
    stage = out_dir / "report"  # what tune.report copies: a link to last.pt, nothing else
    stage.mkdir(parents=True, exist_ok=True)
    logger = tracking.MlflowEpochLogger(run_id, client=client, num_overlays=context.num_overlays,
                                        log_checkpoint_files=False,
                                        device="cuda" if cfg.train.device.startswith("cuda") else "cpu")

    def on_epoch_end(result: EpochResult) -> None:
        nonlocal reported_epochs
        logger(result)
        _check_finite(result)
        if result.epoch >= cfg.train.epochs:
            log_final_artifacts(result.epoch)  # before the report: Tune may end the trial inside it
        copy_checkpoint(Path(result.checkpoint_dir) / "last.pt", stage / "last.pt")
        reported_epochs = result.epoch
        tune.report({**result.metrics, "epoch": result.epoch}, checkpoint=tune.Checkpoint.from_directory(stage))
        # Tune has its own copy now; drop the link so the old inode is freed when fit
        # replaces last.pt next epoch
        with contextlib.suppress(FileNotFoundError):
            (stage / "last.pt").unlink()

    def log_final_artifacts(epochs: int) -> None:
        nonlocal artifacts_logged
        logger.checkpoint_dir = out_dir
        logger.finalize()
        tracking.log_checkpoints(run_id, out_dir, names=("best.pt",), client=client)
        tracking.log_tags(run_id, {TAG_EPOCHS: epochs}, client)
        artifacts_logged = True

    checkpoint = tune.get_checkpoint()
    try:
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored:
            resume = Path(restored) / "last.pt" if restored else None
            if resume is not None:
                tracking.log_tags(run_id, {TAG_RESUMED_FROM: str(resume)}, client)
            fit(cfg, out_dir, on_epoch_end=on_epoch_end, resume=resume)
        if not artifacts_logged:  # resumed from the checkpoint of its last epoch: nothing left to train
            log_final_artifacts(cfg.train.epochs)
    except NOT_RETRIED as error:
        fail(error)
    except Exception as error:
        # a crash: Tune retries it (or the driver records the failure); keep the reason meanwhile
        tracking.log_tags(run_id, {TAG_LAST_ERROR: f"{type(error).__name__}: {error}"}, client)
        raise


def _check_finite(result: EpochResult) -> None:
    """Raise DivergenceError when validation produced a non-finite loss on labelled pixels.

    The engine stops on a non-finite training loss; a model can also blow up without one
    (e.g. BatchNorm running statistics overflowing after a huge learning rate), which shows
    as an infinite or NaN validation loss while mIoU, a count, stays finite. Its metrics are
    meaningless, so the trial fails like any diverged one.
    """
    loss, miou = result.metrics.get("val_loss"), result.metrics.get("val_miou")
    if loss is not None and miou is not None and math.isfinite(miou) and not math.isfinite(loss):
        error = DivergenceError(
            f"training diverged: validation loss is {loss} at epoch {result.epoch} "
            f"(lr {result.metrics.get('lr', math.nan):.3g}): "
            f"the model's outputs overflow. Lower optim.lr, add warmup (optim.warmup_iters) or clip gradients "
            f"(optim.grad_clip).")
        error.epoch = result.epoch
        raise error
