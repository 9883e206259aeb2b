"""A real SLURM for the job-queue tests (tests/deploy/jobqueue/slurm_server.py).

- `slurm` (session): one single-node SlurmServer (munged, slurmctld, slurmd, ended by
  PID at the end of the session), with os.environ["SLURM_CONF"] pointing at it for the
  session (restored at the end), so plain `sbatch`/`squeue` and anything the code under
  test starts talk to it. Skips outside CI when SLURM, munge or root are missing, and
  fails under CI=true (`taskcore.testing.require`).
- `slurm_clean` (function): the same server; after the test, any job still queued or
  running is cancelled and the test fails (a leaked job). It also waits (bounded) for
  the node to be idle before and after the test.
- `sge` (session): the machine's single-node Sun Grid Engine (SGEServer from
  tests/deploy/jobqueue/sge_server.py: sge_qmaster and sge_execd ended by PID at the end
  of the session), with os.environ["SGE_ROOT"]/["SGE_CELL"] set for the session
  (restored at the end). Skips outside CI when gridengine or root are missing, fails
  under CI=true.
- `sge_clean` (function): the same server; after the test, any job still queued or
  running is deleted and the test fails (a leaked job).
"""
import os

import pytest

from taskcore.testing import require

from .sge_server import SGEError, SGEServer
from .sge_server import missing_components as sge_missing_components
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
    _fail_on_leaks(slurm, settle=5)


def _fail_on_leaks(server, settle):
    """After a test: cancel what it left on `server`, and fail it if it left anything."""
    leaked, left = server.clean_up_after_test(settle)
    if leaked:
        pytest.fail(f"{server.label} jobs left queued or running by the test, now "
                    f"cancelled: {leaked}" + (f" (still not gone: {left})" if left else ""))
    if left:
        pytest.fail(f"{server.label} jobs did not finish after the test: {left}")


@pytest.fixture(scope="session")
def sge():
    missing = sge_missing_components()
    require(not missing, "a real Sun Grid Engine needs: " + "; ".join(missing))
    server = SGEServer()
    try:
        server.start()
    except SGEError as e:
        pytest.fail(f"SGE did not start: {e}", pytrace=False)
    names = ("SGE_ROOT", "SGE_CELL")
    old = {name: os.environ.get(name) for name in names}
    os.environ.update({name: server.env[name] for name in names})
    try:
        yield server
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        left = server.stop()
        if left:
            pytest.fail(f"SGE jobs still there at shutdown, daemons stopped anyway: {left}")


@pytest.fixture
def sge_clean(sge):
    sge.wait_idle(30)
    yield sge
    # A job whose script just ended stays in qstat for about a second: not a leak.
    _fail_on_leaks(sge, settle=3)


# -- OAR (tests/deploy/jobqueue/oar_server.py) ------------------------------------------
# - `oar` (session): OAR 2.5.9 on this machine (OARServer: PostgreSQL, oar-node's sshd
#   and Almighty, ended by PID at the end of the session when it started them; 8
#   resources on `localhost`). Jobs are submitted as `oar.user` (OAR refuses root), from
#   a directory in its home (`oar_dir`). Skips outside CI when OAR, PostgreSQL or root
#   are missing, and fails under CI=true.
# - `oar_clean` (function): the same server; after the test, any job not finished is
#   deleted (oardel) and the test fails (a leaked job).
# - `oar_dir` (function): a new directory in the test user's home, owned by that user,
#   removed after the test (never /tmp: OAR deletes the user's files there when its last
#   job ends).
from .oar_server import OARError, OARServer  # noqa: E402
from .oar_server import missing_components as oar_missing_components  # noqa: E402


@pytest.fixture(scope="session")
def oar():
    missing = oar_missing_components()
    require(not missing, "a real OAR needs: " + "; ".join(missing))
    server = OARServer()
    try:
        server.start()
    except OARError as e:
        pytest.fail(f"OAR did not start: {e}", pytrace=False)
    try:
        yield server
    finally:
        left = server.stop()
        if left:
            pytest.fail(f"OAR jobs still there at shutdown, daemons stopped anyway: {left}")


@pytest.fixture
def oar_clean(oar):
    oar.wait_idle(30)
    yield oar
    # A job whose command just ended is Finishing for about a second: not a leak.
    _fail_on_leaks(oar, settle=5)


@pytest.fixture
def oar_dir(oar):
    import shutil

    d = oar.make_dir(prefix="tc-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- Stand-ins of PBS Pro, Torque, Moab, LSF, HTCondor and Flux (tests/deploy/jobqueue/standins) --

STANDIN_FAMILIES = ("pbs", "torque", "moab", "lsf", "htcondor", "flux")


@pytest.fixture(params=STANDIN_FAMILIES)
def standin_batch(request, tmp_path_factory, monkeypatch):
    """A stand-in batch system (standins/server.py `StandinBatch`), one family per param,
    with os.environ (PATH first, TASKCORE_STANDIN_FAMILY, TASKCORE_STANDIN_DIR) pointing
    at it for the test. Choose families with
    `@pytest.mark.parametrize("standin_batch", ["lsf"], indirect=True)`.

    After the test: a job still queued, running or held (and not being stopped) fails the
    test as a leak; either way every job is cancelled with the family's own command and
    every shepherd and job process of the stand-in is killed, by pid."""
    from .standins import StandinBatch

    server = StandinBatch(request.param, tmp_path_factory.mktemp(f"standin-{request.param}"))
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        leaked, left = _standin_teardown(server)
    if leaked:
        pytest.fail(f"{server.family} stand-in jobs left queued/running by the test, now "
                    f"cancelled and killed: {leaked}" + (f" (not gone after cancel: {left})"
                                                         if left else ""))


def _standin_teardown(server, settle=6.0):
    import time

    # A job the test cancelled (or whose walltime expired) is on its way out: not a leak.
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and any(
            r["state"] == "running" and r.get("stopping") for r in server.records()):
        time.sleep(0.1)
    leaked = server.leaks()
    left = []
    if server.jobs():
        server.cancel_all()
        left = server.wait_idle(10, raise_=False)
    server.kill_all()
    return leaked, left
