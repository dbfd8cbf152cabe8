#!/usr/bin/env python
"""Write the report of a search: ranked trials, importance, curves, per-class IoU.

    python scripts/report.py                  # the newest search -> experiments/<search>/
    python scripts/report.py --search quick --out /tmp/report

Reads everything from MLflow (the search's parent run and its trial runs), writes
trials.csv/.md, PNG plots and report.md into --out (default experiments/<search name>/)
and logs them to the search's parent run under report/ (--no-log to skip).

Exit status: 0 on success, 2 for an expected error (no tracking store, no such search)
with a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", help="search name or parent run id (default: the newest search)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--out", help="output directory (default: experiments/<search name>/)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = parser.parse_args(argv)

    from seg.errors import SegError
    from seg.paths import safe_child
    from seg.tuning.report import connect, load_search, write_report

    started = time.perf_counter()
    try:
        client = connect(args.tracking_uri)
        search = load_search(client, args.search)
        out = Path(args.out) if args.out else safe_child(REPO_ROOT / "experiments", search.name, "search name")
        path = write_report(search, out, client, log_to_parent=not args.no_log)
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scored = [t for t in search.ranked() if t.has_score]
    best = f"best {scored[0].name}: {search.metric} {scored[0].score:.4f}" if scored else "no trial with a score"
    print(f"report of search '{search.name}' ({len(search.trials)} trials; {best}) in {path} "
          f"({time.perf_counter() - started:.1f} s)"
          + ("" if args.no_log else f"; logged to run {search.run_id} under report/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
