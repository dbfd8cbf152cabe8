#!/usr/bin/env bash
# One command from a fresh clone: set up, make the synthetic data set, run a real search.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/make_synthetic_cityscapes.py
exec .venv/bin/python scripts/tune.py search_spaces/quick.yaml "$@"
