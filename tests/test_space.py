"""Search spaces: every mistake is caught before anything launches, naming the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from seg.config import ConfigError
from seg.tuning.space import REPO_ROOT, load_space

GOOD = """\
name: test
space:
  optim.lr: {loguniform: [1.0e-3, 1.0e-1]}
  optim.momentum: {uniform: [0.8, 0.99]}
  model.arch: {choice: [fcn32s, fcn16s, fcn8s]}
  data.crop_size: {choice: [[64, 128], [32, 64]]}
  data.batch_size: {int: [2, 8], step: 2}
budget: {trials: 4, max_epochs: 2, concurrency: 2, seed: 0}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_repository_spaces_are_valid():
    for name in ("quick", "sgd", "adam"):
        space = load_space(REPO_ROOT / "search_spaces" / f"{name}.yaml")
        assert space.name == name
        assert space.base_config.train.epochs == space.budget.max_epochs
    sgd = load_space(REPO_ROOT / "search_spaces" / "sgd.yaml")
    assert {"optim.lr", "optim.momentum", "optim.weight_decay", "model.backbone", "model.arch", "data.batch_size",
            "data.crop_size"} <= set(sgd.keys)
    quick = load_space(REPO_ROOT / "search_spaces" / "quick.yaml")
    assert quick.budget.trials <= 8 and quick.budget.max_epochs <= 6 and quick.budget.concurrency == 2
    assert set(next(p for p in quick.params if p.key == "model.backbone").choices) <= {"resnet18",
                                                                                        "mobilenet_v3_large"}


def test_good_space_and_trial_settings(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    assert space.keys == ("optim.lr", "optim.momentum", "model.arch", "data.crop_size", "data.batch_size")
    cfg = space.base_config
    assert cfg.train.epochs == 2 and cfg.train.eval_every == 1
    assert cfg.train.num_threads == 1 and cfg.data.num_workers == 0 and cfg.train.device == "cpu"
    # crop sizes travel through Optuna as strings and come back as tuples
    crop = next(p for p in space.params if p.key == "data.crop_size")
    assert crop.distribution().choices == ("[64, 128]", "[32, 64]")
    trial = space.config_for({"optim.lr": 0.02, "data.crop_size": "[32, 64]", "data.batch_size": 4})
    assert trial.data.crop_size == (32, 64) and trial.optim.lr == 0.02 and trial.data.batch_size == 4


def test_budget_overrides_and_base(tmp_path):
    write(tmp_path, "optim: {lr: 0.5}\ntrain: {epochs: 7}\n", "base.yaml")
    text = GOOD.replace("budget: {trials: 4, max_epochs: 2, concurrency: 2, seed: 0}",
                        "base: base.yaml\nfixed: {optim.nesterov: true}\nbudget: {trials: 4}")
    space = load_space(write(tmp_path, text), overrides={"concurrency": 3, "seed": 5})
    assert space.budget.max_epochs == 7 and space.base_config.train.epochs == 7  # from the base file
    assert space.budget.concurrency == 3 and space.budget.seed == 5
    assert space.base_config.optim.nesterov and space.base_config.optim.lr == 0.5
    assert load_space(tmp_path / "space.yaml", overrides={"max_epochs": 3}).base_config.train.epochs == 3


@pytest.mark.parametrize("text, key", [
    (GOOD.replace("optim.lr:", "optim.lrr:"), "optim.lrr"),  # unknown field
    (GOOD.replace("optim.lr:", "optimizer.lr:"), "optimizer.lr"),
    (GOOD + "budgett: {}\n", "budgett"),  # unknown top-level key
    (GOOD.replace("[1.0e-3, 1.0e-1]", "[1.0e-1, 1.0e-3]"), "optim.lr"),  # low > high
    (GOOD.replace("[1.0e-3, 1.0e-1]", "[0.0, 1.0e-1]"), "optim.lr"),  # log bound not positive
    (GOOD.replace("[1.0e-3, 1.0e-1]", "[-1.0, 1.0e-1]"), "optim.lr"),
    (GOOD.replace("[1.0e-3, 1.0e-1]", "[fast, 1.0e-1]"), "optim.lr"),  # bound of the wrong type
    (GOOD.replace("[1.0e-3, 1.0e-1]", "[1.0e-3]"), "optim.lr"),  # not [low, high]
    (GOOD.replace("{choice: [fcn32s, fcn16s, fcn8s]}", "{choice: []}"), "model.arch"),  # empty choices
    (GOOD.replace("{choice: [fcn32s, fcn16s, fcn8s]}", "{choice: [fcn32s, fcn32s]}"), "model.arch"),
    (GOOD.replace("{choice: [fcn32s, fcn16s, fcn8s]}", "{choice: [fcn32s, fcn99s]}"), "model.arch"),  # unregistered
    (GOOD.replace("{choice: [fcn32s, fcn16s, fcn8s]}", "{loguniform: [1, 2]}"), "model.arch"),  # str field
    (GOOD.replace("{int: [2, 8], step: 2}", "{choice: [2, big]}"), "data.batch_size"),  # choice of wrong type
    (GOOD.replace("{int: [2, 8], step: 2}", "{choice: [2, 2.5]}"), "data.batch_size"),
    (GOOD.replace("{int: [2, 8], step: 2}", "{uniform: [2, 8]}"), "data.batch_size"),  # float dist, int field
    (GOOD.replace("{int: [2, 8], step: 2}", "{int: [2, 8], step: 4}"), "data.batch_size"),  # step must divide
    (GOOD.replace("{int: [2, 8], step: 2}", "{int: [0, 8]}"), "data.batch_size"),  # config refuses 0
    (GOOD.replace("{int: [2, 8], step: 2}", "{int: [2, 8], q: 2}"), "data.batch_size"),  # unknown option
    (GOOD.replace("[[64, 128], [32, 64]]", "[[64, 128], [64]]"), "data.crop_size"),  # wrong length
    (GOOD.replace("[[64, 128], [32, 64]]", "[[64, 128], [8, 8]]"), "data.crop_size"),  # too small
    (GOOD.replace("{uniform: [0.8, 0.99]}", "{uniform: [0.8, 1.2]}"), "optim.momentum"),  # impossible value
    (GOOD.replace("{uniform: [0.8, 0.99]}", "{uniform: [0.8, 0.8]}"), "optim.momentum"),  # low == high
    (GOOD.replace("{uniform: [0.8, 0.99]}", "{uniform: [0.8, 0.99], choice: [0.9]}"), "optim.momentum"),
    (GOOD.replace("optim.momentum:", "optim.lr:"), "optim.lr"),  # duplicate key
    (GOOD + "fixed: {optim.lr: 0.1}\n", "optim.lr"),  # fixed and sampled
    (GOOD + "fixed: {optim.nesterovv: true}\n", "optim.nesterovv"),
    (GOOD + "fixed: {optim.grad_clip: big}\n", "optim.grad_clip"),
    (GOOD + "fixed: {train.epochs: 5}\n", "train.epochs"),  # disagrees with budget.max_epochs
    (GOOD.replace("space:\n", "space:\n  train.epochs: {int: [1, 4]}\n"), "train.epochs"),
    (GOOD.replace("concurrency: 2", "concurrency: 0"), "budget.concurrency"),
    (GOOD.replace("concurrency: 2", "concurency: 2"), "budget.concurency"),
    (GOOD.replace("seed: 0", "seed: 0, grace_period: 3"), "budget.grace_period"),  # > max_epochs
    (GOOD.replace("seed: 0", "seed: 0, metric: val_miou, mode: min"), "budget.mode"),
    (GOOD.replace("seed: 0", "seed: 0, metric: miou"), "budget.metric"),
    (GOOD + "base: missing.yaml\n", "base"),
    (GOOD + "initial: [{optim.lr: 0.5}]\n", "initial[0].optim.lr"),  # outside the bounds
    (GOOD + "initial: [{optim.beta: 0.5}]\n", "initial[0].optim.beta"),
    (GOOD + "initial: [{model.arch: fcn4s}]\n", "initial[0].model.arch"),
])
def test_errors_name_the_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert str(path) in message, message
    assert key in message, message


def test_impossible_combination_is_caught(tmp_path):
    # each value is fine alone; together (nesterov with adam) the config refuses them
    text = "space:\n  optim.name: {choice: [adam, adamw]}\nfixed: {optim.nesterov: true}\n"
    with pytest.raises(ConfigError, match="optim.nesterov"):
        load_space(write(tmp_path, text))


def test_budget_flag_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"budget\.trials.*\(command line\)|command line.*budget\.trials"):
        load_space(write(tmp_path, GOOD), overrides={"trials": "many"})
    with pytest.raises(ConfigError, match="budget.max_epochs"):
        load_space(write(tmp_path, GOOD), overrides={"max_epochs": 0})
    with pytest.raises(ConfigError, match="optim.lr"):  # a sampled key cannot be set for every trial
        load_space(write(tmp_path, GOOD), runtime={"optim.lr": 0.1})


def _first_suggestions(space, count: int = 4) -> list[dict]:
    from seg.tuning.search import build_searcher

    searcher = build_searcher(space).searcher  # the OptunaSearch inside the ConcurrencyLimiter
    return [searcher.suggest(f"trial_{i}") for i in range(count)]


def test_same_space_and_seed_give_the_same_first_trials(tmp_path):
    path = write(tmp_path, GOOD)
    first = _first_suggestions(load_space(path))
    assert first == _first_suggestions(load_space(path))
    assert first != _first_suggestions(load_space(path, overrides={"seed": 1}))
    assert len({str(s) for s in first}) == len(first)
    for suggestion in first:  # every sample is a valid config
        load_space(path).config_for(suggestion)


def test_initial_points_come_first(tmp_path):
    path = write(tmp_path, GOOD + "initial: [{optim.lr: 0.05, data.crop_size: [32, 64]}]\n")
    first = _first_suggestions(load_space(path), 2)
    assert first[0]["optim.lr"] == 0.05 and first[0]["data.crop_size"] == "[32, 64]"
    assert first[1]["optim.lr"] != 0.05


def test_script_reports_space_errors_without_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("optim.lr:", "optim.lrr:"))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "tune.py"), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert str(path) in done.stderr and "optim.lrr" in done.stderr and "optim.lr" in done.stderr
