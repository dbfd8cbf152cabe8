#!/usr/bin/env python
"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA, every trial tracked in MLflow.

    python scripts/tune.py search_spaces/quick.yaml                 # a few minutes on 2 CPU cores
    python scripts/tune.py search_spaces/sgd.yaml --num-samples 40 --concurrency 4
    python scripts/tune.py search_spaces/quick.yaml --resume        # continue an interrupted search
    python scripts/tune.py search_spaces/quick.yaml --smoke-test    # 2 trials, 1 short epoch

The budget (trials, epochs, concurrency, resources, metric, seed, ASHA settings) comes
from the space file; flags override it. Prints the ranked trials, the best configuration
and where to look in MLflow; writes <storage>/<name>/summary.json for report/retrain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# flag -> budget field
BUDGET_FLAGS = {"num_samples": "trials", "max_epochs": "max_epochs", "concurrency": "concurrency",
                "cpus_per_trial": "cpus_per_trial", "gpus_per_trial": "gpus_per_trial", "seed": "seed",
                "metric": "metric", "mode": "mode", "grace_period": "grace_period",
                "reduction_factor": "reduction_factor", "max_failures": "max_failures", "probe": "probe"}
SMOKE_TEST = {"trials": 2, "max_epochs": 1, "concurrency": 2, "grace_period": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", help="search space YAML (search_spaces/*.yaml)")
    budget = parser.add_argument_group("budget (overrides the space file's budget:)")
    budget.add_argument("--num-samples", type=int, help="number of trials")
    budget.add_argument("--max-epochs", type=int, help="epochs of a trial that is never stopped")
    budget.add_argument("--concurrency", type=int, help="trials at once")
    budget.add_argument("--cpus-per-trial", type=float)
    budget.add_argument("--gpus-per-trial", help="a fraction shares one GPU between trials; auto: as many as fit "
                                                 "(the memory probe decides)")
    budget.add_argument("--seed", type=int, help="seed of the sampler")
    budget.add_argument("--metric", help="val_miou (default), val_pixel_accuracy, val_loss...")
    budget.add_argument("--mode", choices=("max", "min"))
    budget.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    budget.add_argument("--reduction-factor", type=float, help="ASHA: keep 1/factor of the trials per rung")
    budget.add_argument("--max-failures", type=int, help="retries of a crashed trial")
    budget.add_argument("--probe", choices=("auto", "true", "false"),
                        help="probe the largest trials' memory before launching (auto: when trials use a GPU)")
    parser.add_argument("--name", help="search name (default: the space's; -2, -3... appended when taken)")
    parser.add_argument("--storage", help="Ray results directory (default: <repo>/ray_results)")
    parser.add_argument("--address", help="join a Ray cluster: 'auto' or ray://host:10001 (default: local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--resume", action="store_true", help="continue the newest search of this name")
    parser.add_argument("--smoke-test", action="store_true", help="2 trials of 1 epoch of 2 steps")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="config value for every trial, e.g. --set data.root=/data/cityscapes")
    parser.add_argument("--overlays", type=int, default=3, help="prediction overlays logged per trial")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="print nothing while the search runs")
    output.add_argument("--verbose", action="store_true", help="Ray Tune's own progress output (every trial's "
                                                               "config and results) instead of the short lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("seg.tuning.probing").setLevel(logging.INFO)  # what the memory probe measured and decided
    from seg.config import parse_overrides
    from seg.errors import SegError
    from seg.tuning.space import load_space

    overrides = {field: getattr(args, flag) for flag, field in BUDGET_FLAGS.items() if getattr(args, flag) is not None}
    # the store scripts/ui.py opens by default (run_search exports the URI it uses: ask before)
    default_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlflow.db'}"
    try:
        if args.resume and (overrides or args.smoke_test or args.settings):
            raise SegError("a resumed search continues with the budget and settings it started with: drop "
                           "the budget flags, --set and --smoke-test")
        runtime = parse_overrides(args.settings)
        name = args.name
        if args.smoke_test:
            overrides = {**SMOKE_TEST, **overrides}
            runtime.setdefault("train.max_steps_per_epoch", 2)
        space = load_space(args.space, overrides=overrides, runtime=runtime)
        if args.smoke_test:  # its own MLflow experiment and Ray directory
            space = dataclasses.replace(space, name=f"{args.name or space.name}-smoke")
            name = None

        from seg.tuning.search import run_search

        result = run_search(space, storage=args.storage, name=name, resume=args.resume, address=args.address,
                            tracking_uri=args.tracking_uri, num_overlays=args.overlays,
                            verbose=0 if args.quiet else 2 if args.verbose else 1)
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted. Resume with: {resume_command(args)}", file=sys.stderr)
        return 130
    print_result(result, args, default_uri)
    return 130 if result.interrupted else 0


def print_result(result, args: argparse.Namespace, default_uri: str | None = None) -> None:
    import pandas as pd

    print()
    state = "INTERRUPTED" if result.interrupted else "done"
    print(f"search {result.search_dir.name}: {state}, {len(result.trials)} trials "
          f"({result.metric}, {result.mode}); Ray results in {result.search_dir}")
    table = result.table()
    metric = f"{result.metric} (best)"
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(table.to_string(index=False, formatters={metric: "{:.4f}".format, "train s": "{:.1f}".format}))
    for trial in result.trials:
        if trial.state == "failed":
            print(f"  {trial.trial_id} failed: {trial.failure_reason}")
    best = result.best
    if best is None:
        print("\nno trial finished an epoch: there is no best configuration")
    else:
        print(f"\nbest: trial {best.trial_id}, {result.metric} {best.best:.4f} at epoch {best.best_epoch} "
              f"of {best.epochs} (MLflow run {best.run_id})")
        for key, value in best.params.items():
            print(f"  {key}: {json.dumps(list(value)) if isinstance(value, tuple) else value}")
        if best.checkpoint:
            print(f"  checkpoint: {best.checkpoint}")
    print(f"\nranking and full configs: {result.summary_path}")
    train, wall, concurrency = result.train_seconds, result.wall_seconds, result.concurrency
    if wall > 0:
        phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.phases.items())
        print(f"time: {wall:.0f} s wall ({phases}); the trials' epochs took {train:.0f} s in total, "
              f"{train / concurrency:.0f} s of wall at {concurrency} at a time")
    ui = ["python", "scripts/ui.py", "--search", result.search_dir.name]
    if result.tracking_uri != default_uri:
        ui += ["--tracking-uri", result.tracking_uri]
    print(f"\nMLflow ({result.tracking_uri}): experiment {result.experiment_id}, parent run {result.parent_run_id}")
    print(f"  open the UI:  {shlex.join(ui)}")
    print(f"  then:         http://127.0.0.1:5000/#/experiments/{result.experiment_id}")
    if result.interrupted:
        print(f"\nresume with: {resume_command(args, result.search_dir.name)}")


def resume_command(args: argparse.Namespace, name: str | None = None) -> str:
    parts = ["python", "scripts/tune.py", args.space, "--resume"]
    if name or args.name:
        parts += ["--name", name or args.name]
    if args.storage:
        parts += ["--storage", args.storage]
    if args.address:
        parts += ["--address", args.address]
    return shlex.join(parts)


if __name__ == "__main__":
    sys.exit(main())
