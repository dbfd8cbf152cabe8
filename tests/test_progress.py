"""What a search prints while it runs (seg.tuning.progress) and what its trials' runs are called."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

from seg.tuning.progress import SearchProgress, format_value
from seg.tuning.runs import trial_run_name

KEYS = ("optim.lr", "model.arch", "data.batch_size")


def fake_trial(trial_id: str, last_result: dict | None = None, failures: int = 0) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"optim.lr": 0.0256, "model.arch": "fcn8s",
                                                      "data.batch_size": 4},
                           last_result=last_result, num_failures=failures)


def progress(stream: io.StringIO, interval: float = 3600.0) -> SearchProgress:
    return SearchProgress(KEYS, "val_miou", "max", max_epochs=4, budget_epochs=8 * 4, max_failures=1,
                          interval=interval, stream=stream)


def test_a_line_per_start_and_end_with_the_parameters_and_the_metric() -> None:
    out = io.StringIO()
    printer = progress(out)
    done, stopped, failed = fake_trial("aaaa0001"), fake_trial("bbbb0002"), fake_trial("cccc0003")
    for trial in (done, stopped, failed):
        printer.on_trial_start(0, [], trial)
    for epoch, value in enumerate((0.1, 0.3, 0.25, 0.28), 1):
        printer.on_trial_result(0, [], done, {"epoch": epoch, "val_miou": value, "train_loss": 1.0, "lr": 1e-3})
    printer.on_trial_result(0, [], stopped, {"epoch": 1, "val_miou": 0.05})
    done.last_result, stopped.last_result = {"epoch": 4, "val_miou": 0.28}, {"epoch": 1, "val_miou": 0.05}
    failed.last_result = {"epoch": 0, "failed": 1, "failure_reason": "DivergenceError: loss is nan"}
    for trial in (done, stopped, failed):
        printer.on_trial_complete(0, [], trial)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6, lines
    assert "trial aaaa0001 started: lr 2.6e-02, arch fcn8s, batch_size 4" in lines[0]
    assert "trial aaaa0001 completed 4 epochs: val_miou 0.2800 (best 0.3000)" in lines[3]
    assert "trial bbbb0002 early_stopped after 1 epoch: val_miou 0.0500 (best 0.0500)" in lines[4]
    assert "trial cccc0003 failed after 0 epochs: DivergenceError: loss is nan" in lines[5]
    assert printer.done() == "5/32"


def test_a_crash_says_whether_it_is_retried_and_why(tmp_path) -> None:
    out = io.StringIO()
    printer = progress(out)
    trial = fake_trial("aaaa0001")
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: worker died\n")
    trial.pickled_error_file, trial.error_file = None, str(error_file)
    printer.on_trial_start(0, [], trial)
    printer.on_trial_result(0, [], trial, {"epoch": 2, "val_miou": 0.2})
    trial.num_failures = 1
    printer.on_trial_recover(0, [], trial)
    trial.num_failures = 2
    printer.on_trial_error(0, [], trial)
    lines = out.getvalue().splitlines()
    assert "trial aaaa0001 crashed after 2 epochs, retry 1 of 1: RuntimeError: worker died" in lines[1]
    assert "trial aaaa0001 failed after 2 epochs, 2 crash(es): RuntimeError: worker died" in lines[2]
    assert printer._rows["aaaa0001"]["state"] == "failed"


def test_the_table_shows_every_trial_and_the_best_so_far() -> None:
    out = io.StringIO()
    printer = progress(out, interval=0.0)
    first, second = fake_trial("aaaa0001"), fake_trial("bbbb0002")
    printer.on_trial_start(0, [], first)
    printer.on_trial_start(0, [], second)
    printer.on_trial_result(0, [], first, {"epoch": 1, "val_miou": 0.2, "train_loss": 1.5, "lr": 2e-3})
    printer.on_trial_result(0, [], second, {"epoch": 2, "val_miou": 0.31, "train_loss": 0.9, "lr": 1e-3})
    printer.on_step_end(0, [])
    table = out.getvalue().split("\n", 2)[2]
    assert "3/32 trial-epochs; best val_miou 0.3100 (bbbb0002)" in table
    header, row_one, row_two = table.splitlines()[1:4]
    assert header.split() == ["trial", "state", "epoch", "val_miou", "loss", "lr", "now", "lr", "arch",
                               "batch_size"]
    assert row_one.split() == ["aaaa0001", "running", "1", "0.2000", "1.500", "2.0e-03", "2.6e-02", "fcn8s", "4"]
    assert row_two.split()[:4] == ["bbbb0002", "running", "2", "0.3100"]


def test_minimising_a_metric_keeps_the_lowest_as_best() -> None:
    printer = SearchProgress(("optim.lr",), "val_loss", "min", max_epochs=2, budget_epochs=4, stream=io.StringIO())
    trial = fake_trial("aaaa0001")
    for epoch, value in ((1, 0.9), (2, 1.2)):
        printer.on_trial_result(0, [], trial, {"epoch": epoch, "val_loss": value})
    assert printer._best == (0.9, "aaaa0001")


def test_the_printer_survives_pickling_with_the_experiment() -> None:
    printer = progress(io.StringIO())
    printer.on_trial_start(0, [], fake_trial("aaaa0001"))
    restored = pickle.loads(pickle.dumps(printer))
    assert restored.stream is None and "aaaa0001" in restored._rows


def test_values_are_shown_short() -> None:
    assert [format_value(v) for v in (0.0256, 0.892, 3e-5, 4, "fcn8s", (128, 256), None, True)] == \
        ["2.6e-02", "0.892", "3.0e-05", "4", "fcn8s", "128x256", "None", "True"]


def test_a_trial_run_is_named_after_its_model_and_learning_rate() -> None:
    defaults = {"model.arch": "fcn8s", "model.backbone": "resnet18", "optim.lr": 0.01}
    assert trial_run_name({"model.arch": "fcn16s", "optim.lr": 0.00561}, defaults, "a1b2c3d4") == \
        "fcn16s-resnet18-lr5.6e-03-a1b2c3d4"
    assert trial_run_name({}, defaults, "a1b2c3d4") == "fcn8s-resnet18-lr1.0e-02-a1b2c3d4"
