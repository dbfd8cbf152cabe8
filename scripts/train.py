#!/usr/bin/env python
"""Train one configuration and track it in MLflow.

  python scripts/train.py experiments/quick.yaml
  python scripts/train.py experiments/fcn8s_vgg16.yaml data.root=/data/cityscapes optim.lr=0.005 \\
      --run-name vgg-lr5e-3 --experiment fcn8s

Overrides are dotted config keys (``optim.lr=0.01``). Checkpoints go to
``outputs/<run name>`` (or ``--out-dir``). The run is logged to ``--tracking-uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``: params (the whole config),
per-epoch metrics, the per-class IoU table of the best epoch, prediction overlays and the
best/last checkpoints. See them with ``mlflow ui --backend-store-uri <uri>``. On a
terminal a progress bar runs over each epoch's steps, below a line per epoch.

Exit status: 0 on success, 2 for an expected error (bad config or data, unreadable
checkpoint, diverged training, missing weights) with a one-line message, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seg.checkpoint import load_checkpoint
from seg.config import load_config
from seg.data.cityscapes import CityscapesSegmentation, resolve_data_root
from seg.errors import CheckpointError, ConfigError, DataError, DivergenceError, WeightsNotFoundError
from seg.paths import safe_child

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = REPO_ROOT / "outputs"
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, DivergenceError, WeightsNotFoundError)


def output_dir(run_name: str, out_dir: str | None) -> Path:
    """``--out-dir`` if given, else ``outputs/<run name>``; a name that leaves ``outputs/`` is refused."""
    if out_dir is not None:
        return Path(out_dir).absolute()
    return safe_child(OUTPUTS, run_name, "--run-name")


class StepBar:
    """A progress bar over each epoch's steps on a terminal (tqdm, on stderr); nothing when
    stderr is not one (logs, CI), where the engine's lines every 20 steps say as much.
    Log lines are written above the bar (``logging_redirect_tqdm``)."""

    def __init__(self, epochs: int, enabled: bool | None = None) -> None:
        self.epochs = epochs
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: tqdm | None = None

    def __call__(self, epoch: int, step: int, steps: int | None, loss: float | None) -> None:
        if not self.enabled:
            return
        if step == 1:
            self.close()
            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{self.epochs}", unit="step", leave=False,
                            dynamic_ncols=True)
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _interrupt(signum: int, frame: object) -> None:
    # `kill`, `timeout` and schedulers send SIGTERM: end the MLflow run KILLED, as for Ctrl-C,
    # rather than dying with it RUNNING
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML, e.g. experiments/quick.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")
    parser.add_argument("--out-dir", default=None, help="checkpoint directory (default: outputs/<run name>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--experiment", default="train", help="MLflow experiment name (default: train)")
    parser.add_argument("--run-name", default=None, help="MLflow run name (default: <config name>-<time>)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue training from a checkpoint (e.g. outputs/<run>/last.pt)")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("seg").setLevel(logging.INFO)
    try:
        # everything that can be checked is checked before a run is created
        cfg = load_config(args.config, args.overrides)
        run_name = args.run_name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = output_dir(run_name, args.out_dir)
        if args.resume is None and (out_dir / "last.pt").exists():
            raise ConfigError(f"{out_dir} already holds a checkpoint: pass --resume {out_dir / 'last.pt'} to "
                              f"continue it, or choose another --run-name or --out-dir")
        if args.resume is not None:
            load_checkpoint(args.resume)  # unreadable or malicious: refused before a run exists
        root = resolve_data_root(cfg.data.root)
        for split in (cfg.data.train_split, cfg.data.val_split):
            CityscapesSegmentation(root, split)  # validates the files up front, naming any bad one

        from seg.tuning import tracking  # imports mlflow: only once the arguments are known to be good

        uri = tracking.configure_mlflow(args.tracking_uri)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        experiment_id = tracking.get_or_create_experiment(args.experiment)
        run_id = tracking.start_run(experiment_id, run_name, tags={
            "seg.command": "train", "seg.config_file": Path(args.config).absolute(), "seg.out_dir": out_dir,
            "seg.overrides": " ".join(args.overrides)})
        print(f"mlflow run {run_id} ('{run_name}') in experiment '{args.experiment}' at {uri}")
        bar = StepBar(cfg.train.epochs)
        try:
            # on a terminal, the root logger's lines (basicConfig) are written above the bar
            with logging_redirect_tqdm() if bar.enabled else contextlib.nullcontext():
                result = tracking.tracked_fit(cfg, out_dir, run_id, resume=args.resume, on_step=bar)
        finally:
            bar.close()
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"interrupted{f' ({interrupt})' if str(interrupt) else ''}", file=sys.stderr)
        return 130
    print(f"done: best val mIoU {result.best_miou:.4f} at epoch {result.best_epoch}; checkpoints in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
