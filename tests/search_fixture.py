"""One small real search, shared by the report, retrain and UI tests (loaded with
``pytest_plugins = ["search_fixture"]``, so that it runs once per session).

4 trials of FCN-32s/ResNet-18 on the ``synthetic_root`` images, 2 at a time, at most 2
epochs of 2 steps, ASHA stopping some after epoch 1. The first trial is an ``initial``
point with a learning rate of 10, which diverges: the search holds a failed trial too.
About 30 s on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import load_script, restored_tracking_uri, small_search_space


@dataclass(frozen=True)
class SmallSearch:
    tracking_uri: str
    name: str  # the search's name (its parent run's name)
    parent_run_id: str
    experiment_id: str
    result: object  # seg.tuning.search.SearchResult
    directory: Path  # holds the space file, Ray's storage and the tracking store


@pytest.fixture(scope="session")
def small_search(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SmallSearch:
    from seg.tuning.search import run_search
    from seg.tuning.space import load_space

    directory = tmp_path_factory.mktemp("small_search")
    space_file = directory / "tiny.yaml"
    space_file.write_text(small_search_space(synthetic_root, max_failures=0, description="the shared test search"))
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    with restored_tracking_uri():  # run_search points this process at its store: the other tests keep theirs
        result = run_search(load_space(space_file), storage=directory / "ray", tracking_uri=uri, num_overlays=1,
                            verbose=0)
    return SmallSearch(tracking_uri=result.tracking_uri, name=result.search_dir.name,
                       parent_run_id=result.parent_run_id, experiment_id=result.experiment_id, result=result,
                       directory=directory)


@pytest.fixture(scope="session")
def fake_search():
    """:func:`log_fake_search`, for tests (a plugin module cannot be imported by them)."""
    return log_fake_search


def log_fake_search(tracking_uri: str, name: str, scores: list[list[float] | None], sampled: dict | None = None,
                    val_losses: list[list[float] | None] | None = None, budget: dict | None = None) -> str:
    """A search-shaped set of MLflow runs without any training, for fast tests: one trial
    per entry of ``scores`` (its val_miou per epoch; None: a failed trial), the tags of
    ``seg.tuning.runs``. ``val_losses``: each trial's val_loss per epoch too; ``budget``:
    logged as the parent run's ``budget.<key>`` params, as ``seg.tuning.search`` logs them
    (none: a store from before the objective was recorded). Returns the parent run id."""
    from seg.config import Config
    from seg.tuning import runs, tracking

    tracking.configure_mlflow(tracking_uri)
    client = tracking.get_client()
    experiment_id = tracking.get_or_create_experiment(name, client)
    parent = tracking.start_run(experiment_id, name, {runs.TAG_ROLE: "search", runs.TAG_SEARCH_DIR: f"/x/{name}"},
                                client=client)
    for key, value in (budget or {}).items():
        tracking.call(client.log_param, parent, f"budget.{key}", value)
    sampled = sampled or {"optim.lr": [0.001, 0.01, 0.1, 0.05, 0.003, 0.02]}
    for index, history in enumerate(scores):
        run_id = tracking.start_run(experiment_id, f"trial_{index}", parent_run_id=parent, client=client,
                                    tags={runs.TAG_ROLE: "trial", runs.TAG_TRIAL_ID: f"t{index}",
                                          "seg.sampled_keys": ",".join(sampled)})
        values = {key: options[index % len(options)] for key, options in sampled.items()}
        tracking.log_config(run_id, Config().with_overrides(values), client)
        for epoch, value in enumerate(history or [], 1):
            tracking.log_metrics(run_id, {"val_miou": value, "train_loss": 1.0 / epoch}, epoch, client)
        for epoch, value in enumerate(val_losses[index] or [] if val_losses else [], 1):
            tracking.log_metrics(run_id, {"val_loss": value}, epoch, client)
        state = {runs.TAG_STATE: "completed" if history else "failed"}
        if history is None:
            state[tracking.TAG_FAILURE_REASON] = "DivergenceError: training diverged"
        tracking.log_tags(run_id, state, client)
        tracking.end_run(run_id, "FINISHED" if history else "FAILED", client=client)
    tracking.end_run(parent, client=client)
    return parent


@dataclass(frozen=True)
class ScriptResult:
    code: int
    out: str
    error: str  # the last line on stderr ('' when none)


@pytest.fixture
def run_script(capsys: pytest.CaptureFixture):
    """``run_script("report", [...])``: calls ``scripts/report.py``'s ``main`` in this process and
    returns its exit code, stdout and last stderr line, checking that no traceback was printed."""

    def run(name: str, argv: list[str]) -> ScriptResult:
        module = load_script(name)
        code = module.main(argv)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        lines = captured.err.strip().splitlines()
        return ScriptResult(code, captured.out, lines[-1] if lines else "")

    return run
