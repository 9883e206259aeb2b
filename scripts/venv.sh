# Sourced by demo.sh and test.sh: create or reuse .venv and install the project into it.
ensure_venv() {
    local spec="$1"
    local py="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        "$py" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel "Cython>=3" 2>&1 | grep -v "^WARNING: Location" || true
    # Editable install compiles the Cython core in place (no build isolation, so
    # the Cython installed above is used and repeated runs are quick).
    .venv/bin/python -m pip install -q --no-build-isolation -e "$spec" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import taskcore.core.wire, taskcore.core.serialize, taskcore.core.protocol" \
        || { echo "taskcore's compiled core failed to build or import" >&2; exit 1; }
}
