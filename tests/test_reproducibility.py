"""Reproducibility: one config and seed give one set of numbers; one space and seed give one set of trials.

Covered elsewhere: a resumed run ends with the numbers of an uninterrupted one
(test_engine.py::test_resuming_after_epoch_one_ends_like_an_uninterrupted_run), loader
workers give the main process's batches (test_cityscapes.py), the first suggestions of
one space and seed are equal (test_space.py::test_same_space_and_seed_give_the_same_first_trials),
and two real searches with one seed sample the same first trials
(test_faults.py::test_two_searches_with_one_seed_sample_the_same_first_trials).
"""

from __future__ import annotations

import math

import pytest

from helpers import load_script, write_config


@pytest.fixture
def train_main(restore_process_state):
    """``scripts/train.py``'s ``main``, run in this process (its signal handler and MLflow URI put back)."""
    return load_script("train").main


def logged_metrics(uri: str, experiment: str) -> dict[str, list[tuple[int, float | None]]]:
    """Every metric's history (step, value) of the experiment's only run, time excluded."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    histories = {}
    for key in run.data.metrics:
        if key != "epoch_seconds":
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            histories[key] = [(step, None if math.isnan(value) else value) for step, value in history]
    return histories


def test_same_config_and_seed_give_the_same_logged_metrics(train_main, tiny_config, tmp_path):
    # random scaling, cropping, flipping and colour jitter (loader workers: test_cityscapes.py)
    cfg = tiny_config.with_overrides({"data.scale_range": [0.75, 1.25], "data.crop_size": [48, 96],
                                      "data.hflip": True, "data.color_jitter": 0.3, "train.epochs": 2,
                                      "train.max_steps_per_epoch": 2, "optim.lr": 0.05})
    config = write_config(cfg, tmp_path / "tiny.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("first", "second"):
        code = train_main([str(config), "--out-dir", str(tmp_path / name), "--tracking-uri", uri,
                           "--experiment", name])
        assert code == 0
    first, second = logged_metrics(uri, "first"), logged_metrics(uri, "second")
    assert {"train_loss", "val_loss", "val_miou", "val_iou/road", "lr"} <= set(first)
    assert first == second


def test_another_seed_gives_other_numbers(tiny_config, tmp_path):
    # the check above would also pass if the seed were ignored and everything constant
    from seg.engine import fit

    cfg = tiny_config.with_overrides({"train.epochs": 1, "train.max_steps_per_epoch": 2})
    losses = [fit(cfg.with_overrides({"train.seed": seed}), tmp_path / str(seed)).history[0]["train_loss"]
              for seed in (0, 1)]
    assert losses[0] != losses[1]


def _suggestions(space, count: int) -> list[dict]:
    """What run_search's searcher suggests when every trial completes with a score that is a
    fixed function of its values (so after the start-up trials TPE models real results)."""
    from seg.tuning.search import build_searcher

    searcher = build_searcher(space)  # the ConcurrencyLimiter around OptunaSearch, as run_search uses it
    metric, epochs = space.budget.metric, space.budget.max_epochs
    suggested = []
    for index in range(count):
        trial_id = f"trial_{index:05d}"
        config = searcher.suggest(trial_id)
        suggested.append(config)
        score = 1.0 - abs(math.log10(config["optim.lr"]) + 2) - (config["optim.momentum"] - 0.9) ** 2
        for epoch in range(1, epochs + 1):
            searcher.on_trial_result(trial_id, {metric: score * epoch / epochs, "epoch": epoch})
        searcher.on_trial_complete(trial_id, {metric: score, "epoch": epochs})
    return suggested


SPACE = """\
name: repro
space:
  optim.lr: {loguniform: [1.0e-4, 1.0]}
  optim.momentum: {uniform: [0.5, 0.99]}
initial:
  - {optim.lr: 0.01}
budget: {trials: 8, max_epochs: 2, concurrency: 1, seed: 3, startup_trials: 3}
"""


def test_same_space_and_seed_give_the_same_trials_through_the_tpe_phase(tmp_path):
    from seg.tuning.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    first = _suggestions(load_space(path), 8)
    assert first == _suggestions(load_space(path), 8)
    assert first[0]["optim.lr"] == 0.01  # the initial point first
    assert len({(s["optim.lr"], s["optim.momentum"]) for s in first}) == len(first)
    other = _suggestions(load_space(path, overrides={"seed": 4}), 8)
    assert other[1:] != first[1:]
