#!/usr/bin/env python
"""Retrain the best trial of a search on its full schedule, track it, register the model.

    python scripts/retrain.py --search quick                      # the best trial, its own seed
    python scripts/retrain.py --run-id 3f2a...  --epochs 50 --seeds 0 1 2
    python scripts/retrain.py --search quick --top-k 3 --seeds 0 1 2   # seed-robust winner
    python scripts/retrain.py --search quick --train-val --set data.num_workers=4

The configuration comes from the trial's MLflow run (its config.yaml). Each (trial, seed)
is a child run of one retrain run in the search's experiment, tagged with its lineage
(source search and trial run, search space file, git commit), with per-epoch metrics,
the final checkpoint and prediction overlays. With --top-k K the K best trials are each
retrained over --seeds and ranked by mean - t(0.95, S-1) * std / sqrt(S) (a lower
confidence bound: a configuration must be good on every seed, not lucky on one; mean +
for a search on a metric where lower is better, such as val_loss); the
table goes to experiments/<search>/seed_robust.csv/.md and the search's parent run.
The winner's best seed is registered in the MLflow model registry (--model-name,
default fcn-<search>), loaded back and checked to predict what its checkpoint predicts.

Exit status: 0 on success, 2 for an expected error (no such search or run, no completed
trial, bad option) with a one-line message, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--search", help="search name or parent run id (default: the newest search)")
    source.add_argument("--run-id", help="retrain this trial run instead of the search's best")
    parser.add_argument("--top-k", type=int, default=1, help="retrain the K best trials and pick a winner (default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the trial's own seed)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the trial's train.epochs, the full schedule)")
    parser.add_argument("--train-val", action="store_true", help="train on train+val (val metrics then "
                                                                  "measure training images)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied last, e.g. --set data.root=/data/cityscapes")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--model-name", help="registered model name (default: fcn-<search name>)")
    parser.add_argument("--no-register", action="store_true", help="do not register the model")
    parser.add_argument("--work-dir", help="checkpoints (default: outputs/retrain/<search name>/)")
    parser.add_argument("--out", help="report directory for the seed table (default: experiments/<search name>/)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("seg").setLevel(logging.INFO)
    from seg.config import parse_overrides
    from seg.errors import SegError
    from seg.paths import safe_child
    from seg.tuning.report import connect
    from seg.tuning.retrain import retrain, select_sources

    started = time.perf_counter()
    try:
        if args.run_id and args.top_k != 1:
            raise SegError("--top-k picks among a search's trials: use it with --search, not --run-id")
        if args.epochs is not None and args.epochs < 1:
            raise SegError(f"--epochs must be >= 1, got {args.epochs}")
        overrides = parse_overrides(args.settings)
        client = connect(args.tracking_uri)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        search, trials = select_sources(client, args.search, args.run_id, args.top_k)
        work_dir = (Path(args.work_dir) if args.work_dir
                    else safe_child(REPO_ROOT / "outputs" / "retrain", search.name, "search name"))
        report_dir = Path(args.out) if args.out else safe_child(REPO_ROOT / "experiments", search.name, "search name")
        result = retrain(client, search, trials, seeds=args.seeds, epochs=args.epochs, train_val=args.train_val,
                         overrides=overrides, work_dir=work_dir, report_dir=report_dir, model_name=args.model_name,
                         register=not args.no_register)
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    winner = result.winner
    mean, std, margin = winner.stats
    print(f"done in {time.perf_counter() - started:.0f} s: retrain run {result.run_id}")
    if len(result.candidates) > 1 or len(winner.runs) > 1:
        print(result.table.drop(columns=["source_run_id", "best_seed_run_id"]).to_string(index=False))
    print(f"winner {winner.trial.name}: final {search.metric} mean {mean:.4f}"
          + (f" +- {std:.4f} over {len(winner.runs)} seeds, score {winner.score:.4f}" if len(winner.runs) > 1 else ""))
    if result.model_uri:
        print(f"registered model: {result.model_uri}")
    for path in result.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
