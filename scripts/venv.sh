# Sourced by demo.sh, test.sh and build.sh: create or reuse .venv, install the
# project into it and build its compiled core in place.
#
# A run with nothing changed does no pip install and no compile: .venv/.taskcore-stamp
# records hashes of what the dependencies come from (pyproject.toml, setup.py), of
# the build settings (setup.py, TASKCORE_DEBUG_BUILD), of the compiled sources
# (.pyx, .pxd and the glue modules in setup.py's COMPILED_GLUE), and the extras
# installed so far. Extras accumulate: demo.sh after test.sh installs nothing.
# Each run still checks that every compiled module imports from its .so and is
# not older than its source (the check tests/conftest.py makes).
#
# Otherwise, in two steps:
# - dependencies: `pip install -e` without the extensions (TASKCORE_NO_EXTENSIONS=1,
#   see setup.py), seconds once the wheels are cached;
# - compiled core: `setup.py build_ext --inplace` with the persistent build/ folder,
#   so only the changed modules (and the ones that cimport them) recompile. The
#   .so files land next to their sources in src/, which the editable install puts
#   on sys.path. The full compiler output goes to build/taskcore-build.log.

_taskcore_glue() {
    "$1" -c 'import ast
for n in ast.parse(open("setup.py").read()).body:
    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "COMPILED_GLUE":
        print(" ".join("src/taskcore/%s.py" % g for g in ast.literal_eval(n.value)))'
}

_taskcore_pip() {
    local log=.venv/.taskcore-pip.log
    if .venv/bin/python -m pip install -q "$@" > "$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" || true
    else
        grep -v "^WARNING: Location" "$log" >&2
        echo "pip install $* failed" >&2
        exit 1
    fi
}

_taskcore_hash() {
    sha256sum "$@" | sha256sum | cut -c1-16
}

# Prints nothing when every compiled module imports from its .so and none is older
# than its source (the check tests/conftest.py makes), else what is wrong.
_taskcore_check_core() {
    .venv/bin/python - "$@" 2>&1 <<'EOF'
import glob, importlib, importlib.machinery, sys
sources = sys.argv[1:]
missing = [p for p in sources if p.endswith((".pyx", ".py"))
           and not any(glob.glob(p.rsplit(".", 1)[0] + s) for s in importlib.machinery.EXTENSION_SUFFIXES)]
if missing:
    print("no compiled module for " + ", ".join(missing))
    sys.exit()
for p in sources:
    if p.endswith((".pyx", ".py")):
        name = p[len("src/"):].rsplit(".", 1)[0].replace("/", ".")
        try:
            mod = importlib.import_module(name)
            assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), mod.__file__
        except Exception as e:
            print("%s does not import (%s: %s)" % (name, type(e).__name__, e))
            sys.exit()
from taskcore.testing import stale_extensions
stale = stale_extensions()
if stale:
    print("compiled modules older than their sources: " + ", ".join(stale))
EOF
}

# ensure_venv SPEC [build]: SPEC is ".[extra,...]"; "build" runs the (incremental)
# compile step even when the stamp says nothing changed (scripts/build.sh).
# TASKCORE_FORCE_BUILD=1 recompiles every module.
ensure_venv() {
    local spec="$1" always_build="${2:-}"
    local py="${PYTHON:-python3}"
    local stamp=.venv/.taskcore-stamp
    local jobs="${TASKCORE_BUILD_JOBS:-2}"
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with $("$py" --version 2>&1)"
        "$py" -m venv .venv
        rm -f "$stamp"
    fi

    local sources glue
    glue=$(_taskcore_glue .venv/bin/python) || { echo "cannot read COMPILED_GLUE from setup.py" >&2; exit 1; }
    sources="$(ls src/taskcore/core/*.pyx src/taskcore/core/*.pxd 2>/dev/null) $glue"
    local deps_cfg build_cfg src_hash
    deps_cfg=$( { _taskcore_hash pyproject.toml setup.py; .venv/bin/python --version; } \
                | sha256sum | cut -c1-16)
    build_cfg=$( { _taskcore_hash setup.py; .venv/bin/python --version
                   echo "debug=${TASKCORE_DEBUG_BUILD:-}"; } | sha256sum | cut -c1-16)
    src_hash=$(_taskcore_hash $sources)

    local old_deps="" old_extras="" old_build="" old_src=""
    if [ -f "$stamp" ]; then
        old_deps=$(sed -n 's/^deps=//p' "$stamp")
        old_extras=$(sed -n 's/^extras=//p' "$stamp")
        old_build=$(sed -n 's/^build=//p' "$stamp")
        old_src=$(sed -n 's/^sources=//p' "$stamp")
    fi
    local want extras missing_extras="" e
    want=$(echo "$spec" | sed -n 's/^[^[]*\[\(.*\)\]$/\1/p' | tr ',' ' ')
    for e in $want; do
        case " $old_extras " in *" $e "*) ;; *) missing_extras="$missing_extras $e" ;; esac
    done
    extras=$(echo $old_extras $want | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/ $//')

    # Dependencies: a new .venv, a changed pyproject.toml/setup.py/Python, or new extras.
    local deps_why=""
    if [ -z "$old_deps" ]; then
        deps_why="new .venv"
    elif [ "$old_deps" != "$deps_cfg" ]; then
        deps_why="pyproject.toml or setup.py changed"
    elif [ -n "$missing_extras" ]; then
        deps_why="extras not installed yet:$missing_extras"
    fi
    if [ -n "$deps_why" ]; then
        echo "installing taskcore's dependencies (extras: ${extras:-none}) into .venv: $deps_why"
        _taskcore_pip --upgrade pip setuptools wheel "Cython>=3"
        local target="${spec%%[*}"
        [ -z "$extras" ] || target="$target[$(echo $extras | tr ' ' ',')]"
        TASKCORE_NO_EXTENSIONS=1 _taskcore_pip --no-build-isolation -e "$target"
        .venv/bin/python -c "import taskcore" 2>/dev/null \
            || { echo "installing taskcore into .venv failed (see pip's output above)" >&2; exit 1; }
        # Recorded now, so a failed compile does not reinstall the dependencies.
        printf 'deps=%s\nextras=%s\nbuild=%s\nsources=%s\n' \
            "$deps_cfg" "$extras" "$old_build" "$old_src" > "$stamp"
    fi

    # Compiled core: changed build settings, changed sources, or a module that
    # does not import from a current .so.
    local build_why="" force=""
    if [ -n "${TASKCORE_FORCE_BUILD:-}" ]; then
        build_why="TASKCORE_FORCE_BUILD is set"; force=1
    elif [ -z "$old_build" ]; then
        build_why="first build in this .venv"
    elif [ "$old_build" != "$build_cfg" ]; then
        build_why="setup.py or TASKCORE_DEBUG_BUILD changed"; force=1
    elif [ "$old_src" != "$src_hash" ]; then
        build_why="sources changed"
    fi
    if [ -z "$build_why" ]; then
        build_why=$(_taskcore_check_core $sources)
    fi
    if [ -z "$build_why" ] && [ -z "$always_build" ]; then
        return 0
    fi

    if [ -n "$build_why" ]; then
        local n_pyx n_glue
        n_pyx=$(ls src/taskcore/core/*.pyx | wc -l)
        n_glue=$(echo $glue | wc -w)
        if [ -n "$force" ] || [ ! -d build ] || ! ls src/taskcore/core/*.so >/dev/null 2>&1; then
            echo "building taskcore's compiled core ($n_pyx Cython modules + $n_glue compiled glue" \
                 "modules; a full build takes a few minutes on 2 cores): $build_why"
        else
            echo "rebuilding taskcore's compiled core (only what changed, and what cimports it): $build_why"
        fi
    else
        echo "rebuilding taskcore's compiled core where sources changed (build/ keeps the rest)"
    fi
    mkdir -p build
    local log=build/taskcore-build.log t0=$SECONDS rc=0
    rm -f build/taskcore-build.rc
    # Cython's "[i/n] Cythonizing X" and "Compiling X because it depends on Y", and
    # setuptools' "building 'module' extension" (as "compiling module (C)") go
    # through (two Cython workers can print on one line: split it); compiler
    # commands and warnings stay in the log.
    ( rc=0
      TASKCORE_FORCE_BUILD="${force:+1}" .venv/bin/python -u setup.py build_ext --inplace \
          -j "$jobs" ${force:+--force} 2>&1 || rc=$?
      echo "$rc" > build/taskcore-build.rc ) \
        | tee "$log" \
        | { grep --line-buffered -E "^(Compiling .* because it depends|\[[0-9]+/[0-9]+\] Cythonizing|building '.*' extension)" \
            | sed -u -e "s/^building '\(.*\)' extension/compiling \1 (C)/" -e 's/^/  /' \
                  -e 's/\([^ ]\)\(\[[0-9]*\/[0-9]*\] Cythonizing\)/\1\n  \2/g' || true; }
    rc=$(cat build/taskcore-build.rc 2>/dev/null || echo 1)
    if [ "$rc" != 0 ]; then
        echo "building taskcore's compiled core failed; the errors (full log: $log):" >&2
        awk '/^Error compiling Cython file/ { cy = 1; dashes = 0 }
             cy { print; if (/^-----/ && ++dashes == 2) { getline; print; cy = 0 }; next }
             / error: |^error: / { print; after = 2; next }
             after-- > 0 { print }' "$log" | head -n 60 > build/taskcore-build.errors
        if [ -s build/taskcore-build.errors ]; then cat build/taskcore-build.errors >&2; else tail -n 30 "$log" >&2; fi
        [ ! -f "$stamp" ] || sed -i 's/^sources=.*/sources=/' "$stamp"   # rebuild next time
        exit 1
    fi
    local why
    why=$(_taskcore_check_core $sources)
    if [ -n "$why" ]; then
        echo "taskcore's compiled core built but does not import: $why (log: $log)" >&2
        exit 1
    fi
    echo "taskcore's compiled core is up to date ($((SECONDS - t0)) s)"
    printf 'deps=%s\nextras=%s\nbuild=%s\nsources=%s\n' "$deps_cfg" "$extras" "$build_cfg" "$src_hash" > "$stamp"
}
