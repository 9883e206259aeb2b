"""Builds the Cython hot path in src/taskcore/core, and compiles the servers' glue.

There is deliberately no pure-Python fallback for the core: if an extension
fails to compile, the install fails (docs/design.md, rules for the hot path).

The glue modules in COMPILED_GLUE are ordinary Python (they stay readable,
testable and importable as .py), and Cython compiles them as well: the message
dispatch around the state machines runs on every hop of a round trip, and
compiled it costs about a quarter less CPU per round trip (measured with
per-thread CPU times over 20,000 submit -> result round trips).

scripts/venv.sh (behind demo.sh, test.sh and build.sh) installs in two steps:
`pip install -e` with TASKCORE_NO_EXTENSIONS=1 (dependencies and the editable
package only, seconds), then `setup.py build_ext --inplace` with the persistent
build/ folder, which recompiles only the modules whose sources changed.
TASKCORE_FORCE_BUILD=1 re-cythonizes everything (build.sh --force).
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O3"]
if os.environ.get("TASKCORE_DEBUG_BUILD"):
    COMPILE_ARGS = ["-O0", "-g"]

extensions = [
    Extension(
        path[len("src/"):-len(".pyx")].replace("/", "."),
        [path],
        extra_compile_args=COMPILE_ARGS,
    )
    for path in sorted(glob.glob("src/taskcore/core/*.pyx"))
]

COMPILED_GLUE = ["scheduler", "worker", "client", "futures"]
glue = [
    Extension(f"taskcore.{name}", [f"src/taskcore/{name}.py"], extra_compile_args=COMPILE_ARGS)
    for name in COMPILED_GLUE
]

common = dict(annotate=bool(os.environ.get("TASKCORE_ANNOTATE")),
              force=bool(os.environ.get("TASKCORE_FORCE_BUILD")),
              nthreads=int(os.environ.get("TASKCORE_BUILD_JOBS", "2")))


def compiled():
    return cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        **common,
    ) + (
        # The glue keeps Python's semantics exactly: bounds-checked, wrapping
        # indexing and Python division (a malformed message must still raise).
        cythonize(glue, compiler_directives={"language_level": 3, "binding": True}, **common)
    )


# TASKCORE_NO_EXTENSIONS=1: the editable install of the package and its
# dependencies only; scripts/venv.sh then builds the extensions in place.
setup(ext_modules=[] if os.environ.get("TASKCORE_NO_EXTENSIONS") else compiled())
