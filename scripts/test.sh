#!/usr/bin/env bash
# Set up (or reuse) .venv, install taskcore with its test extras, install and
# prepare the system components the real-component tests use (only when run
# as root), then run the full test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ".[test,dask,bench]"
if [ "$(id -u)" = 0 ]; then
    scripts/system-deps.sh
fi
exec .venv/bin/python -m pytest tests "$@"
