"""Retrain the best trial(s) of a search on the full schedule, pick a seed-robust winner, register it.

A search ranks trials by one training run each, often cut short by the scheduler, so
its winner may just have drawn a lucky seed. Here each source trial's configuration
(rebuilt from its run's ``config.yaml``, see ``seg.tuning.report.config_from_run``) is
trained again for ``train.epochs`` epochs once per seed, and the candidates are
ranked by a one-sided 95 % confidence bound of the mean final value of the search's
metric (its ``budget.metric``, val mIoU unless it said otherwise), on the bad side::

    score = mean - t(0.95, S - 1) * std / sqrt(S)      (std with S - 1 degrees of freedom)

(``mean +`` for a metric where lower is better, such as ``val_loss``), which rewards a
configuration that is good on every seed over one that is good on average thanks to
one lucky run, and shrinks towards the mean as seeds are added. With a single seed
there is no margin: the score is the final value itself. The source trials are the
search's best by the same metric and mode (``seg.tuning.report.Search.best``).

MLflow layout, in the search's experiment: one parent run per invocation (tag
``seg.role=retrain``) with one child run per (trial, seed). Every run carries its
lineage: ``source_search``, ``source_search_run_id``, ``source_trial_run_id``,
``source_trial``, ``search_space_file``, ``git_commit``. A child run logs the config,
per-epoch metrics, the ``final_*`` metrics of its final model, ``checkpoints/`` and
``overlays/`` (predictions of the final model). The winner's best seed is logged as an
MLflow model (a logged model named ``model`` linked to its run, in MLflow 3's default
``pt2`` format: a traced graph, loadable without our code or pickle) and registered; the
registered version is loaded back and checked to predict what the checkpoint predicts.

``--train-val`` trains on the union of the train and val splits (see
:func:`train_val_root`); the val metrics are then measured on training images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from seg.config import Config
from seg.data.cityscapes import resolve_data_root
from seg.errors import ConfigError, TrackingError
from seg.tuning import tracking
from seg.tuning.report import (METRIC, MODE, Search, Trial, config_from_run, load_search, log_report,
                               markdown_table)
from seg.tuning.records import (TAG_GIT_COMMIT, TAG_MLFLOW_GIT_COMMIT, TAG_PARENT, TAG_ROLE, TAG_SEED,
                                TAG_SPACE_FILE, Role)
from seg.tuning.runs import git_commit

__all__ = ["CONFIDENCE", "SeedRun", "Candidate", "RetrainResult", "lower_confidence_bound", "select_sources",
           "retrain", "train_val_root", "register_model", "seed_robust_table", "model_name_for"]

CONFIDENCE = 0.95
NUM_OVERLAYS = 3
TRAIN_VAL_SPLIT = "train_val"  # the split --train-val trains on
REGISTRY_ATOL = 1e-4  # max |logit difference| between the registered model and the checkpoint


@dataclass(frozen=True)
class SeedRun:
    """One retraining of one source trial with one seed."""

    trial: Trial
    seed: int
    run_id: str
    final: Mapping[str, float]  # the final model's val metrics and the search's metric (EpochResult keys)
    checkpoint: Path  # last.pt: the final model
    metric: str = METRIC  # the search's

    @property
    def score(self) -> float:
        return float(self.final.get(self.metric, math.nan))


@dataclass(frozen=True)
class Candidate:
    """A source trial and its retrainings over seeds, scored by the confidence bound on the bad side."""

    trial: Trial
    runs: tuple[SeedRun, ...]
    mode: str = MODE  # the search's: max (higher is better) or min

    @property
    def metric(self) -> str:
        return self.runs[0].metric if self.runs else METRIC

    @property
    def values(self) -> list[float]:
        return [run.score for run in self.runs]

    @property
    def stats(self) -> tuple[float, float, float]:
        return lower_confidence_bound(self.values)

    @property
    def score(self) -> float:
        """``mean - margin`` (``mean + margin`` for a metric where lower is better)."""
        mean, _, margin = self.stats
        margin = margin if math.isfinite(margin) else 0.0
        return mean - margin if self.mode == "max" else mean + margin

    def best_run(self) -> SeedRun:
        return max(self.runs, key=lambda run: (_goodness(run.score, self.mode), -run.seed))


@dataclass(frozen=True)
class RetrainResult:
    run_id: str  # the parent run of this invocation
    candidates: tuple[Candidate, ...]  # ranked, winner first
    table: pd.DataFrame
    model_name: str | None = None
    model_version: str | None = None
    model_uri: str | None = None
    registry_max_abs_diff: float | None = None
    files: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def winner(self) -> Candidate:
        return self.candidates[0]


def lower_confidence_bound(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, sample std, margin) with margin = t(confidence, n - 1) * std / sqrt(n); NaN std and
    margin for a single value. The score is ``mean - margin``."""
    from scipy.stats import t as student_t

    array = np.asarray(values, dtype=float)
    if array.size == 0 or not np.all(np.isfinite(array)):
        return math.nan, math.nan, math.nan
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan, math.nan
    std = float(array.std(ddof=1))
    return mean, std, float(student_t.ppf(confidence, array.size - 1) * std / math.sqrt(array.size))


def select_sources(client: MlflowClient, search_name: str | None = None, run_id: str | None = None,
                   top_k: int = 1) -> tuple[Search, list[Trial]]:
    """The search and the source trials: ``run_id`` itself, else the ``top_k`` best of the search."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if run_id is None:
        search = load_search(client, search_name)
        return search, search.best(top_k)
    try:
        run = tracking.call(client.get_run, run_id)
    except MlflowException:
        raise TrackingError(f"no run with id '{run_id}' in {client.tracking_uri}") from None
    parent = run.data.tags.get(TAG_PARENT)
    if parent is None or run.data.tags.get(TAG_ROLE) != Role.TRIAL:
        raise TrackingError(f"run {run_id} is not a trial of a search (no seg.role=trial tag and parent run): "
                            f"pass the run id of a trial (a child run of a search)")
    search = load_search(client, parent)
    trial = next((t for t in search.trials if t.run_id == run_id), None)
    if trial is None:
        raise TrackingError(f"run {run_id} is not among the trials of search '{search.name}'")
    return search, [trial]


def retrain(client: MlflowClient, search: Search, trials: Sequence[Trial], *, seeds: Sequence[int] | None = None,
            epochs: int | None = None, train_val: bool = False, overrides: Mapping[str, Any] | None = None,
            work_dir: str | Path, report_dir: str | Path | None = None, model_name: str | None = None,
            register: bool = True, log: Callable[[str], None] = print) -> RetrainResult:
    """Retrain every trial of ``trials`` once per seed, rank them, register the winner.

    ``seeds`` None: each trial's own ``train.seed``. ``epochs`` None: the trial's
    ``train.epochs`` (the search's full schedule). ``train_val``: train on train+val
    (the val metrics are then measured on training images). ``overrides``: dotted
    config keys applied last. With more than one run in all, the comparison table is
    written to ``report_dir`` as ``seed_robust.csv``/``.md`` and logged to the search's
    parent run under ``report/``.
    """
    work = Path(work_dir).absolute()
    configs = {trial.run_id: _retrain_config(client, trial, epochs, train_val, overrides, work) for trial in trials}
    commit = git_commit(str(tracking.REPO_ROOT))
    space_file = search.run.data.tags.get(TAG_SPACE_FILE, "")
    lineage = {"source_search": search.name, "source_search_run_id": search.run_id,
               "search_space_file": space_file, TAG_GIT_COMMIT: commit, TAG_MLFLOW_GIT_COMMIT: commit}
    seed_lists = {t.run_id: list(seeds) if seeds else [configs[t.run_id].train.seed] for t in trials}
    parent_name = f"retrain-{trials[0].name}" if len(trials) == 1 else f"retrain-top{len(trials)}"
    parent_id = tracking.start_run(search.experiment_id, run_name=parent_name, client=client, tags={
        **lineage, TAG_ROLE: Role.RETRAIN, "source_trial_run_ids": ",".join(t.run_id for t in trials),
        "seeds": " ".join(map(str, sorted({s for v in seed_lists.values() for s in v}))),
        "train_val": str(train_val)})
    work = work / parent_id
    with tracking.run_context(parent_id, client):
        candidates = []
        for trial in trials:
            runs = []
            for seed in seed_lists[trial.run_id]:
                cfg = configs[trial.run_id].with_overrides({"train.seed": seed}, source="--seeds")
                log(f"retrain: {trial.name} (run {trial.run_id[:8]}) seed {seed}, {cfg.train.epochs} epochs"
                    f"{' on train+val' if train_val else ''}")
                runs.append(_train_seed(client, search, trial, cfg, seed, parent_id, lineage, train_val,
                                        work / f"{_slug(trial.name)}-seed{seed}"))
                log(f"retrain: {trial.name} seed {seed}: final {search.metric} {runs[-1].score:.4f}")
            candidates.append(Candidate(trial, tuple(runs), mode=search.mode))
        ranked = tuple(sorted(candidates, key=lambda c: (-_goodness(c.score, c.mode),
                                                         -_goodness(c.stats[0], c.mode))))
        table = seed_robust_table(ranked)
        winner = ranked[0]
        best = winner.best_run()
        mean, std, margin = winner.stats
        metric, bound = search.metric, "lcb" if search.mode == "max" else "ucb"
        tracking.log_metrics(parent_id, {f"winner_{metric}_mean": mean, f"winner_{metric}_{bound}": winner.score,
                                         f"winner_{metric}_std": std}, step=0, client=client)
        tracking.log_tags(parent_id, {"winner_trial": winner.trial.name, "winner_trial_run_id": winner.trial.run_id,
                                      "winner_run_id": best.run_id}, client)
        files: list[Path] = []
        if report_dir is not None and sum(len(c.runs) for c in ranked) > 1:
            files = _write_table(table, Path(report_dir), len(seed_lists[winner.trial.run_id]), search.metric,
                                 search.mode)
            log_report(client, search.run_id, files)
            log_report(client, parent_id, files)
        result = RetrainResult(run_id=parent_id, candidates=ranked, table=table, files=tuple(files))
        if register:
            name = model_name or model_name_for(search.name)
            version, uri, diff = register_model(client, best, name, {**lineage, "retrain_run_id": parent_id,
                                                                     "source_trial_run_id": best.trial.run_id,
                                                                     "seed": best.seed})
            tracking.log_tags(parent_id, {"registered_model": f"{name}/{version}"}, client)
            log(f"retrain: registered {uri} (from run {best.run_id[:8]}, seed {best.seed}); it predicts what the "
                f"checkpoint predicts (max |logit difference| {diff:.2g})")
            result = dataclasses.replace(result, model_name=name, model_version=version, model_uri=uri,
                                         registry_max_abs_diff=diff)
    return result


def register_model(client: MlflowClient, run: SeedRun, name: str, tags: Mapping[str, Any]) -> tuple[str, str, float]:
    """Log the run's final model in pt2 format, register it as ``name``, check it loads back.

    The model is traced with two validation images as the input example: the registered
    model takes any batch size at the validation images' size (the model's spatial
    sizes are traced as constants). Returns (version, ``models:/`` URI, max |difference|
    of the logits between the registered model and the checkpoint on the example).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from seg.checkpoint import model_from_checkpoint
    from seg.config import NUM_CLASSES

    tracking.configure_mlflow(client.tracking_uri)  # the fluent API below logs where the client does
    model, cfg = model_from_checkpoint(run.checkpoint, "cpu")
    example = _input_example(cfg)
    with torch.no_grad():
        expected = model(example)
    _, _, height, width = example.shape
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, height, width), "image")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES, height, width),
                                                          "logits")]))
    # a tensor example (not numpy) is used for tracing only: MLflow does not write it out as
    # JSON, which for full-size Cityscapes images would be hundreds of megabytes
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature,
                                        registered_model_name=name, await_registration_for=60)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        tracking.call(client.set_model_version_tag, name, version, key, str(value))
    uri = f"models:/{name}/{version}"
    loaded = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        got = loaded(example)
    diff = float((got - expected).abs().max())
    if diff > REGISTRY_ATOL or not torch.equal(got.argmax(1), expected.argmax(1)):
        raise TrackingError(f"the registered model {uri} does not predict what {run.checkpoint} predicts "
                            f"(max |logit difference| {diff:.3g})")
    tracking.call(client.set_model_version_tag, name, version, "registry_check_max_abs_diff", f"{diff:.3g}")
    return version, uri, diff


def seed_robust_table(candidates: Sequence[Candidate]) -> pd.DataFrame:
    """One row per candidate, ranked: search score, per-seed final value of the metric, mean, std, margin, score."""
    seeds = sorted({run.seed for c in candidates for run in c.runs})
    rows = []
    for rank, candidate in enumerate(candidates, 1):
        mean, std, margin = candidate.stats
        row = {"rank": rank, "trial": candidate.trial.name, f"search_{candidate.metric}": candidate.trial.score,
               "seeds": len(candidate.runs)}
        by_seed = {run.seed: run.score for run in candidate.runs}
        row.update({f"seed_{seed}": by_seed.get(seed, math.nan) for seed in seeds})
        row.update({"mean": mean, "std": std, "margin": margin, "score": candidate.score,
                    "winner": rank == 1, "source_run_id": candidate.trial.run_id,
                    "best_seed_run_id": candidate.best_run().run_id})
        rows.append(row)
    return pd.DataFrame(rows)


def model_name_for(search_name: str) -> str:
    """The registered model name of a search's winner: ``fcn-<search name>``."""
    return f"fcn-{_slug(search_name)}"


# -- helpers ----------------------------------------------------------------------------------------

def _retrain_config(client: MlflowClient, trial: Trial, epochs: int | None, train_val: bool,
                    overrides: Mapping[str, Any] | None, work: Path) -> Config:
    run = tracking.call(client.get_run, trial.run_id)
    cfg = config_from_run(client, run)
    # the config is kept as the trial had it, train.num_threads included (on CPU the thread
    # count changes the numbers): pass --set train.num_threads=null to use every core
    changes: dict[str, Any] = dict(overrides or {})
    if epochs is not None:
        changes["train.epochs"] = epochs
    cfg = cfg.with_overrides(changes, source="retrain options") if changes else cfg
    if train_val:
        root = resolve_data_root(cfg.data.root)
        key = hashlib.sha1(f"{root}|{cfg.data.train_split}|{cfg.data.val_split}".encode()).hexdigest()[:10]
        root = train_val_root(root, cfg.data.train_split, cfg.data.val_split, work / "train_val_data" / key)
        cfg = cfg.with_overrides({"data.root": str(root), "data.train_split": TRAIN_VAL_SPLIT},
                                 source="--train-val")
    return cfg


def train_val_root(root: Path, train_split: str, val_split: str, out: Path) -> Path:
    """A data root (symbolic links into ``root``) whose split ``train_val`` holds both splits.

    ``seg.data`` reads one split directory per loader, and ``fit`` builds its loaders from
    the config, so the union is made on disk rather than with a ConcatDataset. The val
    images are renamed into cities ``<city>-<val split>`` (the synthetic set reuses names
    across splits); ``val_split`` is linked as it is, for validation.
    """
    out = Path(out)
    suffix = re.sub(r"[^A-Za-z0-9]+", "-", val_split)
    for top in ("leftImg8bit", "gtFine"):
        for split, target, rename in ((train_split, TRAIN_VAL_SPLIT, False), (val_split, TRAIN_VAL_SPLIT, True),
                                      (val_split, val_split, False)):
            for file in sorted((root / top / split).glob("*/*")):
                city = file.parent.name
                new_city = f"{city}-{suffix}" if rename else city
                link = out / top / target / new_city / (new_city + file.name[len(city):] if rename else file.name)
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(file.resolve())
    return out


def _train_seed(client: MlflowClient, search: Search, trial: Trial, cfg: Config, seed: int, parent_id: str,
                lineage: Mapping[str, str], train_val: bool, out_dir: Path) -> SeedRun:
    run_id = tracking.start_run(search.experiment_id, run_name=f"{trial.name}-seed{seed}", parent_run_id=parent_id,
                                client=client, tags={**lineage, TAG_ROLE: Role.RETRAIN_SEED, "source_trial": trial.name,
                                                     "source_trial_run_id": trial.run_id, TAG_SEED: seed,
                                                     "train_val": str(train_val)})
    started = time.perf_counter()
    result = tracking.tracked_fit(cfg, out_dir, run_id, client=client, num_overlays=0)
    final = {key: value for key, value in result.history[-1].items()
             if key.startswith("val_") or key == search.metric}
    checkpoint = Path(result.out_dir) / "last.pt"
    final_metrics = {f"final_{key}": value for key, value in final.items() if "/" not in key}
    final_metrics["retrain_seconds"] = time.perf_counter() - started
    tracking.log_metrics(run_id, final_metrics, step=cfg.train.epochs, client=client)
    tracking.log_prediction_overlays(run_id, checkpoint, count=NUM_OVERLAYS, client=client)
    return SeedRun(trial=trial, seed=seed, run_id=run_id, final=final, checkpoint=checkpoint, metric=search.metric)


def _input_example(cfg: Config) -> torch.Tensor:
    """Two validation images (batch size 2 keeps the batch dimension dynamic in the traced model)."""
    from seg.data.cityscapes import CityscapesSegmentation
    from seg.data.transforms import eval_transform

    dataset = CityscapesSegmentation(resolve_data_root(cfg.data.root), cfg.data.val_split,
                                     transform=eval_transform(cfg.data))
    image = dataset[0][0].float()
    return torch.stack([image, image.flip(-1)])


def _write_table(table: pd.DataFrame, out: Path, seeds: int, metric: str, mode: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "seed_robust.csv", index=False)
    shown = table.drop(columns=["source_run_id", "best_seed_run_id"])
    sign, bound, best = ("-", "lower", "highest") if mode == "max" else ("+", "upper", "lowest")
    note = (f"Final {metric} of each retraining. score = mean {sign} t({CONFIDENCE}, S-1) * std / sqrt(S), a "
            f"one-sided {CONFIDENCE:.0%} {bound} confidence bound of the mean over S seeds; the winner has the "
            f"{best} score."
            + (" With one seed there is no margin: score = the single value." if seeds < 2 else "") + "\n\n")
    (out / "seed_robust.md").write_text(note + markdown_table(shown))
    return [out / "seed_robust.csv", out / "seed_robust.md"]


def _goodness(value: float, mode: str) -> float:
    """Larger is better whatever the mode; NaN the worst."""
    if not math.isfinite(value):
        return -math.inf
    return value if mode == "max" else -value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "search"
