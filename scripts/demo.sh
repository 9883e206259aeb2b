#!/usr/bin/env bash
# Set up (or reuse) .venv, install taskcore with dask, and run the demo on a LocalCluster.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ".[dask]"
exec .venv/bin/python -m taskcore.demo "$@"
