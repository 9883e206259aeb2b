"""`python -m taskcore.demo --quick` runs to the end (as CI runs it)."""
import os
import subprocess
import sys

from taskcore.testing import import_required

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def test_demo_quick_runs_to_the_end():
    import_required("dask.dataframe", "the [dask] extra")
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "taskcore.demo", "--quick"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for phase in ("client.map", "dask.array", "dask.dataframe"):
        assert phase in out
    assert "tasks/s" in out and "Where the time went" in out
    assert "Cluster shut down" in out
    assert "Traceback" not in proc.stderr


def test_demo_help():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "taskcore.demo", "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout
