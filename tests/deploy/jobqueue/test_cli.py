"""core-jobqueue: the job script it prints, its option errors, and a SLURM cluster from the
command line against a real SLURM (tests/deploy/jobqueue/slurm_server.py)."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest

CLI = os.path.join(os.path.dirname(sys.executable), "core-jobqueue")
CLUSTERS = os.path.join(os.path.dirname(sys.executable), "core-clusters")
# Where `script` shows a default (TLS) cluster's jobs reading their credentials.
TLS = os.path.expanduser("~/.cache/taskcore/jobqueue/tls/CLUSTER")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No site config file: the defaults are the ones under test."""
    monkeypatch.delenv("TASKCORE_JOBQUEUE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    return dict(os.environ)


def cli(*args, env=None, timeout=30):
    assert os.path.exists(CLI), f"{CLI} missing: reinstall the project (scripts/venv.sh)"
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _server_processes(address):
    port = address.rsplit(":", 1)[1]
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "taskcore.cli" in " ".join(p.info["cmdline"] or [])
            and f":{port}" in " ".join(p.info["cmdline"] or [])]


# -- core-jobqueue script ------------------------------------------------------------------------

def test_script_prints_the_worker_job_script(env):
    out = cli("script", "slurm", "--cores", "2", "--memory", "2GiB", "--queue", "bigmem",
              "--account", "proj", "--walltime", "01:00:00", "--job-name", "tc",
              "--job-extra-directive=--exclusive", "--job-extra-directive", "#SBATCH --gres=x",
              "--job-script-prologue", "module load python", "--death-timeout", "60s", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout == "\n".join([
        "#!/usr/bin/env bash",
        "",
        "#SBATCH -J tc",
        "#SBATCH -p bigmem",
        "#SBATCH -A proj",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=2048M",
        "#SBATCH -t 01:00:00",
        "#SBATCH --exclusive",
        "#SBATCH --gres=x",
        "",
        "module load python",
        f"exec {sys.executable} -m taskcore.cli.worker tls://SCHEDULER:8786 --nanny "
        "--nthreads 2 --memory-limit 2147483648 --name 0 --death-timeout 60.0 "
        f"--lifetime 3420.0 --lifetime-stagger 45.0 --log-level info --tls-ca-file {TLS}/ca.pem "
        f"--tls-cert {TLS}/cert.pem --tls-key {TLS}/key.pem",
    ]) + "\n"
    # A plain tcp:// cluster's script.
    out = cli("script", "slurm", "--cores", "1", "--memory", "1GiB", "--no-tls", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == (
        f"exec {sys.executable} -m taskcore.cli.worker tcp://SCHEDULER:8786 --nanny "
        "--nthreads 1 --memory-limit 1073741824 --name 0 --log-level info")


def test_script_processes_skips_logs_and_address(env, tmp_path):
    out = cli("script", "slurm", "--cores", "4", "--memory", "8GiB", "--processes", "2",
              "--job-directives-skip=--mem", "--job-directives-skip=-n 1",
              "--log-directory", str(tmp_path), "--no-nanny", "--worker-extra-arg=--resources",
              "--worker-extra-arg", "GPU=1", "--scheduler-address", "tls://10.0.0.5:8786",
              env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2:6] == ["#SBATCH -J taskcore-worker", "#SBATCH --cpus-per-task=4",
                          f"#SBATCH -o {tmp_path}/taskcore-worker-%j.out", ""]
    assert lines[-1].endswith(
        "-m taskcore.cli.worker tls://10.0.0.5:8786 --no-nanny --nthreads 2 --nworkers 2 "
        f"--memory-limit 4294967296 --name 0 --log-level info --tls-ca-file {TLS}/ca.pem "
        f"--tls-cert {TLS}/cert.pem --tls-key {TLS}/key.pem --resources GPU=1")


def test_script_applies_the_site_config(env, tmp_path):
    config = tmp_path / "jobqueue.toml"
    config.write_text('[slurm]\nqueue = "site-q"\naccount = "site-acct"\ncores = 3\n'
                      'max_jobs_queued = 4\n'
                      'memory = "3GiB"\n')
    env["TASKCORE_JOBQUEUE_CONFIG"] = str(config)
    out = cli("script", "slurm", "--account", "mine", env=env)  # the command line wins
    assert out.returncode == 0, out.stderr
    assert "#SBATCH -p site-q\n#SBATCH -A mine\n" in out.stdout
    assert "--cpus-per-task=3" in out.stdout and "--mem=3072M" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["slurm", "--cores", "1", "--memory", "1GiB", "--bogus"],
     "unrecognized arguments: --bogus"),
    (["nosuch", "--cores", "1"], "invalid choice: 'nosuch' (choose from 'slurm', 'sge', "
                                 "'oar', 'pbs', 'torque', 'moab', 'lsf', 'htcondor', 'flux', "
                                 "'script')"),
    (["script", "nosuch"], "invalid choice: 'nosuch' (choose from 'slurm', 'sge', 'oar', "
                           "'pbs', 'torque', 'moab', 'lsf', 'htcondor', 'flux')"),
    (["script", "slurm", "--cores", "1"],
     "--cores and --memory are needed (or cores and memory in the [slurm] table of"),
    (["script", "slurm", "--cores", "1", "--memory", "lots"], "argument --memory: invalid"),
    (["script", "slurm", "--cores", "1", "--memory", "1GiB", "--job-directives-skip", "--mem"],
     "expected one argument (a value that starts with '-' goes after '=', like "
     "--job-directives-skip=--mem)"),
    (["script", "slurm", "--cores", "1", "--memory", "1GiB", "--walltime", "soon"],
     "argument --walltime: invalid walltime 'soon'"),
    (["script", "slurm", "--cores", "1", "--memory", "1GiB", "--processes", "2"],
     "processes=2 > cores=1"),
    (["slurm", "--cores", "1", "--memory", "1GiB", "--detach"],
     "--detach needs --scheduler-in-job"),
    (["slurm", "--cores", "1", "--memory", "1GiB", "--jobs", "-1"], "expected a number >= 0"),
    (["slurm", "--cores", "1", "--memory", "1GiB", "--name", "no/slash"], "invalid cluster name"),
    ([], "the following arguments are required"),
])
def test_bad_options_exit_2_with_one_line(env, args, message):
    out = cli(*args, env=env)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("core-jobqueue"), out.stderr
    assert message in lines[0], lines[0]
    assert out.stdout == ""


# -- core-jobqueue slurm -------------------------------------------------------------------------

class Proc:
    """core-jobqueue in the background; its JSON ready line read from stdout."""

    def __init__(self, *args, env, cwd):
        # cwd: where sbatch puts the jobs' slurm-<id>.out files (no --log-directory).
        self.p = subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env, cwd=cwd)

    def ready(self, timeout=60):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise AssertionError(f"no ready line in {timeout} s")
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"exited with {self.p.wait()} before ready:\n{self.stderr()}")
        return json.loads(line)

    def stderr(self):
        return self.p.stderr.read().decode(errors="replace") if self.p.poll() is not None else ""

    def kill(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)  # close the cluster: cancels its jobs
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def test_slurm_cluster_ready_compute_and_ctrl_c_cancels_every_job(slurm_clean, env, tmp_path):
    slurm = slurm_clean
    proc = Proc("slurm", "--cores", "1", "--memory", "1GiB", "--jobs", "2",
                "--poll-interval", "0.5", env=slurm.env, cwd=tmp_path)
    try:
        msg = proc.ready()
        assert {k: msg[k] for k in ("event", "role", "system", "jobs", "detached")} == \
            {"event": "ready", "role": "cluster", "system": "slurm", "jobs": 2,
             "detached": False}
        assert msg["pid"] == proc.p.pid and msg["name"]
        address = msg["address"]
        assert address.startswith("tls://")  # temporary TLS credentials by default
        local = os.path.dirname(msg["security"]["key_file"])
        assert len(slurm.jobs()) == 2
        from taskcore import Client, Security

        with Client(address, security=Security(**msg["security"])) as client:
            client.wait_for_workers(2, timeout=60)
            assert sorted(w["name"] for w in client.scheduler_info()["workers"].values()) == \
                ["0", "1"]
            assert client.submit(sum, [1, 2, 3]).result() == 6
            assert sum(client.gather(client.map(abs, range(-10, 0)))) == 55
        proc.p.send_signal(signal.SIGINT)
        assert proc.p.wait(30) == 0
        err = proc.stderr()
        assert f"scheduler at {address}, 2 slurm job(s) requested; Ctrl-C to stop" in err, err
        assert "TLS credentials for clients" in err, err
        assert "Traceback" not in err, err
        assert proc.p.stdout.read() == b""  # one line on stdout, nothing else
        assert slurm.jobs() == []  # closed means gone from the queue
        assert not os.path.exists(local)  # the credentials went with the cluster
        _until(lambda: _server_processes(address) == [], 10, "the workers to exit")
    finally:
        proc.kill()


def test_slurm_detach_leaves_the_cluster_running_until_closed(slurm_clean, env, tmp_path):
    slurm = slurm_clean
    proc = Proc("slurm", "--cores", "1", "--memory", "1GiB", "--jobs", "1",
                "--scheduler-in-job", "--detach", "--shared-directory", str(tmp_path),
                "--name", "jq-cli", "--poll-interval", "0.5", env=slurm.env, cwd=tmp_path)
    try:
        msg = proc.ready()
        assert (msg["name"], msg["jobs"], msg["detached"]) == ("jq-cli", 1, True)
        assert proc.p.wait(30) == 0
        assert "cluster jq-cli left running" in proc.stderr()
        assert len(slurm.jobs()) == 2  # the scheduler's job and the worker's
        from taskcore import Client

        with Client(msg["address"]) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.submit(sum, [2, 3]).result() == 5
        out = subprocess.run([CLUSTERS, "close", "jq-cli"], capture_output=True, text=True,
                             env=slurm.env, cwd=tmp_path, timeout=60)
        assert out.returncode == 0, out.stderr
        _until(lambda: slurm.jobs() == [], 30, "every job to be gone")
    finally:
        proc.kill()
        if slurm.jobs():
            subprocess.run([CLUSTERS, "close", "jq-cli"], capture_output=True, env=slurm.env,
                           cwd=tmp_path, timeout=60)
