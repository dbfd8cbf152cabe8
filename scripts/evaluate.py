#!/usr/bin/env python
"""Evaluate Cityscapes predictions with the official pixel-level metrics.

Two modes:

  # prediction PNGs in the official result format (labelIds, named {city}_{seq}_{frame}*.png)
  python scripts/evaluate.py --predictions PRED_DIR [--data-root DIR] [--split val] [--out OUT]

  # a training checkpoint: predict the split, write predictions + colour images, evaluate
  python scripts/evaluate.py --checkpoint CKPT --out OUT [--data-root DIR] [--split val]

Metrics (per-class IoU, mIoU, pixel accuracy, mean class accuracy) are printed and written
to OUT/metrics.json (default PRED_DIR/metrics.json in the first mode). Without
--data-root the embedded synthetic data set is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seg.errors import SegError
from seg.evaluation import evaluate_checkpoint, evaluate_prediction_dir, format_metrics, write_metrics_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help="directory of labelIds PNGs (official result format)")
    source.add_argument("--checkpoint", type=Path, help="training checkpoint (last.pt / best.pt) to evaluate")
    parser.add_argument("--data-root", default=None, help="Cityscapes root (default: the embedded synthetic set)")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory for metrics.json (and predictions with --checkpoint)")
    parser.add_argument("--device", default="auto", help="with --checkpoint: auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)

    try:
        if args.checkpoint is not None:
            if args.out is None:
                parser.error("--checkpoint needs --out DIR for the predictions and metrics")
            metrics = evaluate_checkpoint(args.checkpoint, args.out, args.data_root, args.split, args.device)
            metrics_path = args.out / "metrics.json"
            print(f"predictions: {args.out / 'predictions'}  colour: {args.out / 'color'}")
        else:
            metrics = evaluate_prediction_dir(args.predictions, args.data_root, args.split)
            metrics_path = write_metrics_json(metrics, (args.out or args.predictions) / "metrics.json")
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    if metrics["undefined_prediction_pixels"]:
        print(f"warning: {metrics['undefined_prediction_pixels']} predicted pixels hold ids Cityscapes does "
              f"not define (counted as misses): are the predictions labelIds?", file=sys.stderr)
    print(f"metrics: {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
