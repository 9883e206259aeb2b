"""SLURMRunner (batch mode) under a real `srun -n 4`: rank 0 scheduler, rank 1 client,
ranks 2 and 3 workers (tests/deploy/jobqueue/slurm_server.py provides the SLURM).

Exit statuses checked here: a clean run exits 0 everywhere; when the `with` body
raises, rank 1 exits 1 (the traceback) and every other rank 0; a worker rank that
dies is just a lost worker; a client rank that is killed makes the scheduler close
the cluster (rank 0 exits 1). Nothing is left behind: no job (`slurm_clean`), no
process running the script, no scheduler file.
"""
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from taskcore.deploy.jobqueue.runner import BaseRunner, SLURMRunner

HEADER = """\
import logging, os, signal, sys, threading
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from taskcore import Client
from taskcore.deploy.jobqueue.runner import SLURMRunner
"""


def _srun(slurm, tmp_path, body, ntasks=4, timeout=120, srun_args=()):
    script = tmp_path / "script.py"
    script.write_text(HEADER + textwrap.dedent(body))
    proc = subprocess.run(["srun", "-n", str(ntasks), *srun_args, sys.executable, str(script),
                           str(tmp_path / "sched.json")], cwd=tmp_path, env=slurm.env,
                          capture_output=True, text=True, timeout=timeout)
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(script) in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the script still running: {left}"
    # srun's job is COMPLETING for a moment after srun returns, then gone.
    assert slurm.wait_idle(10, raise_=False) == [], "srun's job outlived it"
    assert not (tmp_path / "sched.json").exists()
    return proc


def _task_errors(stderr):
    """{task rank: exit code, or "Killed"} from srun's "task N: ..." error lines."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("srun: error: ") and ": task" in line:
            tasks, what = line.split(": task")[1].split(": ", 1)
            for rank in tasks.lstrip("s ").split(","):
                out[int(rank)] = int(what.rsplit(" ", 1)[1]) if "exit code" in what else what
    return out


def test_srun_four_tasks_compute_and_everything_exits_zero(slurm_clean, tmp_path):
    # A file left by an earlier run at the same path is ignored, never connected to.
    (tmp_path / "sched.json").write_text('{"address": "tcp://127.0.0.1:1", "run": "7.0"}')
    proc = _srun(slurm_clean, tmp_path, """
        with SLURMRunner(scheduler_file=sys.argv[1], worker_options={"nthreads": 2}) as runner, \\
                Client(runner) as client:
            client.wait_for_workers(2, timeout=60)
            print("result", client.submit(lambda x: x + 1, 1).result())
            info = client.scheduler_info()["workers"].values()
            print("workers", sorted((w["name"], w["nthreads"]) for w in info))
            print("roles", runner.rank, runner.size, runner.role,
                  runner.scheduler_address == client.address)
        print("after the with block", flush=True)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["result 2", "workers [(2, 2), (3, 2)]",
                                        "roles 1 4 client True", "after the with block"]
    assert "Traceback" not in proc.stderr, proc.stderr


def test_an_exception_in_the_body_shuts_down_and_fails_rank_1_only(slurm_clean, tmp_path):
    proc = _srun(slurm_clean, tmp_path, """
        with SLURMRunner(scheduler_file=sys.argv[1]) as runner, Client(runner) as client:
            client.wait_for_workers(2, timeout=60)
            assert client.submit(sum, [1, 2]).result() == 3
            raise ValueError("boom in the body")
        print("not reached")
        """)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "ValueError: boom in the body" in proc.stderr
    assert _task_errors(proc.stderr) == {1: 1}, proc.stderr


def test_a_worker_rank_that_dies_is_only_a_lost_worker(slurm_clean, tmp_path):
    proc = _srun(slurm_clean, tmp_path, """
        import time
        with SLURMRunner(scheduler_file=sys.argv[1]) as runner, Client(runner) as client:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info()["workers"]
            victim = next(a for a, w in workers.items() if w["name"] == 3)
            # The rank's process ends shortly after answering.
            client.run(lambda: threading.Timer(0.2, os._exit, (7,)).start(), workers=[victim])
            while len(client.scheduler_info()["workers"]) != 1:
                time.sleep(0.05)
            print("result", sum(client.gather(client.map(lambda x: x * 2, range(10)))))
        """)
    assert proc.stdout.splitlines() == ["result 90"], proc.stderr
    assert _task_errors(proc.stderr) == {3: 7}, proc.stderr
    assert proc.returncode == 7


def test_a_killed_client_rank_makes_the_scheduler_close_the_cluster(slurm_clean, tmp_path):
    proc = _srun(slurm_clean, tmp_path, """
        logging.getLogger("taskcore.worker").setLevel(logging.INFO)
        with SLURMRunner(scheduler_file=sys.argv[1]) as runner, Client(runner) as client:
            client.wait_for_workers(2, timeout=60)
            print("connected", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no __exit__, no shutdown request
        """, timeout=60, srun_args=["--kill-on-bad-exit=0"])  # srun must not end the step for us
    assert proc.stdout.splitlines() == ["connected"]
    assert "went away without shutting the cluster down" in proc.stderr, proc.stderr
    assert _task_errors(proc.stderr) == {0: 1, 1: "Killed"}, proc.stderr
    # The workers were closed by the scheduler, not by srun ending the step.
    assert proc.stderr.count(": scheduler-close") == 2, proc.stderr
    assert proc.returncode != 0


def test_srun_with_too_few_tasks_fails_clearly(slurm_clean, tmp_path):
    proc = _srun(slurm_clean, tmp_path, """
        with SLURMRunner(scheduler_file=sys.argv[1]) as runner:
            pass
        """, ntasks=2, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("needs at least 3 tasks (scheduler, client, one worker or more); "
                             "this launch has 2") == 2, proc.stderr


# -- without SLURM ---------------------------------------------------------------------------

def _no_slurm(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") and name != "SLURM_CONF":
            monkeypatch.delenv(name)


def test_not_under_slurm_is_a_clear_error(monkeypatch):
    _no_slurm(monkeypatch)
    with pytest.raises(RuntimeError, match=r"SLURM_PROCID is not set: not running under SLURM; "
                                           r"start the program with `srun -n N"):
        SLURMRunner()


def test_the_batch_script_itself_is_not_a_task(monkeypatch):
    _no_slurm(monkeypatch)  # what an `sbatch -n 4` batch script sees: no step id
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="SLURM_STEP_ID is not set: this is the batch script "
                                           "of job 42, not a task of a job step"):
        SLURMRunner()


def test_roles_defaults_and_options(monkeypatch, tmp_path):
    _no_slurm(monkeypatch)
    monkeypatch.chdir(tmp_path)
    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3", "SLURM_NTASKS": "8",
           "SLURM_STEP_NUM_TASKS": "5", "SLURM_CPUS_PER_TASK": "4"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    roles = []
    for rank in range(5):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        r = SLURMRunner()
        roles.append(r.role)
    assert roles == ["scheduler", "client", "worker", "worker", "worker"]
    assert (r.size, r.run_id, r.default_nthreads()) == (5, ":42.3::", 4)
    assert r.scheduler_file == str(tmp_path / "scheduler-42.json")
    assert "rank 4/5 (worker)" in repr(r)
    with pytest.raises(TypeError, match="sets the scheduler file and the worker names"):
        SLURMRunner(worker_options={"name": "x"})

    class Two(BaseRunner):
        def get_rank(self):
            return 0

        def get_size(self):
            return 2

    with pytest.raises(RuntimeError, match="needs at least 3 tasks"):
        Two()
