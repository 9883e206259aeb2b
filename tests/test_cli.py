"""core-scheduler and core-worker: option parsing, errors, and end to end runs."""
import asyncio
import json
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest

from taskcore.cli import scheduler as cli_scheduler
from taskcore.cli import worker as cli_worker
from taskcore.cli.common import wait_for_scheduler_file
from taskcore.testing import run
from taskcore.utils import cpu_count, write_json_atomic

SCHED = [sys.executable, "-m", "taskcore.cli.scheduler"]
WORKER = [sys.executable, "-m", "taskcore.cli.worker"]


def run_cli(args, timeout=30):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Bad options: non-zero exit, one clear line, nothing started
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (WORKER + ["tcp://127.0.0.1:8786", "--memory-limit", "lots"], ["--memory-limit", "byte size"]),
    (WORKER + ["tcp://127.0.0.1:8786", "--resources", "GPU"], ["--resources", "NAME=AMOUNT"]),
    (WORKER + ["tcp://127.0.0.1:8786", "--resources", "GPU=many"], ["amount", "GPU"]),
    (WORKER + ["tcp://127.0.0.1"], ["invalid address", "port"]),
    (WORKER + ["tcp://127.0.0.1:0"], ["invalid address"]),
    (WORKER + ["bogus://x:1:2:3"], ["invalid address"]),
    (WORKER + [], ["ADDRESS", "--scheduler-file"]),
    (WORKER + ["tcp://127.0.0.1:8786", "--nthreads", "0"], ["positive"]),
    (WORKER + ["tcp://127.0.0.1:8786", "--lifetime", "soon"], ["duration"]),
    (WORKER + ["tcp://127.0.0.1:8786", "--tls-cert", "/x"], ["--tls-ca-file", "--tls-key"]),
    (WORKER + ["tls://127.0.0.1:8786"], ["tls"]),
    (WORKER + ["tcp://127.0.0.1:8786", "--interface", "nosuchif0"], ["nosuchif0", "not found"]),
    (WORKER + ["tcp://127.0.0.1:8786", "--log-level", "loud"], ["log level"]),
    (SCHED + ["--port", "99999"], ["out of range"]),
    (SCHED + ["--idle-timeout", "whenever"], ["duration"]),
    (SCHED + ["--allowed-failures", "-1"], ["--allowed-failures", ">= 0"]),
    (SCHED + ["--scheduler-options", '{"bogus": 1}'], ["unknown options", "bogus"]),
    (SCHED + ["--allowed-failures", "few"], ["--allowed-failures", "invalid int"]),
    (SCHED + ["--protocol", "carrier-pigeon"], ["invalid choice"]),
    (SCHED + ["--dashboard-address", "host:http"], ["--dashboard-address", "[HOST]:PORT"]),
    (SCHED + ["--dashboard-address", ":70000"], ["--dashboard-address"]),
    (SCHED + ["--dashboard-prefix", "/a?b"], ["--dashboard-prefix", "plain path"]),
    (SCHED + ["--tls-ca-file", "/no/such/ca.pem", "--tls-cert", "/x", "--tls-key", "/y"],
     ["does not exist"]),
])
def test_bad_options_exit_nonzero_with_one_line(args, words):
    out = run_cli(args)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(("core-worker: error:", "core-scheduler: error:"))
    for w in words:
        assert w in lines[0], lines[0]
    assert out.stdout == ""


def test_help_works():
    for prog in (SCHED, WORKER):
        out = run_cli(prog + ["--help"])
        assert out.returncode == 0 and "--log-level" in out.stdout


def test_worker_defaults():
    a = cli_worker.parse_args(["tcp://10.0.0.1:8786"])
    assert a.address == "tcp://10.0.0.1:8786"
    assert a.nanny is True and a.nworkers == 1 and a.nthreads == cpu_count()
    assert a.memory_limit == "auto" and a.protocol == "tcp" and a.security is None
    assert cli_worker.parse_args(["10.0.0.1:8786"]).address == "tcp://10.0.0.1:8786"


def test_worker_options():
    a = cli_worker.parse_args(["tcp://h:1", "--no-nanny", "--nworkers", "3", "--nthreads", "2",
                               "--memory-limit", "4GiB", "--resources", "GPU=2,MEM=10e9",
                               "--name", "w", "--lifetime", "1h", "--lifetime-stagger", "5m",
                               "--death-timeout", "30s", "--local-directory", "/tmp/x"])
    assert a.nanny is False and a.nworkers == 3 and a.nthreads == 2
    assert a.memory_limit == 4 * 2**30
    assert a.resources == {"GPU": 2.0, "MEM": 1e10}
    assert (a.lifetime, a.lifetime_stagger, a.death_timeout) == (3600.0, 300.0, 30.0)
    assert cli_worker._names(a) == ["w-0", "w-1", "w-2"]
    auto = cli_worker.parse_args(["tcp://h:1", "--nworkers", "auto", "--nthreads", "1"])
    assert auto.nworkers == cpu_count()
    assert cli_worker.parse_args(["tcp://h:1", "--memory-limit", "0.5"]).memory_limit == 0.5
    assert cli_worker._memory_bytes(cli_worker.parse_args(["tcp://h:1", "--memory-limit", "0"])) \
        is None


def test_tls_options_make_a_security_object():
    from taskcore.security import Security

    sec = Security.temporary()
    flags = ["--tls-ca-file", sec.ca_file, "--tls-cert", sec.cert_file, "--tls-key", sec.key_file]
    a = cli_worker.parse_args(["tls://h:1"] + flags)
    assert a.protocol == "tls" and a.security.cert_file == sec.cert_file
    s = cli_scheduler.parse_args(flags)
    assert s.protocol == "tls" and s.security.enabled


def test_scheduler_defaults():
    a = cli_scheduler.parse_args([])
    assert a.port == 8786 and a.host == "127.0.0.1" and a.protocol == "tcp"
    assert a.scheduler_file is None and a.idle_timeout is None
    assert a.allowed_failures is None            # the Scheduler's default (2)
    assert cli_scheduler.parse_args(["--allowed-failures", "0"]).allowed_failures == 0
    # The dashboard: :8787 on the scheduler's host unless told otherwise.
    assert a.dashboard == "127.0.0.1:8787" and a.dashboard_prefix == ""
    assert cli_scheduler.parse_args(["--host", "0.0.0.0"]).dashboard == "0.0.0.0:8787"
    assert cli_scheduler.parse_args(["--dashboard-address", "9000"]).dashboard == \
        "127.0.0.1:9000"
    assert cli_scheduler.parse_args(["--dashboard-address", "[::1]:0"]).dashboard == "[::1]:0"
    assert cli_scheduler.parse_args(["--no-dashboard"]).dashboard is None


def test_wait_for_scheduler_file(tmp_path):
    path = str(tmp_path / "s.json")

    async def main():
        with pytest.raises(TimeoutError):
            await wait_for_scheduler_file(path, timeout=0.1)
        loop = asyncio.get_running_loop()
        (tmp_path / "s.json").write_text("")  # an empty file is not ready yet
        loop.call_later(0.1, write_json_atomic, path, {"address": "tcp://x:1"})
        assert await wait_for_scheduler_file(path, timeout=5) == "tcp://x:1"
    run(main())


def test_worker_waiting_for_a_scheduler_file_exits_0_on_sigterm(tmp_path):
    proc = subprocess.Popen(WORKER + ["--scheduler-file", str(tmp_path / "never.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()


def test_scheduler_file_timeout_is_death_timeout(tmp_path):
    out = run_cli(WORKER + ["--scheduler-file", str(tmp_path / "never.json"),
                            "--death-timeout", "0.3"])
    assert out.returncode == 1
    assert "did not appear" in out.stderr


# ---------------------------------------------------------------------------------------------
# End to end with the real servers
# ---------------------------------------------------------------------------------------------

class Proc:
    """A CLI process whose stdout ready line we read without scraping logs."""

    def __init__(self, args):
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)

    def ready(self, timeout=60):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            self.p.kill()
            raise AssertionError(f"no ready line in {timeout} s; stderr:\n{self.stderr()}")
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"exited with {self.p.wait()} before ready:\n{self.stderr()}")
        msg = json.loads(line)
        assert msg["event"] == "ready"
        return msg

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise

    def stderr(self):
        try:
            return self.p.stderr.read() if self.p.poll() is not None else "(running)"
        except Exception:
            return ""

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.usefixtures("real_servers")
def test_scheduler_exits_0_on_signals(sig, tmp_path):
    sfile = tmp_path / "s.json"
    sched = Proc(SCHED + ["--port", "0", "--scheduler-file", str(sfile)])
    try:
        msg = sched.ready()
        assert set(msg) == {"event", "role", "address", "pid", "dashboard_host",
                            "dashboard_port", "dashboard_prefix"}
        assert msg["dashboard_port"] > 0 and msg["dashboard_prefix"] == ""
        assert json.loads(sfile.read_text())["address"] == msg["address"]
        assert sched.stop(sig) == 0
        assert not sfile.exists()
        assert "received" in sched.stderr()  # logs go to stderr, never stdout
        assert sched.p.stdout.read() == ""
    finally:
        sched.kill()


@pytest.mark.usefixtures("real_servers")
def test_scheduler_idle_timeout_exits_0():
    sched = Proc(SCHED + ["--port", "0", "--idle-timeout", "0.5"])
    try:
        sched.ready()
        assert sched.p.wait(30) == 0
    finally:
        sched.kill()


@pytest.mark.usefixtures("real_servers")
def test_scheduler_port_in_use_exits_1():
    first = Proc(SCHED + ["--port", "0"])
    try:
        port = first.ready()["address"].rsplit(":", 1)[1]
        out = run_cli(SCHED + ["--port", port])
        assert out.returncode == 1
        assert "could not start the scheduler" in out.stderr
        assert out.stdout == ""
    finally:
        first.stop()
        first.kill()


@pytest.mark.usefixtures("real_servers")
def test_end_to_end_scheduler_and_nanny_worker(tmp_path):
    sfile = tmp_path / "scheduler.json"
    sched = Proc(SCHED + ["--port", "0", "--scheduler-file", str(sfile), "--log-level", "info"])
    worker = None
    try:
        s = sched.ready()
        assert s["role"] == "scheduler" and s["pid"] == sched.p.pid
        assert s["address"].startswith("tcp://127.0.0.1:") and not s["address"].endswith(":0")
        assert json.loads(sfile.read_text())["address"] == s["address"]

        worker = Proc(WORKER + [s["address"], "--nthreads", "1", "--memory-limit", "1GiB",
                                "--name", "alice", "--log-level", "warning"])
        w = worker.ready()
        assert w["role"] == "worker" and w["name"] == "alice" and w["pid"] == worker.p.pid
        assert w["address"].startswith("tcp://")
        assert w["nanny"].startswith("tcp://") and w["nanny"] != w["address"]
        kids = descendants(worker.p.pid)
        assert [k.pid for k in kids] == [w["worker_pid"]]

        assert worker.stop(signal.SIGTERM) == 0
        for k in kids:
            assert not k.is_running() or k.status() == psutil.STATUS_ZOMBIE
        assert sched.stop(signal.SIGTERM) == 0
        assert not sfile.exists()  # removed on a clean exit
    finally:
        if worker:
            worker.kill()
        sched.kill()


@pytest.mark.usefixtures("real_servers")
def test_end_to_end_no_nanny_workers_from_scheduler_file(tmp_path):
    sfile = tmp_path / "scheduler.json"
    # The worker starts first and waits for the file.
    worker = Proc(WORKER + ["--scheduler-file", str(sfile), "--no-nanny", "--nworkers", "2",
                            "--nthreads", "1", "--memory-limit", "auto", "--name", "w"])
    sched = None
    try:
        time.sleep(0.3)
        sched = Proc(SCHED + ["--port", "0", "--scheduler-file", str(sfile)])
        s = sched.ready()
        w = worker.ready()
        assert [x["name"] for x in w["workers"]] == ["w-0", "w-1"]
        assert "nanny" not in w
        assert descendants(worker.p.pid) == []
        assert worker.stop(signal.SIGINT) == 0
        assert sched.stop(signal.SIGINT) == 0
        assert s["address"]
    finally:
        worker.kill()
        if sched:
            sched.kill()


@pytest.mark.usefixtures("real_servers")
def test_end_to_end_tls(tmp_path):
    from taskcore.security import Security

    sec = Security.temporary(directory=str(tmp_path))
    flags = ["--tls-ca-file", sec.ca_file, "--tls-cert", sec.cert_file, "--tls-key", sec.key_file]
    sched = Proc(SCHED + ["--port", "0"] + flags)
    worker = None
    try:
        s = sched.ready()
        assert s["address"].startswith("tls://")
        worker = Proc(WORKER + [s["address"], "--nthreads", "1"] + flags)
        w = worker.ready()
        assert w["address"].startswith("tls://") and w["nanny"].startswith("tls://")
        assert worker.stop() == 0
        assert sched.stop() == 0
    finally:
        if worker:
            worker.kill()
        sched.kill()


@pytest.mark.usefixtures("real_servers")
def test_worker_exits_when_scheduler_is_gone_past_death_timeout():
    sched = Proc(SCHED + ["--port", "0"])
    worker = None
    try:
        s = sched.ready()
        worker = Proc(WORKER + [s["address"], "--nthreads", "1", "--death-timeout", "1",
                                "--memory-limit", "0"])
        w = worker.ready()
        sched.p.kill()
        sched.p.wait()
        assert worker.p.wait(60) == 0
        assert not psutil.pid_exists(w["worker_pid"]) or \
            psutil.Process(w["worker_pid"]).status() == psutil.STATUS_ZOMBIE
    finally:
        if worker:
            worker.kill()
        sched.kill()


@pytest.mark.usefixtures("real_servers")
def test_unreachable_scheduler_fails_the_worker():
    out = run_cli(WORKER + ["tcp://127.0.0.1:9", "--no-nanny",
                            "--worker-options", json.dumps({"connection_timeout": 1})],
                  timeout=60)
    assert out.returncode != 0
    assert "could not start worker" in out.stderr


def test_death_timeout_bounds_the_first_connection():
    """A worker whose scheduler never answers gives up after --death-timeout, not the
    10 s connection timeout (issue 16, fault 9)."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:                  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "taskcore.cli.worker", f"tcp://127.0.0.1:{port}",
                          "--no-nanny", "--death-timeout", "1.5", "--no-dashboard"],
                         capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t
    assert out.returncode != 0
    assert took < 8, f"the worker tried for {took:.1f} s"
