"""The report of a search: ranked table, plots, importance, report.md, logged to the parent run."""

from __future__ import annotations

import math

import pandas as pd
import pytest

pytest_plugins = ["search_fixture"]

PLOTS = ("val_miou_over_trials.png", "param_importance.png", "parallel_coordinates.png", "learning_curves.png",
         "per_class_iou.png")


@pytest.mark.slow
def test_report_of_a_real_search(small_search, tmp_path):
    from seg.tuning.report import connect, load_search, write_report

    client = connect(small_search.tracking_uri)
    search = load_search(client, small_search.name)
    trials = small_search.result.trials
    assert len(search.trials) == len(trials)
    assert set(search.keys) == {"optim.lr", "optim.momentum"}
    assert search.space is not None  # rebuilt from the parent run's artifacts

    path = write_report(search, tmp_path / "report", client)
    table = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(table) == len(trials)  # one row per trial, failed ones included
    markdown_rows = (tmp_path / "report" / "trials.md").read_text().strip().splitlines()
    assert len(markdown_rows) == 2 + len(trials)
    # the same ranking as the search's own
    ranked = [t for t in trials if t.rank is not None]
    assert list(table["run_id"][: len(ranked)]) == [t.run_id for t in sorted(ranked, key=lambda t: t.rank)]
    if ranked:
        assert table["val_miou"][0] == pytest.approx(min(ranked, key=lambda t: t.rank).best)
    for trial in trials:
        row = table[table["run_id"] == trial.run_id].iloc[0]
        assert row["state"] == trial.state
        if trial.state == "failed":
            assert math.isnan(row["rank"]) and trial.failure_reason.split(":")[0] in row["reason"]

    scored = sum(t.rank is not None for t in trials)
    expected = {"val_miou_over_trials.png", "learning_curves.png", "per_class_iou.png"}
    if scored >= 2:
        expected.add("parallel_coordinates.png")
    if scored >= 3:
        expected.add("param_importance.png")
    assert expected <= {p.name for p in (tmp_path / "report").glob("*.png")}
    text = path.read_text()
    assert f"# Search report: {small_search.name}" in text and "## Trials" in text
    names = {t.run_id: t.name for t in search.trials}
    for trial in trials:
        if trial.state == "failed":
            assert f"- {names[trial.run_id]}: failed: " in text
    logged = {a.path for a in client.list_artifacts(small_search.parent_run_id, "report")}
    assert {"report/report.md", "report/trials.csv", "report/trials.md"} <= logged


@pytest.fixture(scope="module")
def fake_store(fake_search, tmp_path_factory) -> str:
    """One store, three searches without training (a new SQLite store costs seconds to create)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('fake_store') / 'mlflow.db'}"
    fake_search(uri, "five", [[0.1, 0.2], [0.3, 0.35], [0.05, 0.1], [0.4, 0.38], None],
                sampled={"optim.lr": [0.001, 0.01, 0.1, 0.05, 0.003], "model.arch": ["fcn8s", "fcn32s"]})
    fake_search(uri, "small", [[0.2], None, [0.3]])
    # on val_loss (lower is better): by val_miou the best would be trial_0, by val_loss it is trial_1
    fake_search(uri, "by_loss", [[0.1, 0.5], [0.3, 0.2], [0.2, 0.25], None],
                val_losses=[[0.9, 0.8], [0.7, 0.4], [0.6, 0.5], None], budget={"metric": "val_loss", "mode": "min"})
    fake_search(uri, "broken", [None, None])  # the newest
    return uri


def test_importance_and_failed_trials(fake_store, tmp_path):
    from seg.tuning.report import connect, importance, load_search, write_report

    client = connect(fake_store)
    search = load_search(client, "five")
    assert [t.name for t in search.ranked()] == ["trial_3", "trial_1", "trial_0", "trial_2", "trial_4"]
    assert search.ranked()[0].score == pytest.approx(0.4) and search.ranked()[0].best_epoch == 1
    scores, study, note = importance(search)
    assert set(scores) == {"optim.lr", "model.arch"} and sum(scores.values()) == pytest.approx(1.0)
    assert len(study.trials) == 4  # the failed trial is left out
    assert "4 scored trials" in note

    path = write_report(search, tmp_path / "out", client)
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == set(PLOTS)
    text = path.read_text()
    assert "trial_4: failed: DivergenceError: training diverged" in text
    assert "| `optim.lr` |" in text
    assert len(pd.read_csv(tmp_path / "out" / "trials.csv")) == 5
    logged = {a.path for a in client.list_artifacts(search.run_id, "report")}
    assert {f"report/{name}" for name in PLOTS} | {"report/report.md", "report/trials.csv"} <= logged


def test_too_few_trials_for_importance(fake_store, tmp_path):
    from seg.tuning.report import MIN_TRIALS_FOR_IMPORTANCE, connect, load_search, write_report

    client = connect(fake_store)
    text = write_report(load_search(client, "small"), tmp_path / "out", client, log_to_parent=False).read_text()
    assert f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} trials with a val_miou; this search has 2" in text
    assert not (tmp_path / "out" / "param_importance.png").exists()
    assert (tmp_path / "out" / "learning_curves.png").exists()


def test_no_scored_trial_still_writes_a_report(fake_store, tmp_path):
    from seg.tuning.report import connect, load_search, write_report

    client = connect(fake_store)
    search = load_search(client)  # the newest search
    assert search.name == "broken"
    text = write_report(search, tmp_path / "out", client, log_to_parent=False).read_text()
    assert "No trial finished with a val_miou" in text
    assert len(pd.read_csv(tmp_path / "out" / "trials.csv")) == 2


def test_a_search_on_val_loss_is_ranked_by_val_loss_in_the_report_and_for_retraining(fake_store, tmp_path):
    # seg.tuning.search ranks by budget.metric and budget.mode: so must everything read back from MLflow
    from seg.tuning.report import connect, load_search, write_report
    from seg.tuning.retrain import select_sources

    client = connect(fake_store)
    search = load_search(client, "by_loss")
    assert [t.name for t in search.ranked()] == ["trial_1", "trial_2", "trial_0", "trial_3"]
    best = search.ranked()[0]
    assert best.score == pytest.approx(0.4) and best.best_epoch == 2

    path = write_report(search, tmp_path / "out", client, log_to_parent=False)
    table = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert list(table["trial"]) == ["trial_1", "trial_2", "trial_0", "trial_3"]
    assert list(table["val_loss"][:3]) == pytest.approx([0.4, 0.5, 0.8])
    text = path.read_text()
    assert f"**trial_1** (run `{best.run_id}`): val_loss **0.4000** at epoch 2" in text
    assert "lower is better" in text

    _, (source,) = select_sources(client, "by_loss")
    assert source.run_id == best.run_id
    _, top = select_sources(client, "by_loss", top_k=2)
    assert [t.name for t in top] == ["trial_1", "trial_2"]
    assert (search.metric, search.mode) == ("val_loss", "min")


def test_param_value_reads_back_every_config_field():
    from seg.config import Config
    from seg.tuning.report import param_value
    from seg.tuning.tracking import _param_value

    cfg = Config().with_overrides({"optim.lr": 1e-5, "data.root": "/data/123", "optim.grad_clip": 2.0})
    for key, value in cfg.flat_dict().items():
        got = param_value(key, _param_value(value))
        assert got == (tuple(value) if isinstance(value, list) else value), key


def test_markdown_table():
    from seg.tuning.report import markdown_table

    frame = pd.DataFrame({"name": ["a|b", None], "value": [0.123456, float("nan")]})
    assert markdown_table(frame) == "| name | value |\n|---|---:|\n| a\\|b | 0.1235 |\n|  |  |\n"


def test_script_errors_exit_2_without_traceback(tmp_path, run_script, small_search):
    result = run_script("report", ["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"])
    assert result.code == 2 and result.error.startswith("error: no tracking store at")
    result = run_script("report", ["--tracking-uri", "nosuchscheme://x"])
    assert result.code == 2 and result.error.startswith("error: cannot open the tracking store nosuchscheme://x")
    result = run_script("report", ["--tracking-uri", small_search.tracking_uri, "--search", "nosuch"])
    assert result.code == 2 and result.error.startswith("error: no search named 'nosuch'")
    assert small_search.name in result.error  # the searches there are listed


def test_script_writes_the_report(small_search, run_script, tmp_path):
    out = tmp_path / "script"
    result = run_script("report", ["--tracking-uri", small_search.tracking_uri, "--out", str(out), "--no-log"])
    assert result.code == 0 and f"report of search '{small_search.name}'" in result.out
    assert (out / "report.md").is_file() and len(pd.read_csv(out / "trials.csv")) == len(small_search.result.trials)
