"""Serve the MLflow UI on the project's tracking store and point at a search's runs.

``mlflow server`` runs as a child process (one worker, job execution off: ~6 s to
start, ~0.5 GB), bound to loopback unless asked otherwise: the UI has no
authentication and serves every run's artifacts. Links printed for a search:

- its runs page: the trials, best first, with the objective, the other validation
  metrics and the sampled params as columns (a saved view: see :func:`trials_view`),
- the compare page of its trials (params and final metrics side by side, parallel
  coordinates; a metric's name opens its per-epoch curves),
- the per-epoch val mIoU curves of its trials.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from mlflow.tracking import MlflowClient

from seg.errors import TrackingError
from seg.tuning import tracking
from seg.tuning.records import TAG_PARENT, TAG_SHARED_VIEW_PREFIX
from seg.tuning.report import find_search_run, objective, sampled_keys, sqlite_path
from seg.tuning.runs import trial_runs

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "SearchLinks", "Server", "is_loopback", "port_is_free", "free_port",
           "search_links", "trials_view", "server_command", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
START_TIMEOUT_S = 90.0
# the MLflow 3 UI opens experiments in its GenAI view unless told otherwise
_WORKFLOW = "workflowType=machine_learning"
VIEW_METRICS = ("val_miou", "val_pixel_accuracy", "val_loss", "train_loss")  # shown after the objective


@dataclass(frozen=True)
class SearchLinks:
    experiment_id: str
    runs: str  # the experiment's runs page
    compare: str | None  # the compare page of the search's trials (None without trials)
    curves: str | None  # val mIoU per epoch of every trial


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port the OS says is free on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def search_links(client: MlflowClient, base_url: str, search: str | None = None) -> SearchLinks:
    """Links into the UI at ``base_url`` for search ``search`` (None: the newest).

    The runs page lists the search's trials (filtered on their parent run), best first by
    the search's own objective, with it, the other validation metrics and the sampled
    params as columns (:func:`trials_view`); the URL formats are those the MLflow 3.17 UI
    itself builds.
    """
    run = find_search_run(client, search)
    experiment_id, parent_id = run.info.experiment_id, run.info.run_id
    metric, mode = objective(run)
    children = sorted(trial_runs(experiment_id, parent_id, client), key=lambda r: r.info.start_time or 0)
    trials = [r.info.run_id for r in children]
    keys = sampled_keys(children)
    base = base_url.rstrip("/")
    view = trials_view(client, experiment_id, parent_id, metric, mode, keys)
    runs = f"{base}/#/experiments/{experiment_id}/runs?{_WORKFLOW}&viewStateShareKey={view}"
    if not trials:
        return SearchLinks(experiment_id, runs, None, None)
    ids, experiments, metric_json = _json_param(trials), _json_param([experiment_id]), _json_param(metric)
    curves = (f"{base}/#/metric?runs={ids}&metric={metric_json}&experiments={experiments}"
              f"&plot_metric_keys={_json_param([metric])}&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear"
              f"&line_smoothness=1&show_point=true&deselected_curves=%5B%5D&last_linear_y_axis_range=%5B%5D")
    return SearchLinks(experiment_id, runs, compare=f"{base}/#/compare-runs?runs={ids}&experiments={experiments}",
                       curves=curves)


def trials_view(client: MlflowClient, experiment_id: str, parent_id: str, metric: str, mode: str,
                keys: Sequence[str]) -> str:
    """Save the runs page's view of a search's trials as the UI's "Share" button does; return its key.

    The view: the trials of parent run ``parent_id``, ordered by ``metric`` (best first for
    ``mode``), with ``metric``, the other validation metrics and the sampled ``keys`` as
    columns. It is an experiment tag ``mlflow.sharedViewState.<key>`` holding the view as
    JSON; the key is a hash of it, so showing the same view twice writes one tag.
    """
    metrics = [metric, *(name for name in VIEW_METRICS if name != metric)]
    view = {
        "searchFilter": f"tags.`{TAG_PARENT}` = '{parent_id}'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": mode == "min",
        "selectedColumns": [f"metrics.`{name}`" for name in metrics] + [f"params.`{key}`" for key in keys],
    }
    text = json.dumps(view, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    tracking.call(client.set_experiment_tag, experiment_id, f"{TAG_SHARED_VIEW_PREFIX}{key}", text)
    return key


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line for the store ``tracking_uri``."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    database = sqlite_path(tracking_uri)
    if database is not None:  # experiments created in the UI keep artifacts next to the database too
        command += ["--artifacts-destination", str(database.parent / "mlartifacts")]
    return command


@dataclass(frozen=True)
class Server:
    url: str  # e.g. http://127.0.0.1:5000
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None


@contextlib.contextmanager
def serve(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log_path: str | Path | None = None, timeout: float = START_TIMEOUT_S) -> Iterator[Server]:
    """Run ``mlflow server`` on ``host:port`` until the block ends.

    Raises TrackingError when the port is taken or the server does not come up (with the
    end of its log).
    """
    if not port_is_free(host, port):
        raise TrackingError(f"port {port} on {host} is in use (another MLflow UI?): pass --port N, "
                            f"or --port 0 to pick a free one")
    if log_path:
        log_path = Path(log_path)
        log_file = open(log_path, "wb")
    else:  # a fresh file of our own: a predictable name in /tmp could be a planted symlink
        fd, name = tempfile.mkstemp(prefix=f"seg-mlflow-ui-{port}-", suffix=".log")
        log_path, log_file = Path(name), os.fdopen(fd, "wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log_file:
        # own process group, so that stopping it also stops the server's worker processes
        process = subprocess.Popen(server_command(tracking_uri, host, port), stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    try:
        _wait_until_up(process, url, log_path, timeout)
        yield Server(url, process, log_path)
    finally:
        _stop(process)


def _wait_until_up(process: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TrackingError(f"the MLflow server exited with code {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TrackingError(f"the MLflow server did not answer on {url} within {timeout:.0f} s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _json_param(value: Sequence[str] | str) -> str:
    return quote(json.dumps(value if isinstance(value, str) else list(value), separators=(",", ":")))
