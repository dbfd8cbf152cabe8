"""Benchmark parts that need the tuning stack: harness overhead and search efficiency.

``harness``: the wall time of a small ``run_search`` (Ray Tune + Optuna + ASHA + MLflow)
against training the very same trial configs directly with ``seg.engine.fit``, with the
same concurrency (a pool of spawned processes; sequential for concurrency 1). ASHA's
grace period is set to the trials' epochs, so no trial is stopped early and both sides
train exactly the same epochs. The difference is what the harness adds: Ray's start,
trial process start-up, MLflow runs, per-epoch reports and checkpoint copies, overlays.

``search``: TPE with ASHA against random search without early stopping, at equal budgets
of trial-epochs, for several seeds, on the synthetic data. The searches run in-process
with Optuna directly around ``seg.engine.fit`` (``SuccessiveHalvingPruner``, Optuna's
asynchronous successive halving, i.e. ASHA), one search per process, as many processes
as cores: the trial-epoch budget, not the wall time, is what is compared, and Ray's
per-trial start-up (see the harness part) would multiply the wall time of dozens of
short trials for nothing.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from seg.bench.report import Figure, Section, Table
from seg.config import Config, config_from_dict

__all__ = ["run_harness_part", "run_search_part", "search_curve", "budget_to_reach"]

# The search part's own synthetic set (written to a temporary directory): small images, so
# that an epoch is many short steps and a 4-epoch trial already separates good settings
# from bad ones, in ~3 s per trial-epoch on one core.
SEARCH_DATA = {"train": 96, "val": 16, "height": 128, "width": 256}
SEARCH_DATA_QUICK = {"train": 8, "val": 4, "height": 64, "width": 128}
SEARCH_FIXED = {
    "data.scale_range": [0.5, 1.0],
    "data.eval_scale": 0.5,
    "data.eval_batch_size": 8,
    "data.cache": True,
    "model.backbone": "resnet18",
    "optim.name": "sgd",
    "optim.schedule": "poly",
    "optim.warmup_iters": 4,
    "optim.weight_decay": 1.0e-4,
    "train.seed": 0,
    "train.device": "cpu",
}


# --- harness ---------------------------------------------------------------------------------

def run_harness_part(*, cores: int, trials: int = 4, epochs: int = 2, concurrency: int = 2,
                     crop=(128, 256), batch: int = 4, max_steps: int | None = None,
                     model: tuple[str, str] = ("fcn32s", "resnet18"), num_overlays: int = 3, log=print) -> Section:
    from seg.tuning.search import run_search, start_ray
    from seg.tuning.space import space_from_dict

    import torch

    started = time.perf_counter()
    section = Section("harness", "3. Harness overhead")
    cpus_per_trial = max(1, cores // concurrency)
    # on a GPU machine the trials share the GPU, as a GPU search would run them
    gpus_per_trial = 1 / concurrency if torch.cuda.is_available() else 0
    fixed = {"data.crop_size": list(crop), "data.batch_size": batch, "model.arch": model[0],
             "model.backbone": model[1], "data.scale_range": [0.75, 1.25], "data.eval_batch_size": 4,
             "train.seed": 0}
    if max_steps:
        fixed["train.max_steps_per_epoch"] = max_steps
    tree = {"name": "bench-harness", "fixed": fixed,
            "space": {"optim.lr": {"loguniform": [3.0e-3, 3.0e-2]}, "optim.momentum": {"uniform": [0.8, 0.95]}},
            "budget": {"trials": trials, "max_epochs": epochs, "concurrency": concurrency,
                       "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial, "seed": 0,
                       "probe": False, "grace_period": epochs, "reduction_factor": 2, "startup_trials": trials}}
    space = space_from_dict(tree, source="bench harness space")
    with tempfile.TemporaryDirectory(prefix="seg-bench-harness-") as scratch:
        scratch = Path(scratch)
        uri = f"sqlite:///{scratch / 'mlflow.db'}"
        search_started = time.perf_counter()
        result = run_search(space, storage=scratch / "ray", tracking_uri=uri, num_overlays=num_overlays, verbose=0)
        search_wall = time.perf_counter() - search_started
        configs = [config_from_dict(trial.config) for trial in result.trials if trial.config]
        states = [trial.state for trial in result.trials]
        log(f"[harness] run_search: {len(result.trials)} trials ({', '.join(sorted(set(states)))}), "
            f"{search_wall:.1f} s wall, {result.train_seconds:.1f} s of epochs")

        direct_started = time.perf_counter()
        direct = fit_directly(configs, scratch / "direct", concurrency)
        direct_wall = time.perf_counter() - direct_started
        log(f"[harness] fit directly ({concurrency} process(es)): {direct_wall:.1f} s wall, "
            f"{sum(d['epoch_seconds'] for d in direct):.1f} s of epochs")

        ray_started = time.perf_counter()
        import ray

        start_ray(num_cpus=cores)
        ray_init = time.perf_counter() - ray_started
        ray.shutdown()
        ray_cycle = time.perf_counter() - ray_started
        startup = trial_startup_costs(configs[0] if configs else space.base_config)
        checkpoints = checkpoint_costs(configs[0] if configs else space.base_config, scratch / "checkpoint-cost")
        log(f"[harness] trial start-up: {', '.join(f'{k} {v:.2f} s' for k, v in startup.items())}")
        log(f"[harness] checkpoint per epoch: {', '.join(f'{k} {v:.2f}' for k, v in checkpoints.items())}")

    section.figures.append(Figure(
        f"search wall time / direct fit wall time ({len(configs)} trials x {epochs} epochs, concurrency {concurrency})",
        search_wall, "s", direct_wall, f"seg.engine.fit, same configs, {concurrency} process(es)",
        goal=("<=", 1.10), percent=False))
    search_epochs = result.train_seconds
    direct_epochs = sum(d["epoch_seconds"] for d in direct)
    section.figures.append(Figure(
        "epoch time inside Ray trials / epoch time of direct fit (summed)", search_epochs, "s", direct_epochs,
        "direct fit", goal=("<=", 1.05), percent=False))
    overhead = search_wall - direct_wall
    per_trial = overhead * concurrency / max(1, len(configs))
    trial_seconds = direct_epochs / max(1, len(configs))
    section.tables.append(Table("Wall time", ["", "seconds"], [
        ["run_search wall (Ray + Optuna + ASHA + MLflow)", round(search_wall, 1)],
        ["direct fit wall (same configs, same concurrency)", round(direct_wall, 1)],
        ["overhead", round(overhead, 1)],
        ["of which ray.init (measured separately) / init + shutdown", f"{ray_init:.1f} / {ray_cycle:.1f}"],
        ["overhead per trial (x concurrency / trials)", round(per_trial, 1)],
        ["mean trial length in direct fit (epoch time)", round(trial_seconds, 1)],
        ["trial length at which the overhead would be 10%", round(10 * per_trial, 0)],
    ]))
    section.tables.append(Table(
        "Trial start-up in a fresh process (seconds; the first three are paid by every Ray trial process)",
        ["component", "seconds"], [[name, round(value, 2)] for name, value in startup.items()]))
    section.tables.append(Table(
        f"Checkpoint cost per epoch ({model[0]}/{model[1]}: fit writes last.pt, Tune copies it into its storage)",
        ["", "value"], [[name, round(value, 3)] for name, value in checkpoints.items()]))
    section.tables.append(Table("Trials", ["trial", "state", "epochs", "epoch s in Ray", "epoch s direct",
                                           "Tune time_total_s"],
                                [[t.trial_id, t.state, t.epochs, round(t.train_seconds, 1),
                                  round(d["epoch_seconds"], 1), round(t.trial_seconds, 1)]
                                 for t, d in zip([t for t in result.trials if t.config], direct)]))
    section.notes.append(
        f"Search: {trials} trials of {epochs} epochs (ASHA grace period = {epochs}: none stopped), concurrency "
        f"{concurrency}, {cpus_per_trial} CPU(s) per trial, {num_overlays} overlays per trial, SQLite MLflow store and "
        f"Ray storage in a temporary directory. Direct: the trials' own configs (summary.json) through seg.engine.fit "
        f"in a pool of {concurrency} spawned process(es), checkpoints written the same way.")
    section.notes.append(
        "The overhead is mostly fixed per search (Ray start, MLflow parent run, the end-of-search sweep) and per "
        "trial (process start, torch/seg import, MLflow run, overlays, checkpoint copies into Ray storage), so the "
        "ratio falls as trials get longer; the last row says how long a trial must train for the 10% goal.")
    section.data.update({"startup": startup, "checkpoints": checkpoints})
    section.data.update({"search_wall": search_wall, "direct_wall": direct_wall, "ray_init": ray_init,
                         "ray_init_shutdown": ray_cycle, "direct": direct, "search": result.to_dict()})
    section.seconds = time.perf_counter() - started
    return section


_STARTUP_PROBE = """
import json, sys, time
times = {}
t = time.perf_counter(); import torch; times["import torch"] = time.perf_counter() - t
t = time.perf_counter(); import seg.engine; times["import seg.engine"] = time.perf_counter() - t
t = time.perf_counter(); import seg.tuning.tracking; times["import mlflow (seg.tuning.tracking)"] = time.perf_counter() - t
t = time.perf_counter(); import ray.tune; times["import ray.tune"] = time.perf_counter() - t
from seg.config import config_from_dict
from seg.data.cityscapes import build_dataloaders
from seg.models import build_model_from_config
cfg = config_from_dict(json.loads(sys.argv[1]))
torch.set_num_threads(cfg.train.num_threads or 1)
t = time.perf_counter(); build_dataloaders(cfg, torch.device("cpu"))
times["build_dataloaders (validates both splits)"] = time.perf_counter() - t
t = time.perf_counter(); build_model_from_config(cfg.model)
times["build_model"] = time.perf_counter() - t
print(json.dumps(times))
"""


def trial_startup_costs(cfg: Config) -> dict[str, float]:
    """Seconds of each start-up step of a trial process, measured in a fresh interpreter."""
    import json
    import subprocess
    import sys

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _STARTUP_PROBE, json.dumps(cfg.to_dict())], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the start-up probe failed: {done.stderr[-2000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    times["whole process (interpreter start to exit)"] = time.perf_counter() - started
    return times


def checkpoint_costs(cfg: Config, directory: Path) -> dict[str, float]:
    """What one epoch's checkpointing costs: fit's atomic save of model + optimiser, and a copy as Tune makes."""
    import torch

    from seg.checkpoint import save_checkpoint
    from seg.models import build_model_from_config
    from seg.optim import build_optimizer

    directory.mkdir(parents=True, exist_ok=True)
    model = build_model_from_config(cfg.model)
    optimizer = build_optimizer(cfg.optim, model)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()  # momentum buffers exist, as after any epoch
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {}, "epoch": 1,
             "config": cfg.to_dict()}
    started = time.perf_counter()
    path = save_checkpoint(directory / "last.pt", state)
    saved = time.perf_counter() - started
    started = time.perf_counter()
    shutil.copytree(directory, directory.with_name("tune-copy"))
    copied = time.perf_counter() - started
    return {"checkpoint MB": path.stat().st_size / 1e6, "save_checkpoint s (torch.save + fsync)": saved,
            "copy into Ray storage s": copied}


def fit_directly(configs: list[Config], out_root: Path, concurrency: int) -> list[dict[str, float]]:
    """``seg.engine.fit`` of each config, ``concurrency`` spawned processes at a time (in order)."""
    out_root.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=concurrency, mp_context=context) as pool:
        futures = [pool.submit(_fit_one, cfg, str(out_root / f"trial{i}")) for i, cfg in enumerate(configs)]
        return [future.result() for future in futures]


def _fit_one(cfg: Config, out_dir: str) -> dict[str, float]:
    from seg.engine import fit

    started = time.perf_counter()
    result = fit(cfg, out_dir)
    return {"wall": time.perf_counter() - started, "epoch_seconds": sum(h["epoch_seconds"] for h in result.history),
            "best_miou": result.best_miou}


# --- search efficiency -----------------------------------------------------------------------

class _BudgetSpent(Exception):
    """Raised from on_epoch_end when the search's trial-epoch budget is used up."""


SEARCH_SPACE = {
    "optim.lr": ("loguniform", 1.0e-4, 0.5),
    "optim.momentum": ("uniform", 0.5, 0.99),
    "model.arch": ("choice", "fcn32s", "fcn8s"),
}


def run_search_part(*, cores: int, budget: int = 48, max_epochs: int = 4, seeds: tuple[int, ...] = (0, 1, 2),
                    crop=(64, 128), batch: int = 4, max_steps: int | None = None, reduction_factor: int = 2,
                    startup_trials: int = 4, data: dict[str, int] | None = None, log=print) -> Section:
    from seg.data.synthetic import write_synthetic_cityscapes

    started = time.perf_counter()
    section = Section("search", "5. Search efficiency")
    data = data or SEARCH_DATA
    scratch_dir = tempfile.TemporaryDirectory(prefix="seg-bench-search-")
    root = write_synthetic_cityscapes(Path(scratch_dir.name) / "cityscapes", seed=0, **data)
    base = Config().with_overrides({**SEARCH_FIXED, "data.root": str(root), "data.crop_size": list(crop),
                                    "data.batch_size": batch,
                                    "data.num_workers": 0, "train.num_threads": 1, "train.epochs": max_epochs,
                                    "train.max_steps_per_epoch": max_steps,
                                    # warm-up must be shorter than a capped (smoke-sized) run
                                    "optim.warmup_iters": 0 if max_steps else SEARCH_FIXED["optim.warmup_iters"]})
    jobs = [(method, seed) for seed in seeds for method in ("random", "tpe-asha")]
    context = multiprocessing.get_context("spawn")
    results: dict[tuple[str, int], dict[str, Any]] = {}
    scratch = scratch_dir.name
    with scratch_dir, concurrent.futures.ProcessPoolExecutor(max_workers=max(1, cores), mp_context=context) as pool:
        futures = {pool.submit(search_once, method, seed, base, budget, max_epochs, reduction_factor,
                               startup_trials, str(Path(scratch) / f"{method}-{seed}")): (method, seed)
                   for method, seed in jobs}
        for future in concurrent.futures.as_completed(futures):
            method, seed = futures[future]
            results[(method, seed)] = future.result()
            record = results[(method, seed)]
            log(f"[search] {method} seed {seed}: best val mIoU {record['best']:.4f} after {record['spent']} "
                f"trial-epochs, {len(record['trials'])} trials, {record['seconds']:.0f} s")

    fractions = (1 / 8, 1 / 4, 1 / 3, 1 / 2, 1.0)
    rows, reach_rows = [], []
    for fraction in fractions:
        spent = max(1, math.floor(budget * fraction + 1e-9))
        row = [f"{spent} ({fraction:.0%})"]
        for method in ("random", "tpe-asha"):
            values = [search_curve(results[(method, s)]["curve"], spent) for s in seeds]
            row.append(f"{_mean(values):.4f} ± {_spread(values):.4f}")
        rows.append(row)
    for seed in seeds:
        target = results[("random", seed)]["best"]
        reached = budget_to_reach(results[("tpe-asha", seed)]["curve"], target)
        reach_rows.append([seed, round(target, 4), round(results[("tpe-asha", seed)]["best"], 4),
                           reached if reached is not None else "not reached",
                           f"{reached / budget:.0%}" if reached is not None else "-",
                           len(results[("random", seed)]["trials"]), len(results[("tpe-asha", seed)]["trials"])])
    third = max(1, math.floor(budget / 3 + 1e-9))
    random_final = _mean([results[("random", s)]["best"] for s in seeds])
    tpe_third = _mean([search_curve(results[("tpe-asha", s)]["curve"], third) for s in seeds])
    section.figures.append(Figure(
        f"TPE+ASHA best val mIoU after 1/3 of the budget ({third} trial-epochs) / random search's final best "
        f"({budget}), mean of {len(seeds)} seeds", tpe_third, "mIoU", random_final, "random search, full budget",
        goal=(">=", 1.0)))
    reached = [budget_to_reach(results[("tpe-asha", s)]["curve"], results[("random", s)]["best"]) for s in seeds]
    fractions_needed = [r / budget if r is not None else math.inf for r in reached]
    median_needed = statistics.median(fractions_needed)
    section.figures.append(Figure(
        "budget TPE+ASHA needs to reach random search's final best (median over seeds) / full budget",
        median_needed * budget, "trial-epochs", budget, "random search's budget", goal=("<=", 1 / 3)))
    section.tables.append(Table(
        "Best val mIoU reached as a function of trial-epochs spent (mean ± std over seeds)",
        ["trial-epochs", "random search", "TPE + ASHA"], rows))
    section.tables.append(Table(
        "Per seed: trial-epochs TPE+ASHA needs to reach random search's final best",
        ["seed", "random final best", "TPE+ASHA final best", "TPE+ASHA reaches it at", "of budget",
         "random trials", "TPE+ASHA trials"], reach_rows))
    section.notes.append(
        f"Space: {', '.join(f'{k} {v[0]}{v[1:]}' for k, v in SEARCH_SPACE.items())}; ResNet-18 backbone, crop "
        f"{crop[0]}x{crop[1]}, batch {batch}, a synthetic set of {data['train']} train / {data['val']} val images of "
        f"{data['height']}x{data['width']} (eval_scale 0.5), {max_epochs} epochs per trial"
        f"{f', {max_steps} steps per epoch' if max_steps else ''}, 1 thread per search, {cores} searches at a time.")
    section.notes.append(
        f"Random: Optuna RandomSampler, every trial runs {max_epochs} epochs. TPE+ASHA: TPESampler(multivariate, "
        f"{startup_trials} startup trials) with SuccessiveHalvingPruner(min_resource=1, reduction_factor="
        f"{reduction_factor}) (rungs at 1, {reduction_factor}, ... epochs). Both stop when the budget of {budget} "
        f"trial-epochs is spent (the last trial may be cut short); a diverged trial's epoch counts as spent, and "
        f"TPE is told it was pruned (ranked below every completed trial), as the search tells it. "
        f"Run in-process with Optuna around seg.engine.fit, not through Ray Tune (see the module docstring).")
    section.data["searches"] = {f"{m}-{s}": r for (m, s), r in results.items()}
    section.seconds = time.perf_counter() - started
    return section


def search_curve(curve: list[tuple[int, float]], spent: int) -> float:
    """The best value reached within ``spent`` trial-epochs (NaN before the first)."""
    best = math.nan
    for epochs, value in curve:
        if epochs > spent:
            break
        best = value
    return best


def budget_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The trial-epochs after which the curve first reaches ``target``; None if it never does."""
    for epochs, value in curve:
        if value >= target:
            return epochs
    return None


def search_once(method: str, seed: int, base: Config, budget: int, max_epochs: int, reduction_factor: int,
                startup_trials: int, out_root: str) -> dict[str, Any]:
    """One search of ``budget`` trial-epochs; returns its curve of (epochs spent, best so far) and trials."""
    import optuna
    import torch
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    from seg.engine import fit
    from seg.errors import DivergenceError

    torch.set_num_threads(base.train.num_threads or 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for key, (kind, *args) in SEARCH_SPACE.items():
        distributions[key] = (CategoricalDistribution(args) if kind == "choice" else
                              FloatDistribution(args[0], args[1], log=kind == "loguniform"))
    if method == "tpe-asha":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials)
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor,
                                                        min_early_stopping_rate=0)
    elif method == "random":
        sampler, pruner = optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    else:
        raise ValueError(f"unknown search method {method!r}")
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    started = time.perf_counter()
    spent, best = 0, -math.inf
    curve: list[tuple[int, float]] = []
    trials: list[dict[str, Any]] = []
    while spent < budget:
        trial = study.ask(distributions)
        cfg = base.with_overrides(trial.params)
        values: list[float] = []

        def on_epoch_end(result: Any) -> None:
            nonlocal spent, best
            spent += 1
            value = result.metrics.get("val_miou", math.nan)
            if math.isfinite(value):
                values.append(value)
                best = max(best, value)
                trial.report(value, result.epoch)
            curve.append((spent, best))
            if spent >= budget:
                raise _BudgetSpent
            if trial.should_prune():
                raise optuna.TrialPruned

        out_dir = Path(out_root) / f"trial{trial.number}"
        state = "completed"
        try:
            fit(cfg, out_dir, on_epoch_end=on_epoch_end)
            if values:
                study.tell(trial, max(values))
            else:  # no finite val mIoU (no labelled val pixel): nothing to learn from
                state = "no value"
                study.tell(trial, state=TrialState.FAIL)
        except optuna.TrialPruned:
            state = "pruned"
            study.tell(trial, state=TrialState.PRUNED)
        except _BudgetSpent:
            state = "cut by budget"
            study.tell(trial, state=TrialState.PRUNED)
        except DivergenceError:
            state = "diverged"
            spent += 1  # the epoch it diverged in was trained
            curve.append((spent, best))
            # as the search does (seg.tuning.searcher.SegOptunaSearch): pruned, which TPE ranks
            # below every completed trial; FAIL would be ignored and the region sampled again
            study.tell(trial, state=TrialState.PRUNED)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        trials.append({"number": trial.number, "params": trial.params, "values": values, "state": state})
    return {"method": method, "seed": seed, "curve": curve, "best": best if math.isfinite(best) else math.nan,
            "spent": spent, "trials": trials, "seconds": time.perf_counter() - started}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0
