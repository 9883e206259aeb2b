"""A real SLURM for the job-queue tests (tests/deploy/jobqueue/slurm_server.py).

- `slurm` (session): one single-node SlurmServer (munged, slurmctld, slurmd, ended by
  PID at the end of the session), with os.environ["SLURM_CONF"] pointing at it for the
  session (restored at the end), so plain `sbatch`/`squeue` and anything the code under
  test starts talk to it. Skips outside CI when SLURM, munge or root are missing, and
  fails under CI=true (`taskcore.testing.require`).
- `slurm_clean` (function): the same server; after the test, any job still queued or
  running is cancelled and the test fails (a leaked job). It also waits (bounded) for
  the node to be idle before and after the test.
"""
import os

import pytest

from taskcore.testing import require

from .slurm_server import SlurmError, SlurmServer, missing_components


@pytest.fixture(scope="session")
def slurm():
    missing = missing_components()
    require(not missing, "a real SLURM needs: " + "; ".join(missing))
    server = SlurmServer()
    try:
        server.start()
    except SlurmError as e:
        pytest.fail(f"SLURM did not start: {e}", pytrace=False)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(server.conf)
    try:
        yield server
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        left = server.stop()
        if left:
            pytest.fail(f"SLURM jobs still there at shutdown, daemons killed anyway: {left}")


@pytest.fixture(autouse=True)
def _job_output_in_tmp(tmp_path, monkeypatch):
    """sbatch writes slurm-<id>.out into the submission directory: keep it out of the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def slurm_clean(slurm):
    slurm.wait_idle(30)
    yield slurm
    # A job that just ended (an srun step) stays COMPLETING for a moment: not a leak.
    slurm.wait_idle(5, raise_=False)
    leaked = slurm.cancel_all()
    left = slurm.wait_idle(30, raise_=False)
    if leaked:
        pytest.fail(f"SLURM jobs left queued or running by the test, now cancelled: {leaked}"
                    + (f" (still not gone: {left})" if left else ""))
    if left:
        pytest.fail(f"SLURM jobs did not finish after the test: {left}")
