"""The same end-to-end checks on every batch system: real SLURM, SGE and OAR, and the
stand-ins of PBS Pro, Torque, Moab, LSF, HTCondor and Flux (tests/deploy/jobqueue/standins).

Each system is a `BatchEnv` (how to build its cluster, its queues, how to list and
delete jobs from outside); a system's server starts only when one of its tests runs.
"""
import os
import sys
import time

import cloudpickle
import pytest

import taskcore
from taskcore import Client
from taskcore.deploy.jobqueue.system import BatchCommandError
from taskcore.testing import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])
SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(taskcore.__file__)))


def slowinc(x, delay=0.05):
    time.sleep(delay)
    return x + 1


class BatchEnv:
    """What the tests need to know about one batch system under test."""

    def __init__(self, name, cluster_class, jobs, delete, bad_message, kwargs=None,
                 bad_kwargs=None, shared_directory=None):
        self.name = name
        self.cluster_class = cluster_class
        self.jobs = jobs                  # () -> ids of jobs queued or running
        self.delete = delete              # (job_id) -> delete it as a user would
        self.bad_message = bad_message    # the batch system's own words for bad_kwargs
        self.kwargs = dict(kwargs or {})
        self.bad_kwargs = dict(bad_kwargs or {"queue": "nosuch"})
        self.shared_directory = shared_directory

    def __repr__(self):
        return self.name


def _slurm_env(request):
    from taskcore.deploy.jobqueue.slurm import SLURMCluster

    slurm = request.getfixturevalue("slurm_clean")
    return BatchEnv("slurm", SLURMCluster, jobs=lambda: [j for j, _ in slurm.jobs()],
                    delete=lambda job_id: slurm.run("scancel", job_id),
                    bad_message="Invalid partition name specified")


def _sge_env(request):
    from taskcore.deploy.jobqueue.sge import SGECluster

    sge = request.getfixturevalue("sge_clean")
    return BatchEnv("sge", SGECluster, jobs=lambda: [j for j, _ in sge.jobs()],
                    delete=lambda job_id: sge.run("qdel", job_id),
                    bad_kwargs={"queue": "nosuch.q"},
                    bad_message='job requests unknown queue "nosuch.q"')


def _oar_env(request):
    import site

    from taskcore.deploy.jobqueue.oar import OARCluster

    oar = request.getfixturevalue("oar_clean")
    home = request.getfixturevalue("oar_dir")
    # OAR refuses root's jobs: submit as the test user, from (and logging into) its home.
    # Its jobs run Debian's python3 on this checkout and this venv's packages: this venv's
    # own interpreter lives under /root, which the user cannot enter.
    path = ":".join([site.getsitepackages()[0], SRC_DIR])
    request.getfixturevalue("monkeypatch").chdir(home)
    # The jobs' TLS credentials (the default) are written as that user, into a
    # shared_directory it can write: its home, like the scheduler file.
    return BatchEnv("oar", OARCluster, jobs=lambda: [j for j, _ in oar.jobs()],
                    delete=lambda job_id: oar.run("oardel", job_id),
                    bad_message="The queue nosuch does not exist",
                    shared_directory=str(home),
                    kwargs=dict(command_prefix=["runuser", "-u", oar.user, "--"],
                                python="/usr/bin/python3", log_directory=str(home),
                                shared_directory=str(home),
                                job_script_prologue=[f"export PYTHONPATH={path}"]))


CANCEL = {"pbs": ["qdel"], "torque": ["qdel"], "moab": ["canceljob"], "lsf": ["bkill"],
          "htcondor": ["condor_rm"], "flux": ["flux", "cancel"]}
# Stand-ins (tests/deploy/jobqueue/standins): family -> (cluster class, bad input, its message).
STANDINS = {
    "pbs": ("taskcore.deploy.jobqueue.pbs:PBSCluster", {"queue": "nosuch"}, "Unknown queue"),
    "torque": ("taskcore.deploy.jobqueue.pbs:TorqueCluster", {"queue": "nosuch"},
               "Unknown queue"),
    "moab": ("taskcore.deploy.jobqueue.pbs:MoabCluster", {"queue": "nosuch"},
             "invalid class 'nosuch'"),
    "lsf": ("taskcore.deploy.jobqueue.lsf:LSFCluster", {"queue": "nosuch"},
            "nosuch: No such queue"),
    # HTCondor has no queues: a directive it refuses instead.
    "htcondor": ("taskcore.deploy.jobqueue.htcondor:HTCondorCluster",
                 {"job_extra_directives": {"request_memory": "lots"}},
                 "request_memory = lots is not a valid quantity"),
    "flux": ("taskcore.deploy.jobqueue.flux:FluxCluster", {"queue": "nosuch"},
             "'nosuch' is not a valid queue"),
}


def _standin_env(family):
    def make(request):
        from taskcore.deploy.specdata import import_dotted

        from .conftest import _standin_teardown
        from .standins import StandinBatch

        dotted, bad, message = STANDINS[family]
        server = StandinBatch(family, request.getfixturevalue("tmp_path_factory").mktemp(
            f"standin-{family}"))
        monkeypatch = request.getfixturevalue("monkeypatch")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)

        def check():
            leaked, left = _standin_teardown(server)
            assert not leaked, f"{family} stand-in jobs left by the test: {leaked} ({left})"
        request.addfinalizer(check)
        return BatchEnv(f"{family} (stand-in)", import_dotted(dotted.replace(":", ".")),
                        jobs=lambda: [j for j, _ in server.jobs()],
                        delete=lambda job_id: server.run(*CANCEL[family], job_id),
                        bad_kwargs=bad, bad_message=message)
    return make


ENVS = {"slurm": _slurm_env, "sge": _sge_env, "oar": _oar_env,
        **{family: _standin_env(family) for family in STANDINS}}


@pytest.fixture(params=sorted(ENVS))
def batch(request, tmp_path):
    env = ENVS[request.param](request)
    if env.shared_directory is None:
        env.shared_directory = str(tmp_path / "shared")
    env.kwargs.setdefault("log_directory", str(tmp_path / "logs"))
    env.kwargs.setdefault("poll_interval", 0.5)
    return env


def test_scale_compute_lose_a_job_and_close(batch):
    cls = batch.cluster_class
    with cls(cores=1, memory="1GiB", **batch.kwargs) as cluster, Client(cluster) as client:
        # TLS with temporary credentials by default (test_tls_default.py): the jobs read
        # a private copy, removed at close.
        assert cluster.scheduler_address.startswith("tls://")
        jobs_dir = cluster._credentials_dir
        assert os.path.isdir(jobs_dir)
        cluster.scale(jobs=2)
        client.wait_for_workers(2, timeout=120)
        assert len(batch.jobs()) == 2
        futures = client.map(slowinc, range(60))
        victim = cluster.jobs[0]["job_id"]
        batch.delete(victim)
        assert client.gather(futures) == list(range(1, 61))
        wait_until(lambda: (victim not in {j["job_id"] for j in cluster.jobs.values()}
                            and cluster._job_counts()["running"] == 2), 120,
                   "the deleted job's replacement")
        client.wait_for_workers(2, timeout=120)
        assert client.submit(slowinc, 1).result() == 2
        assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
    wait_until(lambda: batch.jobs() == [], 30, "no job left after close")
    assert not os.path.exists(jobs_dir)


def test_scheduler_in_its_own_job(batch):
    cls = batch.cluster_class
    with cls(cores=1, memory="1GiB", scheduler="job",
             **{"shared_directory": batch.shared_directory, **batch.kwargs}) as cluster:
        assert cluster.scheduler.job_id in batch.jobs()
        assert cluster.scheduler_address.startswith("tls://")  # the scheduler's job: TLS too
        cluster.scale(jobs=1)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            assert client.submit(slowinc, 41).result() == 42
        assert len(batch.jobs()) == 2
    wait_until(lambda: batch.jobs() == [], 30, "no job left after close")


def test_bad_input_is_refused_with_the_systems_own_message(batch):
    cls = batch.cluster_class
    start = time.monotonic()
    with pytest.raises(BatchCommandError, match=batch.bad_message):
        cls(cores=1, memory="1GiB", n_workers=1, **{**batch.kwargs, **batch.bad_kwargs})
    assert time.monotonic() - start < 30
    assert batch.jobs() == []
