"""Builds the Cython hot path in src/taskcore/core.

There is deliberately no pure-Python fallback: if an extension fails to compile,
the install fails (ARCHITECTURE.md section 3).
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

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=bool(os.environ.get("TASKCORE_ANNOTATE")),
        nthreads=int(os.environ.get("TASKCORE_BUILD_JOBS", "2")),
    ),
)
