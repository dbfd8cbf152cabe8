#!/usr/bin/env python
"""Start the MLflow UI on the project's tracking store and print where a search's runs are.

    python scripts/ui.py                      # the newest search, http://127.0.0.1:5000
    python scripts/ui.py --search quick --port 5001
    python scripts/ui.py --tracking-uri sqlite:////data/mlflow.db

Prints the search's runs page (its trials, best val_miou first: "Sort" or "Columns" adds
val_miou and the sampled params as columns), the compare page of its trials (params and
final metrics side by side; click a metric for its per-epoch curves) and its val mIoU
curves, then serves until Ctrl-C. A trial's page shows its overlays, per-class IoU table
and checkpoints under Artifacts. For an http(s) tracking URI (a server already), only
the links are printed. The UI binds 127.0.0.1: it has no authentication and serves every
artifact, so --host 0.0.0.0 exposes all of them to the network.

Exit status: 0 after Ctrl-C, 2 for an expected error (no tracking store or search, port
in use, server failing to start) with a one-line message.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///<repo>/mlflow.db)")
    parser.add_argument("--search", help="search name or parent run id (default: the newest search)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: 5000, or a free one when 5000 is taken; 0: any free port)")
    args = parser.parse_args(argv)
    # a plain kill (or a closed terminal) must stop the server too: the `with` below does that
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _interrupt)

    from seg.errors import SegError
    from seg.tuning import ui
    from seg.tuning.report import connect

    try:
        client = connect(args.tracking_uri)
        if client.tracking_uri.startswith(("http://", "https://")):  # already served: just point at it
            links = ui.search_links(client, client.tracking_uri, args.search)
            print(f"{client.tracking_uri} is an MLflow server already; search runs: {links.runs}")
            return 0
        if not ui.is_loopback(args.host):
            print(f"warning: binding {args.host}: anyone who can reach this machine can read every run and "
                  f"artifact of {client.tracking_uri}, without a password", file=sys.stderr)
        port = args.port
        if port is None:
            port = ui.DEFAULT_PORT
            if not ui.port_is_free(args.host, port):
                port = ui.free_port(args.host)
                print(f"port {ui.DEFAULT_PORT} is in use (another MLflow UI?); using {port}")
        elif port == 0:
            port = ui.free_port(args.host)
        base = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{port}"
        try:
            links = ui.search_links(client, base, args.search)
        except SegError:
            if args.search is not None:
                raise
            links = None  # an empty store: still worth a look
        print(f"starting the MLflow UI on {client.tracking_uri} ...", flush=True)
        with ui.serve(client.tracking_uri, args.host, port) as server:
            print(f"MLflow UI: {server.url}  (log: {server.log_path})")
            if links is None:
                print("no search in this store yet: run scripts/tune.py SPACE.yaml")
            else:
                print(f"search runs:     {links.runs}")
                if links.compare:
                    print(f"compare trials:  {links.compare}")
                    print(f"val_miou curves: {links.curves}")
            print("Ctrl-C to stop", flush=True)
            while server.alive():
                time.sleep(0.5)
            print(f"error: the MLflow server stopped (exit code {server.process.returncode}); see {server.log_path}",
                  file=sys.stderr)
            return 2
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped")
        return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
