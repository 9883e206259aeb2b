"""Programs written for dask.distributed (imports switched to taskcore), each run as a
subprocess against one shared cluster, their printed output checked.

The programs are in `dask_programs/`; each takes the scheduler's address as its
argument and ends with `# expect: <line>` comments: what it must print, in order.
The cluster: a LocalCluster (2 worker processes with nannies, 2 threads each) plus one
single-thread worker with the resource BIG=1 (for `resources.py`).
"""
import os
import pathlib
import subprocess
import sys

import pytest


HERE = pathlib.Path(__file__).parent / "dask_programs"
PROGRAMS = sorted(p.name for p in HERE.glob("*.py"))


@pytest.fixture(scope="module")
def address():
    from taskcore import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as lc:
        extra = subprocess.Popen(
            [sys.executable, "-m", "taskcore.cli.worker", lc.scheduler_address,
             "--nthreads", "1", "--resources", "BIG=1", "--no-nanny"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(lc, set_as_default=False) as c:
                c.wait_for_workers(3, timeout=30)
            yield lc.scheduler_address
        finally:
            extra.terminate()
            extra.wait(10)


def expected(path):
    return [line.split("# expect:", 1)[1].strip()
            for line in path.read_text().splitlines() if line.startswith("# expect:")]


def test_programs_are_there():
    assert len(PROGRAMS) >= 15
    for name in PROGRAMS:
        assert expected(HERE / name), f"{name} has no '# expect:' lines"


@pytest.mark.parametrize("name", PROGRAMS)
def test_program(name, address, tmp_path):
    path = HERE / name
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in [str(pathlib.Path(__file__).parents[2] / "src"),
                    os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([sys.executable, str(path), address], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.splitlines() == expected(path), proc.stderr[-3000:]
