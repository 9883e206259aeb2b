#!/usr/bin/env bash
# Rebuild taskcore's compiled core in place, after editing a .pyx/.pxd in
# src/taskcore/core or a compiled glue module (COMPILED_GLUE in setup.py).
# Only the changed modules, and the ones that cimport them, recompile.
# Creates .venv first when there is none. --force recompiles every module.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --force ]; then
    export TASKCORE_FORCE_BUILD=1
elif [ -n "${1:-}" ]; then
    echo "usage: scripts/build.sh [--force]" >&2
    exit 2
fi
source scripts/venv.sh
ensure_venv "." build
