"""Bad input through the commands: a one-line error naming the file (and key), exit code 2, nothing launched.

The library-level checks have their own tests (test_cityscapes.py for every kind of
damaged data, test_config.py and test_space.py for every bad key and value); here the
same mistakes go through ``scripts/tune.py`` and ``scripts/train.py`` (and the other
commands' own arguments), and the tests check that the error is reported before any
Ray or MLflow work starts. Most cases call a script's ``main()`` in this process (it
returns the exit code); one case per script runs it as a real subprocess.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import (LR, SCRIPTS, create_tracking_store, first_image_and_label, load_script, model_checkpoint,
                     restored_tracking_uri, script_env, tiny_space, write_config)
from seg.config import Config

pytest_plugins = ["search_fixture"]
pytestmark = pytest.mark.usefixtures("restore_process_state")  # the scripts' main() set process-wide state


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test the moment a search would start Ray."""
    from seg.tuning import search

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was about to start although the input is bad")

    monkeypatch.setattr(search, "start_ray", refuse)


def runs_in(database: Path) -> int:
    """How many MLflow runs the SQLite store holds (0 when it does not exist)."""
    if not database.exists():
        return 0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def one_line_error(error: str) -> None:
    assert error.startswith("error: "), error
    assert "Traceback" not in error, error


# --- damaged data ----------------------------------------------------------------------------

def missing_label(root: Path) -> Path:
    _, label = first_image_and_label(root)
    label.unlink()
    return label


def not_a_png(root: Path) -> Path:
    image, _ = first_image_and_label(root, "val")
    image.write_bytes(b"<html>404 Not Found</html>" * 4)
    return image


def truncated_label(root: Path) -> Path:
    _, label = first_image_and_label(root)
    label.write_bytes(label.read_bytes()[:200])
    return label


def unknown_label_id(root: Path) -> Path:
    _, label = first_image_and_label(root, "val")
    ids = np.asarray(Image.open(label)).copy()
    ids[3:6, 3:6] = 200
    Image.fromarray(ids).save(label)
    return label


def size_mismatch(root: Path) -> Path:
    _, label = first_image_and_label(root)
    Image.fromarray(np.zeros((32, 128), np.uint8)).save(label)
    return label


def empty_split(root: Path) -> Path:
    for top in ("leftImg8bit", "gtFine"):
        for file in (root / top / "val").glob("*/*"):
            file.unlink()
    return root / "leftImg8bit" / "val"


def wrong_root(root: Path) -> Path:
    shutil.rmtree(root)
    return root


DAMAGE: dict[str, Callable[[Path], Path]] = {
    "missing label": missing_label, "unreadable png": not_a_png, "truncated label": truncated_label,
    "unknown label id": unknown_label_id, "size mismatch": size_mismatch, "empty split": empty_split,
    "wrong root": wrong_root,
}


@pytest.fixture
def damaged(request, synthetic_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(data root, the file or directory the error must name), for the damage ``request.param``."""
    root = Path(shutil.copytree(synthetic_root, tmp_path / "cityscapes"))
    return root, DAMAGE[request.param](root)


def space_text(root: Path | str) -> str:
    return tiny_space(root, space=LR, budget={"trials": 2, "max_epochs": 1, "concurrency": 1})


def tune_args(tmp_path: Path, space: Path, *extra: str) -> list[str]:
    return [str(space), "--storage", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--quiet", *extra]


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_tune_refuses_bad_data_before_ray_or_mlflow(damaged, tmp_path, no_ray, capsys):
    import ray

    root, named = damaged
    space = tmp_path / "space.yaml"
    space.write_text(space_text(root))
    code = load_script("tune").main(tune_args(tmp_path, space))
    error = capsys.readouterr().err
    assert code == 2, error
    one_line_error(error)
    assert str(named) in error
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    """One tracking store for the train.py cases (creating the tables takes seconds)."""
    database = tmp_path_factory.mktemp("store") / "mlflow.db"
    create_tracking_store(database)
    return database


def train_on(damaged, tiny_config: Config, tmp_path: Path, database: Path, capsys) -> tuple[int, str, int]:
    """Run train.py on the damaged data; (exit code, stderr, runs created)."""
    root, _ = damaged
    config = write_config(tiny_config.with_overrides({"data.root": str(root)}), tmp_path / "tiny.yaml")
    before = runs_in(database)
    code = load_script("train").main([str(config), "--out-dir", str(tmp_path / "out"), "--tracking-uri",
                                      f"sqlite:///{database}", "--experiment", "bad-data"])
    return code, capsys.readouterr().err, runs_in(database) - before


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_train_reports_bad_data_naming_the_file(damaged, tiny_config, tmp_path, shared_store, capsys):
    code, error, _ = train_on(damaged, tiny_config, tmp_path, shared_store, capsys)
    assert code == 2, error
    one_line_error(error)
    assert str(damaged[1]) in error
    assert not (tmp_path / "out" / "last.pt").exists()


@pytest.mark.parametrize("damaged", ["missing label", "wrong root"], indirect=True)
def test_train_creates_no_run_for_bad_data(damaged, tiny_config, tmp_path, shared_store, capsys):
    code, error, created = train_on(damaged, tiny_config, tmp_path, shared_store, capsys)
    assert code == 2 and created == 0, error


@pytest.mark.parametrize("damaged", ["missing label"], indirect=True)
def test_tune_subprocess_exits_2_before_ray(damaged, tmp_path, private_ray_tmp):
    root, named = damaged
    space = tmp_path / "space.yaml"
    space.write_text(space_text(root))
    done = subprocess.run([sys.executable, str(SCRIPTS / "tune.py"), *tune_args(tmp_path, space)],
                          capture_output=True, text=True, timeout=180, env=script_env(private_ray_tmp))
    assert done.returncode == 2, done.stderr
    one_line_error(done.stderr)
    assert str(named) in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list(private_ray_tmp.rglob("session_*")), "a Ray session was started"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("damaged", ["unknown label id"], indirect=True)
def test_train_subprocess_exits_2_naming_the_file(damaged, tiny_config, tmp_path, private_ray_tmp):
    root, named = damaged
    config = write_config(tiny_config.with_overrides({"data.root": str(root)}), tmp_path / "tiny.yaml")
    done = subprocess.run([sys.executable, str(SCRIPTS / "train.py"), str(config), "--out-dir", str(tmp_path / "o"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=180, env=script_env(private_ray_tmp))
    assert done.returncode == 2, done.stderr
    one_line_error(done.stderr)
    assert str(named) in done.stderr and "label id" in done.stderr


# --- bad search spaces and configs through the commands ----------------------------------------

GOOD_SPACE = space_text("ROOT")
SPACE_CASES = {
    "unknown key": (GOOD_SPACE.replace("optim.lr:", "optim.lrr:"), "optim.lrr"),
    "wrong type": (GOOD_SPACE.replace("data.batch_size: 2", "data.batch_size: two"), "data.batch_size"),
    "low > high": (GOOD_SPACE.replace("[1.0e-3, 1.0e-1]", "[1.0e-1, 1.0e-3]"), "optim.lr"),
    "log bound <= 0": (GOOD_SPACE.replace("[1.0e-3, 1.0e-1]", "[0, 1.0e-1]"), "optim.lr"),
    "duplicate key": (GOOD_SPACE.replace("  model.arch: fcn32s\n", "  model.arch: fcn32s\n  model.arch: fcn8s\n"),
                      "model.arch"),
    "python tag": (GOOD_SPACE.replace("  model.arch: fcn32s\n",
                                      "  model.arch: !!python/object/apply:os.system ['touch MARKER']\n"),
                   "python/object"),
    "empty file": ("\n", "empty"),
    "not a mapping": ("- optim.lr\n", "mapping"),
    "unknown budget key": (GOOD_SPACE.replace("trials: 2", "trails: 2"), "budget.trails"),
}


@pytest.mark.parametrize("case", list(SPACE_CASES))
def test_tune_refuses_bad_space_naming_file_and_key(case, tmp_path, synthetic_root, no_ray, capsys):
    text, key = SPACE_CASES[case]
    marker = tmp_path / "pwned"
    space = tmp_path / "space.yaml"
    space.write_text(text.replace("ROOT", str(synthetic_root)).replace("MARKER", str(marker)))
    code = load_script("tune").main(tune_args(tmp_path, space))
    error = capsys.readouterr().err
    assert code == 2, error
    one_line_error(error)
    assert str(space) in error and key in error
    assert not marker.exists() and not (tmp_path / "mlflow.db").exists()


def test_exponent_without_a_dot_is_a_number_in_a_space(tmp_path, synthetic_root):
    # PyYAML reads 1e-5 as the string "1e-5"; a bound must still be the number
    # (the config side: test_config.py::test_exponent_without_dot_is_a_float)
    from seg.tuning.space import load_space

    space = tmp_path / "space.yaml"
    space.write_text(space_text(synthetic_root).replace("[1.0e-3, 1.0e-1]", "[1e-5, 1e-1]"))
    (param,) = load_space(space).params
    distribution = param.distribution()
    assert (distribution.low, distribution.high, distribution.log) == (1e-5, 0.1, True)
    assert isinstance(distribution.low, float)


CONFIG_CASES = {
    "unknown key": ("optim: {lrr: 0.1}\n", "optim.lrr"),
    "wrong type": ("train: {epochs: many}\n", "train.epochs"),
    "duplicate key": ("optim: {lr: 0.1}\noptim: {momentum: 0.5}\n", "optim"),
    "python tag": ("optim: !!python/object/apply:os.system ['touch MARKER']\n", "python/object"),
    "empty file": ("", "empty"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_train_refuses_bad_config_before_mlflow(case, tmp_path, capsys):
    text, key = CONFIG_CASES[case]
    marker = tmp_path / "pwned"
    config = tmp_path / "config.yaml"
    config.write_text(text.replace("MARKER", str(marker)))
    code = load_script("train").main([str(config), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    error = capsys.readouterr().err
    assert code == 2, error
    one_line_error(error)
    assert str(config) in error and key in error
    assert not marker.exists() and not (tmp_path / "mlflow.db").exists()


# --- bad command lines -----------------------------------------------------------------------
# covered elsewhere: train.py unknown/wrong-type overrides and ../ run names
# (test_train_script.py::test_bad_arguments_fail_before_anything_is_logged), its missing config
# (::test_missing_config_is_a_one_line_error); evaluate.py missing prediction dir and checkpoint
# (test_evaluate.py::test_cli_errors_are_one_line_and_exit_2); report.py missing store, bad URI,
# unknown search (test_report.py::test_script_errors_exit_2_without_traceback).

@pytest.mark.parametrize("args, expected", [
    (["optim.lr"], "key=value"),
    (["--resume", "MISSING"], "MISSING"),
    (["data.crop_size=[64]"], "data.crop_size"),
])
def test_train_bad_command_lines(args, expected, tmp_path, capsys):
    config = write_config(Config(), tmp_path / "default.yaml")
    missing = str(tmp_path / "absent" / "last.pt")
    args = [missing if a == "MISSING" else a for a in args]
    code = load_script("train").main([str(config), *args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    error = capsys.readouterr().err
    assert code == 2, error
    one_line_error(error)
    assert expected.replace("MISSING", missing) in error
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, expected", [
    (["SPACE_MISSING"], "SPACE_MISSING"),
    (["SPACE", "--set", "optim.lrr=0.1"], "optim.lrr"),
    (["SPACE", "--set", "data.batch_size=big"], "data.batch_size"),
    (["SPACE", "--set", "train.seed"], "key=value"),
    (["SPACE", "--set", "optim.lr=0.5"], "optim.lr"),  # sampled: cannot also be fixed
    (["SPACE", "--set", "data.root=NOWHERE"], "NOWHERE"),
    (["SPACE", "--num-samples", "0"], "budget.trials"),
    (["SPACE", "--resume"], "nothing to resume"),
    (["SPACE", "--resume", "--num-samples", "3"], "resumed search"),
])
def test_tune_bad_command_lines(args, expected, tmp_path, synthetic_root, no_ray, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(space_text(synthetic_root))
    names = {"SPACE": str(space), "SPACE_MISSING": str(tmp_path / "absent.yaml"), "NOWHERE": str(tmp_path / "nowhere")}
    args = [names.get(a, a).replace("NOWHERE", names["NOWHERE"]) for a in args]
    code = load_script("tune").main(tune_args(tmp_path, Path(args[0]), *args[1:]))
    error = capsys.readouterr().err
    assert code == 2, error
    one_line_error(error)
    assert names.get(expected, expected) in error
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, expected", [
    (["--checkpoint", "CHECKPOINT", "--out", "OUT", "--data-root", "NOWHERE"], "NOWHERE"),
    (["--checkpoint", "CHECKPOINT", "--out", "OUT", "--split", "testing"], "testing"),
    (["--checkpoint", "CHECKPOINT", "--out", "OUT", "--device", "cuda:7"], "cuda:7"),
    (["--predictions", "OUT", "--data-root", "NOWHERE"], "NOWHERE"),
])
def test_evaluate_bad_command_lines(args, expected, tmp_path, tiny_config, synthetic_root, capsys):
    checkpoint = model_checkpoint(tmp_path / "best.pt", tiny_config)
    (tmp_path / "out").mkdir()
    names = {"CHECKPOINT": str(checkpoint), "OUT": str(tmp_path / "out"), "NOWHERE": str(tmp_path / "nowhere")}
    args = [names.get(a, a) for a in args]
    if "--data-root" not in args:
        args += ["--data-root", str(synthetic_root)]
    code = load_script("evaluate").main(args)
    error = capsys.readouterr().err
    assert code == 2, error
    one_line_error(error)
    assert names.get(expected, expected) in error


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory, fake_search) -> str:
    """A tracking store holding a (training-free) search with two completed trials."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('fake_store') / 'mlflow.db'}"
    with restored_tracking_uri():  # it points this process at the store: give it back
        fake_search(uri, "tiny", [[0.1, 0.2], [0.3, 0.4]])
    return uri


@pytest.mark.parametrize("args, expected", [
    (["--set", "optim.lrr=0.1"], "optim.lrr"),
    (["--set", "optim.lr=fast"], "optim.lr"),
    (["--set", "train.epochs"], "key=value"),
    (["--epochs", "0"], "--epochs"),
    (["--top-k", "0"], "--top-k"),
    (["--run-id", "0" * 32], "0" * 32),
    (["--search", "nosuch"], "nosuch"),
])
def test_retrain_bad_command_lines(args, expected, fake_store, monkeypatch, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from seg.tuning import retrain

    def no_training(*a, **k):
        raise AssertionError("training started although the command line is bad")

    monkeypatch.setattr(retrain, "_train_seed", no_training)
    before = len(MlflowClient(fake_store).search_runs(
        [e.experiment_id for e in MlflowClient(fake_store).search_experiments()]))
    code = load_script("retrain").main(["--tracking-uri", fake_store, "--no-register", "--work-dir",
                                        str(tmp_path / "work"), "--out", str(tmp_path / "report"), *args])
    error = capsys.readouterr().err
    assert code == 2, error
    one_line_error(error)
    assert expected in error
    after = MlflowClient(fake_store).search_runs([e.experiment_id for e in MlflowClient(fake_store).search_experiments()])
    assert len(after) == before, "a run was created for a bad command line"


def test_retrain_and_report_refuse_a_missing_store(tmp_path, capsys):
    missing = tmp_path / "absent.db"
    for script in ("retrain", "report"):
        assert load_script(script).main(["--tracking-uri", f"sqlite:///{missing}"]) == 2
        error = capsys.readouterr().err
        one_line_error(error)
        assert str(missing) in error
    assert not missing.exists()
