"""Shared fixtures for benchmarks: peer processes and same-run baselines.

Every benchmark records its same-run baseline and the ratio in
`benchmark.extra_info`; `python benchmarks/compare.py` prints them as a table.
Targets are reported, not asserted: this machine is shared and noisy.
"""
import contextlib
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = os.environ.get("TASKCORE_BENCH_QUICK", "") not in ("", "0")


@contextlib.contextmanager
def peer(*args):
    """Start `_servers.py ARGS` in a subprocess; yield its port; kill it by PID."""
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_servers.py"), *map(str, args)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark peer {args} failed to start")
        yield int(line)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def quick():
    return QUICK
