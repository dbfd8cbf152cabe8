"""Retraining the best trial(s) of a real search: lineage, metrics, registry, seed-robust winner."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest_plugins = ["search_fixture"]


@pytest.mark.slow
def test_retrain_the_best_trial_and_register_it(small_search, tmp_path):
    import mlflow.pytorch

    from seg.checkpoint import model_from_checkpoint
    from seg.data.cityscapes import CityscapesSegmentation
    from seg.data.transforms import eval_transform
    from seg.tuning.report import connect
    from seg.tuning.retrain import retrain, select_sources

    client = connect(small_search.tracking_uri)
    search, (trial,) = select_sources(client, small_search.name)
    assert trial.run_id == small_search.result.best.run_id
    # the trial's own schedule and seed: the retrain must reproduce the trial exactly
    result = retrain(client, search, [trial], epochs=trial.epochs, work_dir=tmp_path / "work",
                     report_dir=tmp_path / "report", model_name="tiny-best", log=lambda _: None)

    parent = client.get_run(result.run_id)
    (seed_run,) = result.winner.runs
    run = client.get_run(seed_run.run_id)
    for tags in (parent.data.tags, run.data.tags):
        assert tags["source_search"] == small_search.name
        assert tags["source_search_run_id"] == small_search.parent_run_id
        assert tags["search_space_file"].endswith("tiny.yaml")
        assert len(tags["git_commit"]) >= 7
    assert run.data.tags["source_trial_run_id"] == trial.run_id
    assert run.data.tags["mlflow.parentRunId"] == result.run_id
    assert parent.data.tags["seg.role"] == "retrain" and parent.data.tags["winner_run_id"] == seed_run.run_id
    assert run.info.status == "FINISHED" and parent.info.status == "FINISHED"

    history = [m.value for m in client.get_metric_history(seed_run.run_id, "val_miou")]
    assert len(history) == trial.epochs
    assert run.data.metrics["final_val_miou"] == pytest.approx(history[-1])
    assert history[-1] == pytest.approx(trial.history[trial.epochs], abs=1e-6)  # the same config, the same numbers
    assert parent.data.metrics["winner_val_miou_mean"] == pytest.approx(history[-1])
    artifacts = {a.path for a in client.list_artifacts(seed_run.run_id)}
    assert {"checkpoints", "overlays", "config.yaml", "per_class_iou.csv"} <= artifacts
    assert {"checkpoints/last.pt"} <= {a.path for a in client.list_artifacts(seed_run.run_id, "checkpoints")}
    assert not (tmp_path / "report").exists()  # one run only: no comparison table

    # the registered version loads back and predicts what the logged checkpoint predicts
    assert result.model_uri == f"models:/tiny-best/{result.model_version}"
    version = client.get_model_version("tiny-best", result.model_version)
    assert version.run_id == seed_run.run_id and version.tags["source_trial_run_id"] == trial.run_id
    checkpoint = client.download_artifacts(seed_run.run_id, "checkpoints/last.pt", str(tmp_path))
    model, cfg = model_from_checkpoint(checkpoint)
    dataset = CityscapesSegmentation(cfg.data.root, cfg.data.val_split, transform=eval_transform(cfg.data))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # a batch size other than the example's
    loaded = mlflow.pytorch.load_model(result.model_uri)
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, atol=1e-5)


def test_seed_robust_top_k_on_train_val(small_search, tmp_path):
    from seg.tuning.report import connect
    from seg.tuning.retrain import lower_confidence_bound, retrain, select_sources

    client = connect(small_search.tracking_uri)
    search, trials = select_sources(client, small_search.name, top_k=2)
    assert len(trials) == 2 and trials[0].score >= trials[1].score
    by_id, (again,) = select_sources(client, run_id=trials[1].run_id)  # --run-id: that trial, its search
    assert by_id.run_id == search.run_id and again.run_id == trials[1].run_id
    result = retrain(client, search, trials, seeds=[0, 1], epochs=1, train_val=True, work_dir=tmp_path / "work",
                     report_dir=tmp_path / "report", register=False, log=lambda _: None)

    assert sorted(len(c.runs) for c in result.candidates) == [2, 2]
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)  # ranked by mean - margin
    for candidate in result.candidates:
        mean, std, margin = lower_confidence_bound(candidate.values)
        assert candidate.score == pytest.approx(mean - margin)
        for seed_run in candidate.runs:
            tags = client.get_run(seed_run.run_id).data.tags
            assert tags["train_val"] == "True" and tags["seed"] == str(seed_run.seed)
    table = pd.read_csv(tmp_path / "report" / "seed_robust.csv")
    assert len(table) == 2 and list(table["winner"]) == [True, False]
    assert {"seed_0", "seed_1", "mean", "std", "margin", "score"} <= set(table.columns)
    assert table["score"][0] == pytest.approx(result.winner.score)
    assert "lower confidence bound" in (tmp_path / "report" / "seed_robust.md").read_text()
    logged = {a.path for a in client.list_artifacts(small_search.parent_run_id, "report")}
    assert {"report/seed_robust.csv", "report/seed_robust.md"} <= logged
    assert client.get_run(result.run_id).data.tags.get("registered_model") is None


def test_lower_confidence_bound():
    from seg.tuning.retrain import lower_confidence_bound

    mean, std, margin = lower_confidence_bound([0.5, 0.6, 0.7])
    assert (mean, std) == (pytest.approx(0.6), pytest.approx(0.1))
    assert margin == pytest.approx(2.919986 * 0.1 / math.sqrt(3), rel=1e-5)  # t(0.95, 2) = 2.919986
    mean, std, margin = lower_confidence_bound([0.4])
    assert mean == 0.4 and math.isnan(std) and math.isnan(margin)


def test_seed_robust_score_of_a_metric_where_lower_is_better():
    # a search on val_loss: the bound on the bad side is the upper one, and the best seed has the lowest loss
    from seg.tuning.report import Trial
    from seg.tuning.retrain import Candidate, SeedRun, lower_confidence_bound

    trial = Trial(run_id="r", name="trial_0", trial_id="t0", state="completed", reason="", params={}, metrics={},
                  history={1: 0.5}, start_time=0, mode="min")
    runs = tuple(SeedRun(trial=trial, seed=seed, run_id=f"s{seed}", final={"val_loss": loss, "val_miou": 0.1},
                         checkpoint=Path("last.pt"), metric="val_loss")
                 for seed, loss in ((0, 0.5), (1, 0.3), (2, 0.4)))
    candidate = Candidate(trial, runs, mode="min")
    mean, _, margin = lower_confidence_bound([0.5, 0.3, 0.4])
    assert candidate.values == [0.5, 0.3, 0.4]
    assert candidate.score == pytest.approx(mean + margin)
    assert candidate.best_run().seed == 1


def test_train_val_root_holds_both_splits(synthetic_root, tmp_path):
    from seg.data.cityscapes import CityscapesSegmentation
    from seg.tuning.retrain import TRAIN_VAL_SPLIT, train_val_root

    root = train_val_root(synthetic_root, "train", "val", tmp_path / "view")
    both = CityscapesSegmentation(root, TRAIN_VAL_SPLIT)
    train, val = CityscapesSegmentation(synthetic_root, "train"), CityscapesSegmentation(synthetic_root, "val")
    assert len(both) == len(train) + len(val)
    assert len(CityscapesSegmentation(root, "val")) == len(val)
    assert train_val_root(synthetic_root, "train", "val", tmp_path / "view") == root  # idempotent


def test_expected_errors_exit_2(fake_search, run_script, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake_search(uri, "broken", [None, None])
    fake_search(uri, "scored", [[0.3]])
    cases = [
        (["--search", "broken"], "error: search 'broken' has no completed trial with a val_miou"),
        (["--run-id", "0" * 32], f"error: no run with id '{'0' * 32}'"),
        (["--search", "nosuch"], "error: no search named 'nosuch'"),
        (["--run-id", "0" * 32, "--top-k", "2"], "error: --top-k picks among a search's trials"),
        (["--search", "scored", "--set", "optim.lrr=1"], "error: retrain options: unknown key 'optim.lrr'"),
    ]
    for argv, message in cases:
        result = run_script("retrain", ["--tracking-uri", uri, *argv])
        assert result.code == 2 and result.error.startswith(message), argv
    result = run_script("retrain", ["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"])
    assert result.code == 2 and result.error.startswith("error: no tracking store at")
