#!/usr/bin/env bash
# Runs the test suite. Sets up .venv first; as root with apt-get available, also installs
# the Debian packages that the browser and cluster tests use (chromium, postgresql).
# SEG_SKIP_APT=1 skips that; those tests then skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${SEG_SKIP_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test: installing ${missing[*]} from Debian (SEG_SKIP_APT=1 to skip)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "test: could not install ${missing[*]}; the tests that need them will skip"
  fi
fi
exec .venv/bin/python -m pytest "$@"
