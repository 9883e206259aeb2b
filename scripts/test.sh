#!/usr/bin/env bash
# Set up (or reuse) .venv, install taskcore with its test extras, install and
# prepare the system components the real-component tests use (only when run
# as root), run the benchmarks in quick mode with their side-by-side table,
# then the full test suite. Extra arguments go to the test run's pytest.
# TASKCORE_SKIP_BENCH=1 skips the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ".[test,dask,ssh,bench,kubernetes,cuda,ucx]"
if [ "$(id -u)" = 0 ]; then
    scripts/system-deps.sh
fi
if [ -z "${TASKCORE_SKIP_BENCH:-}" ]; then
    echo "== benchmarks (quick mode; ratios against same-run baselines) =="
    TASKCORE_BENCH_QUICK=1 .venv/bin/python -m pytest benchmarks -q -p no:cacheprovider \
        --benchmark-only --benchmark-json=.benchmarks-latest.json \
        --benchmark-columns=min,median
    .venv/bin/python benchmarks/compare.py .benchmarks-latest.json
fi
echo "== tests =="
exec .venv/bin/python -m pytest tests "$@"
