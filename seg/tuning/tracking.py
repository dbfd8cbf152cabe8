"""MLflow bookkeeping for training runs: experiments, runs, params, per-epoch metrics, artifacts.

Every function takes a run id (and optionally an ``MlflowClient``) instead of relying on
MLflow's global active run, so parallel trials in separate processes and parent/child
runs of a search use the same code as a single ``scripts/train.py`` run.

- The local default store is SQLite, ``sqlite:///<repo>/mlflow.db`` (MLflow 3.17 refuses
  a plain ``./mlruns`` file store); ``$MLFLOW_TRACKING_URI`` overrides it. For SQLite
  stores, new experiments keep their artifacts next to the database, in
  ``<db dir>/mlartifacts/<experiment>``, whatever the working directory.
- SQLite allows one writer at a time: every client call goes through :func:`call` and is
  retried with backoff on "database is locked".
- :func:`run_context` ends a run FINISHED, FAILED (with ``failure_type`` and
  ``failure_reason`` tags) or KILLED (Ctrl-C): never left RUNNING.
- :class:`MlflowEpochLogger` is the ``on_epoch_end`` callback of ``seg.engine.fit``.

Metric names are the EpochResult keys (``train_loss``, ``val_miou``,
``val_iou/road``...); the MLflow UI groups names by their ``/`` prefix.
"""

from __future__ import annotations

import os

# mlflow starts its telemetry client when imported: the opt-out must be set first
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, TypeVar  # noqa: E402
from urllib.parse import unquote  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from mlflow.entities import Metric, Param, Run, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.file_utils import local_file_uri_to_path  # noqa: E402
from mlflow.utils.uri import is_local_uri  # noqa: E402

import seg  # noqa: E402
from seg.config import Config  # noqa: E402
from seg.tuning.records import (CHECKPOINTS_ARTIFACT, CONFIG_ARTIFACT, TAG_FAILURE_REASON,  # noqa: E402
                                TAG_FAILURE_TYPE, TAG_PARENT, TAG_RESUMED_FROM)

if TYPE_CHECKING:  # torch is imported only where a model is trained or run, so a driver stays light
    from seg.engine import EpochResult, FitResult

__all__ = ["REPO_ROOT", "TAG_FAILURE_REASON", "TAG_FAILURE_TYPE", "default_tracking_uri", "configure_mlflow",
           "get_client", "call", "get_or_create_experiment", "find_run", "start_run", "end_run", "run_context",
           "log_config", "log_metrics", "log_tags", "log_per_class_iou", "per_class_iou_table",
           "log_prediction_overlays", "log_checkpoints", "MlflowEpochLogger", "tracked_fit"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(seg.__file__).resolve().parent.parent
_MAX_TAG_LENGTH = 5000  # MLflow's limit is 8000; keep well clear
_MAX_PARAM_LENGTH = 6000
_RETRIES = 10

T = TypeVar("T")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db`` (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def configure_mlflow(tracking_uri: str | None = None) -> str:
    """Disable telemetry and set MLflow's tracking URI (default: :func:`default_tracking_uri`).

    Also exports it as ``MLFLOW_TRACKING_URI`` so child processes use the same store.
    Returns the URI.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri or default_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def get_client(client: MlflowClient | None = None) -> MlflowClient:
    """``client`` itself, or a client for the configured tracking URI."""
    return client if client is not None else MlflowClient(tracking_uri=mlflow.get_tracking_uri())


def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)``, retried with exponential backoff while SQLite is locked."""
    for attempt in range(_RETRIES):
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - filtered by _is_transient, re-raised otherwise
            if attempt == _RETRIES - 1 or not _is_transient(error):
                raise
            delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random())
            log.debug("tracking store busy (%s); retrying in %.2f s", error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def get_or_create_experiment(name: str, client: MlflowClient | None = None) -> str:
    """The id of the experiment ``name``, created if missing (safe when processes race)."""
    client = get_client(client)
    experiment = call(client.get_experiment_by_name, name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            call(client.restore_experiment, experiment.experiment_id)
        return experiment.experiment_id
    try:
        return call(client.create_experiment, name, artifact_location=_artifact_location(client, name))
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code) and "already exists" not in str(error):
            raise
        return call(client.get_experiment_by_name, name).experiment_id  # another process created it


def find_run(experiment_id: str, tag_key: str, tag_value: str, client: MlflowClient | None = None) -> Run | None:
    """The earliest run of the experiment whose tag ``tag_key`` equals ``tag_value``, or None."""
    if "'" in tag_value or "`" in tag_key:
        raise ValueError(f"tag {tag_key!r}={tag_value!r}: quotes are not supported in lookups")
    runs = call(get_client(client).search_runs, [experiment_id], filter_string=f"tags.`{tag_key}` = '{tag_value}'",
                max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def start_run(experiment_id: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, client: MlflowClient | None = None) -> str:
    """Create a RUNNING run (a child of ``parent_run_id`` if given) and return its id.

    Nothing is made "active": pass the id to the other functions. End it with
    :func:`end_run`, or better use :func:`run_context`.
    """
    tags = {key: str(value) for key, value in (tags or {}).items()}
    if parent_run_id is not None:
        tags[TAG_PARENT] = parent_run_id
    run = call(get_client(client).create_run, experiment_id, tags=tags, run_name=run_name)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", error: BaseException | None = None,
            client: MlflowClient | None = None) -> None:
    """Mark the run ``status`` (FINISHED, FAILED or KILLED); ``error`` is recorded as tags."""
    client = get_client(client)
    if error is not None:
        reason = str(error) or type(error).__name__
        log_tags(run_id, {TAG_FAILURE_TYPE: type(error).__name__, TAG_FAILURE_REASON: reason}, client)
    call(client.set_terminated, run_id, status)


@contextlib.contextmanager
def run_context(run_id: str, client: MlflowClient | None = None,
                finished_on: tuple[type[BaseException], ...] = ()) -> Iterator[str]:
    """Ends the run whatever happens in the block: FINISHED, FAILED (error as tags) or KILLED.

    KeyboardInterrupt gives KILLED; an exception of a type in ``finished_on`` (e.g. the
    stop signal of a tuning scheduler) gives FINISHED. The exception is always re-raised.
    """
    client = get_client(client)
    try:
        yield run_id
    except KeyboardInterrupt as error:
        end_run(run_id, "KILLED", error if str(error) else KeyboardInterrupt("interrupted (Ctrl-C)"), client)
        raise
    except finished_on:
        end_run(run_id, "FINISHED", client=client)
        raise
    except BaseException as error:
        end_run(run_id, "FAILED", error, client)
        raise
    else:
        end_run(run_id, "FINISHED", client=client)


def log_config(run_id: str, cfg: Config, client: MlflowClient | None = None) -> None:
    """Every ``cfg.flat_dict()`` entry as a param (None -> "None"), plus ``config.yaml`` as an artifact."""
    client = get_client(client)
    params = [Param(key, _param_value(value)) for key, value in cfg.flat_dict().items()]
    for chunk in range(0, len(params), 100):  # MLflow's log_batch limit
        call(client.log_batch, run_id, params=params[chunk:chunk + 100])
    call(client.log_text, run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), CONFIG_ARTIFACT)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int, client: MlflowClient | None = None) -> None:
    """All ``metrics`` at ``step`` in one ``log_batch`` call (NaN is kept as NaN)."""
    timestamp = int(time.time() * 1000)
    entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
    for chunk in range(0, len(entries), 1000):
        call(get_client(client).log_batch, run_id, metrics=entries[chunk:chunk + 1000])


def log_tags(run_id: str, tags: Mapping[str, Any], client: MlflowClient | None = None) -> None:
    """Set ``tags`` (values made strings, shortened to fit MLflow's limit)."""
    entries = [RunTag(key, _shorten(str(value), _MAX_TAG_LENGTH)) for key, value in tags.items()]
    call(get_client(client).log_batch, run_id, tags=entries)


def per_class_iou_table(metrics: Mapping[str, float], epoch: int | None = None) -> tuple[str, str]:
    """CSV and Markdown tables of per-class IoU from EpochResult metrics (``val_iou/<name>``, in class order)."""
    rows = [(key.removeprefix("val_iou/"), value) for key, value in metrics.items() if key.startswith("val_iou/")]
    rows.append(("mean (mIoU)", metrics.get("val_miou", math.nan)))
    csv = "class,iou\n" + "".join(f"{name},{_number(value)}\n" for name, value in rows)
    title = f"Per-class IoU, epoch {epoch}" if epoch is not None else "Per-class IoU"
    markdown = (f"# {title}\n\n| class | IoU |\n|---|---:|\n"
                + "".join(f"| {name} | {_number(value)} |\n" for name, value in rows)
                + "\nn/a: the class occurs neither in the ground truth nor in the predictions.\n")
    return csv, markdown


def log_per_class_iou(run_id: str, metrics: Mapping[str, float], epoch: int | None = None,
                      client: MlflowClient | None = None) -> None:
    """``per_class_iou.csv`` and ``per_class_iou.md`` artifacts (replacing earlier ones)."""
    csv, markdown = per_class_iou_table(metrics, epoch)
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "per_class_iou.csv").write_text(csv)
        (Path(directory) / "per_class_iou.md").write_text(markdown)
        call(get_client(client).log_artifacts, run_id, directory)


def log_prediction_overlays(run_id: str, checkpoint: str | Path, dataset: Any = None, count: int = 3,
                            device: str = "cpu", client: MlflowClient | None = None) -> list[str]:
    """Predict ``count`` val images with ``checkpoint`` and log ``overlays/<image>.png``.

    Each PNG is image | ground truth | prediction in the Cityscapes palette. ``dataset``
    defaults to the checkpoint config's validation split. Images are spread evenly over
    the data set. Returns the names logged.
    """
    from seg.checkpoint import model_from_checkpoint
    from seg.visualize import prediction_panels, save_png

    model, cfg = model_from_checkpoint(checkpoint, device)
    if dataset is None:
        from seg.data.cityscapes import CityscapesSegmentation, resolve_data_root
        from seg.data.transforms import eval_transform

        dataset = CityscapesSegmentation(resolve_data_root(cfg.data.root), cfg.data.val_split,
                                         transform=eval_transform(cfg.data))
    if count <= 0 or len(dataset) == 0:
        return []
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round()})
    panels = prediction_panels(model, dataset, indices, device)
    with tempfile.TemporaryDirectory() as directory:
        for name, panel in panels.items():
            save_png(panel, Path(directory) / f"{name}.png")
        call(get_client(client).log_artifacts, run_id, directory, "overlays")
    return list(panels)


def log_checkpoints(run_id: str, checkpoint_dir: str | Path, names: tuple[str, ...] = ("best.pt", "last.pt"),
                    client: MlflowClient | None = None) -> list[str]:
    """Log the files ``names`` of ``checkpoint_dir`` that exist under ``checkpoints/``.

    When the run's artifacts live in a local directory (``file:`` URIs, MLflow's default
    beside a SQLite store), the checkpoint is hard-linked there instead of copied
    (``seg.checkpoint.copy_checkpoint``, a copy where links are impossible): a VGG16
    checkpoint is ~1 GB, and every trial of a search logs one. Checkpoints are only ever
    replaced by rename, never rewritten in place, so the two names cannot diverge.
    """
    from seg.checkpoint import copy_checkpoint

    client = get_client(client)
    local = _local_artifact_dir(call(client.get_run, run_id).info.artifact_uri)
    logged = []
    for name in names:
        path = Path(checkpoint_dir) / name
        if path.is_file():
            if local is not None:
                (local / CHECKPOINTS_ARTIFACT).mkdir(parents=True, exist_ok=True)
                copy_checkpoint(path, local / CHECKPOINTS_ARTIFACT / name)
            else:
                call(client.log_artifact, run_id, str(path), CHECKPOINTS_ARTIFACT)
            logged.append(name)
    return logged


def _local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The directory of a local artifact URI (``file:`` or a plain path), read as MLflow reads
    it; None for remote stores (``s3://``, ``mlflow-artifacts:/``, ``file://otherhost/``...)."""
    if not artifact_uri:
        return None
    try:
        local = is_local_uri(artifact_uri, is_tracking_or_registry_uri=False)
    except MlflowException:  # a file: URI naming another host
        return None
    return Path(local_file_uri_to_path(artifact_uri)) if local else None


class MlflowEpochLogger:
    """``on_epoch_end`` callback for ``seg.engine.fit`` that logs to the run ``run_id``.

    Each epoch: all ``result.metrics`` in one batch at ``step=result.epoch``, and, when
    the epoch is the best so far, ``best_val_miou`` and the per-class IoU table.
    :meth:`finalize` (call it in ``finally``, after ``fit`` returns or raises) logs
    overlays predicted by ``best.pt`` (once per run, not at every improvement: it costs a
    model load and a few forward passes) and the ``best.pt``/``last.pt`` checkpoints.
    """

    def __init__(self, run_id: str, *, client: MlflowClient | None = None, overlay_dataset: Any = None,
                 num_overlays: int = 3, log_checkpoint_files: bool = True, device: str = "cpu") -> None:
        self.run_id = run_id
        self.client = get_client(client)
        self.overlay_dataset = overlay_dataset
        self.num_overlays = num_overlays
        self.log_checkpoint_files = log_checkpoint_files
        self.device = device
        self.checkpoint_dir: Path | None = None
        self.finalized = False

    def __call__(self, result: EpochResult) -> None:
        self.checkpoint_dir = Path(result.checkpoint_dir)
        metrics = dict(result.metrics)
        if result.is_best:
            metrics["best_val_miou"] = metrics["val_miou"]
        log_metrics(self.run_id, metrics, step=result.epoch, client=self.client)
        if result.is_best:
            log_tags(self.run_id, {"best_epoch": result.epoch}, self.client)
            log_per_class_iou(self.run_id, result.metrics, result.epoch, self.client)

    def finalize(self, fit_result: FitResult | None = None) -> None:
        """Log overlays of the best model and the checkpoints; does nothing the second time."""
        directory = Path(fit_result.out_dir) if fit_result is not None else self.checkpoint_dir
        if self.finalized or directory is None:
            return
        self.finalized = True
        best = directory / "best.pt"
        if self.num_overlays > 0 and best.is_file():
            log_prediction_overlays(self.run_id, best, self.overlay_dataset, self.num_overlays, self.device,
                                    self.client)
        if self.log_checkpoint_files:
            log_checkpoints(self.run_id, directory, client=self.client)


def tracked_fit(cfg: Config, out_dir: str | Path, run_id: str, *, resume: str | Path | None = None,
                client: MlflowClient | None = None, num_overlays: int = 3, log_checkpoint_files: bool = True,
                on_epoch_end: Callable[[EpochResult], None] | None = None,
                on_step: Callable[[int, int, int | None, float | None], None] | None = None) -> FitResult:
    """``seg.engine.fit`` tracked in the run ``run_id``, which it ends (see :func:`run_context`).

    Logs the config as params, every epoch's metrics, the per-class IoU table of the best
    epoch, overlays of the best model and the checkpoints. ``on_epoch_end`` is called
    after the epoch is logged. Errors propagate after the run is marked FAILED (KILLED for
    Ctrl-C); checkpoints written before a failure are still logged.
    """
    from seg.engine import fit

    client = get_client(client)
    with run_context(run_id, client):
        log_config(run_id, cfg, client)
        if resume is not None:
            log_tags(run_id, {TAG_RESUMED_FROM: Path(resume).absolute()}, client)
        logger = MlflowEpochLogger(run_id, client=client, num_overlays=num_overlays,
                                   log_checkpoint_files=log_checkpoint_files)

        def on_epoch(result: EpochResult) -> None:
            logger(result)
            if on_epoch_end is not None:
                on_epoch_end(result)

        try:
            result = fit(cfg, out_dir, on_epoch_end=on_epoch, resume=resume, on_step=on_step)
        except KeyboardInterrupt:
            raise  # be quick: the user wants out
        except BaseException:
            try:
                logger.finalize()
            except Exception as error:  # noqa: BLE001 - reported; the training error is the one that matters
                log.warning("could not log the artifacts of the failed run %s: %s", run_id, error)
            raise
        logger.finalize(result)
        return result


def _is_transient(error: BaseException) -> bool:
    text = str(error).lower()
    return ("database is locked" in text or "database table is locked" in text
            or getattr(error, "error_code", None) == "TEMPORARILY_UNAVAILABLE")


def _artifact_location(client: MlflowClient, name: str) -> str | None:
    """``<db dir>/mlartifacts/<name>`` for SQLite stores; None (the server's choice) otherwise."""
    uri = client.tracking_uri
    if not uri.startswith("sqlite:///"):
        return None
    location = uri[len("sqlite:///"):].split("?", 1)[0]  # sqlite:////abs/path or sqlite:///relative/path
    if location in ("", ":memory:"):
        return None
    database = Path(unquote(location)).absolute()
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    return (database.parent / "mlartifacts" / safe_name).as_uri()


def _param_value(value: Any) -> str:
    return _shorten("None" if value is None else str(value), _MAX_PARAM_LENGTH)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"
