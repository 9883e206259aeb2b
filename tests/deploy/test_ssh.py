"""SSHCluster against a real OpenSSH server on localhost (a non-standard port).

The processes are started over SSH, so they are children of *our* sshd: after
`close()` no descendant of it may remain. That is the "nothing left behind"
check, independent of what the cluster believes.

Security rides on the clusters these tests start anyway (each start costs
seconds): the first runs with the default (temporary TLS credentials shipped to
the host), the scale test with a Security holding a token, the many-processes
test with security=False (plain tcp, one warning). tests/deploy/test_ssh_tls.py
has the checks that need no cluster.
"""
import asyncio
import logging
import os
import stat
import subprocess
import time

import pytest

from taskcore import Client, Security
from taskcore.deploy.launcher import descendants, is_alive
from taskcore.deploy.process import ProcessStartError
from taskcore.testing import import_required, run

import_required("asyncssh", "SSH tests need the [ssh] extra")

from taskcore.deploy.ssh import SSHCluster  # noqa: E402


def python_descendants(sshd):
    """Processes under our sshd other than sshd's own session processes."""
    out = []
    for p in descendants(sshd.pid):
        try:
            exe = os.path.basename(os.readlink(f"/proc/{p}/exe"))
        except OSError:
            continue
        if exe != "sshd":
            out.append(p)
    return out


def cmdline(pid) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def test_localhost_cluster_computes_and_leaves_nothing(sshd, ssh_cluster_kwargs, wait_until):
    """The default: TLS with temporary credentials, shipped to the host (0600, in a 0700
    directory) before anything starts there, and removed with the cluster."""
    t0 = time.monotonic()
    with SSHCluster(["127.0.0.1", "127.0.0.1", "127.0.0.1"],
                    connect_options=sshd.connect_options(),
                    worker_options={"nthreads": 1, "memory_limit": "500MB"},
                    **ssh_cluster_kwargs) as cluster:
        started = time.monotonic() - t0
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert cluster.security.enabled and cluster.security.token is None
        local_dir = os.path.dirname(cluster.security.key_file)
        # The remote copies (this host is the remote one, as the same user).
        remote_dir = os.path.expanduser(cluster._targets[0].credentials_dir)
        assert remote_dir.startswith(os.path.expanduser("~/.cache/taskcore/tls/"))
        assert stat.S_IMODE(os.stat(remote_dir).st_mode) == 0o700
        assert sorted(os.listdir(remote_dir)) == ["ca.pem", "cert.pem", "key.pem"]
        for f in os.listdir(remote_dir):
            assert stat.S_IMODE(os.stat(os.path.join(remote_dir, f)).st_mode) == 0o600
        # The remote processes read the copies, not our local files.
        assert f"--tls-key {remote_dir}/key.pem" in cmdline(cluster.scheduler.pid)
        assert len(cluster.workers) == 2
        pids = [p for h in [cluster.scheduler, *cluster.workers.values()] for p, _ in h.pids]
        assert pids and all(p in descendants(sshd.pid) for p in pids)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=20)
            assert client.submit(lambda x: x + 1, 41).result(timeout=20) == 42
            assert sum(client.gather(client.map(lambda x: x * x, range(20)))) == 2470
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
        # No credentials, plain tcp: refused at once, saying why.
        plain = cluster.scheduler_address.replace("tls://", "tcp://")
        with pytest.raises(Exception) as refused:
            Client(plain, timeout=5, set_as_default=False)
        text = f"{refused.value} {refused.value.__cause__}"
        assert "this address speaks tls://" in text, text
        logs = cluster.get_logs()
        assert set(logs) >= {"Cluster", "Scheduler", "0", "1"}
        assert "SSHCluster" in repr(cluster) and "workers=2" in repr(cluster)
        html = cluster._repr_html_()
        assert cluster.name in html and cluster.scheduler_address in html
    assert cluster.status == "closed"
    assert not any(is_alive(p) for p in pids)
    assert not os.path.exists(remote_dir) and not os.path.exists(local_dir)
    wait_until(lambda: not python_descendants(sshd), 10, message="no process under sshd")
    print(f"start {started:.2f} s")


def test_scale_and_worker_groups_over_ssh(sshd, ssh_cluster_kwargs, wait_until, tmp_path):
    """Also: a Security of our own with a token. The token reaches every remote process
    (scheduler, nanny, the nanny's workers) through its environment, never a command line."""
    token = "tok-" + os.urandom(12).hex()
    files = Security.temporary(str(tmp_path))
    security = Security(files.ca_file, files.cert_file, files.key_file,
                        require_encryption=True, token=token)

    async def main():
        async with SSHCluster(["127.0.0.1", "127.0.0.1"], connect_options=sshd.connect_options(),
                              worker_options={"nthreads": 1, "nworkers": 2}, security=security,
                              asynchronous=True, **ssh_cluster_kwargs) as cluster:
            assert cluster.security is security
            assert cluster.scheduler_address.startswith("tls://")
            # One process, two workers: counted as two, named 0-0 and 0-1. Registered with
            # the token-checking scheduler: the workers had the token.
            assert len(cluster.workers) == 1
            assert await cluster.wait_for_workers(2, timeout=20) >= 2
            args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                                  check=True).stdout
            assert "taskcore.cli.worker" in args and token not in args
            remote_dir = os.path.expanduser(cluster._targets[0].credentials_dir)
            assert sorted(os.listdir(remote_dir)) == ["ca.pem", "cert.pem", "key.pem", "token"]
            with open(f"/proc/{cluster.scheduler.pid}/environ", "rb") as f:
                assert f"TASKCORE_TOKEN={token}".encode() in f.read().split(b"\0")
            await cluster.scale(4)
            assert len(cluster.workers) == 2
            assert await cluster.wait_for_workers(4, timeout=20) >= 4
            await cluster.scale(2)
            assert len(cluster.workers) == 1
            return remote_dir
    remote_dir = run(main(), timeout=90)
    assert not os.path.exists(remote_dir)
    wait_until(lambda: not python_descendants(sshd), 10, message="no process under sshd")


def test_many_processes_on_one_host_use_several_connections(sshd, ssh_cluster_kwargs,
                                                             monkeypatch, wait_until, caplog):
    """Each attached process holds a channel; sshd allows only MaxSessions per connection.
    Also: security=False is plain tcp://, with one warning."""
    from taskcore.deploy.ssh import SSHConnections

    monkeypatch.setattr(SSHConnections, "MAX_CHANNELS", 2)
    monkeypatch.delenv("TASKCORE_TOKEN", raising=False)

    async def main():
        async with SSHCluster(["127.0.0.1"] * 4, connect_options=sshd.connect_options(),
                              worker_options={"nthreads": 1, "memory_limit": "300MB"},
                              worker_class="taskcore.Worker", asynchronous=True, security=False,
                              **ssh_cluster_kwargs) as cluster:
            assert cluster.scheduler_address.startswith("tcp://") and cluster.security is None
            assert not cluster._targets[0]._wrote  # nothing shipped
            conns = [e for es in cluster._pool._conns.values() for e in es]
            assert len(conns) >= 2 and all(e.channels <= 2 for e in conns)
            assert await cluster.wait_for_workers(3, timeout=20) == 3
    with caplog.at_level(logging.WARNING, logger="taskcore.deploy.ssh"):
        run(main(), timeout=90)
    warned = [r for r in caplog.records if "anyone who can reach the scheduler's port" in
              r.getMessage()]
    assert len(warned) == 1 and "security=False" in warned[0].getMessage()
    wait_until(lambda: not python_descendants(sshd), 10, message="no process under sshd")


def test_missing_asyncssh_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "asyncssh", None)
    with pytest.raises(ImportError, match=r"taskcore\[ssh\]"):
        SSHCluster(["127.0.0.1", "127.0.0.1"])


def test_wrong_key_is_a_clear_error(sshd, ssh_cluster_kwargs):
    t0 = time.monotonic()
    with pytest.raises(ProcessStartError, match=r"127\.0\.0\.1.*authentication failed"):
        SSHCluster(["127.0.0.1", "127.0.0.1"],
                   connect_options=sshd.connect_options(key="wrong_key"), **ssh_cluster_kwargs)
    assert time.monotonic() - t0 < 15


def test_bad_hosts_are_clear_errors(sshd, ssh_cluster_kwargs):
    opts = sshd.connect_options()
    with pytest.raises(ProcessStartError, match=r"no-such-host\.invalid.*cannot connect"):
        SSHCluster(["no-such-host.invalid", "127.0.0.1"], connect_options=opts,
                   connect_timeout=5, **ssh_cluster_kwargs)
    closed = dict(opts, port=1)  # nothing listens on port 1
    with pytest.raises(ProcessStartError, match=r"127\.0\.0\.1:1.*cannot connect"):
        SSHCluster(["127.0.0.1", "127.0.0.1"], connect_options=closed, connect_timeout=5,
                   **ssh_cluster_kwargs)


def test_missing_remote_python_names_the_host_and_leaves_nothing(sshd, ssh_cluster_kwargs,
                                                                 wait_until):
    kw = dict(ssh_cluster_kwargs)
    python = kw.pop("remote_python")
    # The scheduler starts fine; the worker host's Python does not exist.
    with pytest.raises(ProcessStartError, match=r"root@127\.0\.0\.1.*remote Python "
                                                r"'/nonexistent/python3' not found"):
        SSHCluster(["127.0.0.1", "127.0.0.1"], connect_options=sshd.connect_options(),
                   remote_python=[python, "/nonexistent/python3"], **kw)
    wait_until(lambda: not python_descendants(sshd), 10, message="no process under sshd")


def test_missing_taskcore_remotely_is_a_clear_error(sshd, ssh_cluster_kwargs):
    kw = dict(ssh_cluster_kwargs, remote_env={"PYTHONPATH": "/nonexistent"})
    kw["remote_python"] = "/usr/bin/python3"  # a Python without taskcore
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no system python3")
    with pytest.raises(ProcessStartError, match="taskcore is not importable"):
        SSHCluster(["127.0.0.1", "127.0.0.1"], connect_options=sshd.connect_options(), **kw)


def test_close_kills_by_pid_even_when_sigterm_is_ignored(sshd, ssh_cluster_kwargs, wait_until):
    """The server ignores SIGTERM: close() still ends it (SIGKILL after the grace period)."""
    async def main():
        cluster = await SSHCluster(["127.0.0.1"], connect_options=sshd.connect_options(),
                                   close_grace=1, asynchronous=True, **ssh_cluster_kwargs)
        pids = [p for p, _ in cluster.scheduler.pids]

        def ignore_sigterm(scheduler):  # nested: cloudpickle sends it by value
            import asyncio
            import signal

            try:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            except Exception:
                pass
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return True

        # Make the scheduler process deaf to SIGTERM, as a hung process would be.
        assert await cluster._scheduler_call(ignore_sigterm)
        t = time.monotonic()
        await cluster.close()
        assert time.monotonic() - t < 15
        return pids
    pids = run(main(), timeout=60)
    assert not any(is_alive(p) for p in pids)
    wait_until(lambda: not python_descendants(sshd), 10, message="no process under sshd")


def test_core_ssh_cli_runs_in_the_foreground_until_ctrl_c(sshd, ssh_cluster_kwargs, wait_until):
    import json
    import signal
    import subprocess
    import sys

    opts = sshd.connect_options()
    cmd = [sys.executable, "-m", "taskcore.cli.ssh", "127.0.0.1", "127.0.0.1", "127.0.0.1",
           "--nthreads", "1", "--memory-limit", "400MB", "--ssh-port", str(opts["port"]),
           "--ssh-username", "root", "--ssh-private-key", opts["client_keys"][0],
           "--no-host-key-check", "--remote-python", ssh_cluster_kwargs["remote_python"],
           "--remote-env", f"PYTHONPATH={ssh_cluster_kwargs['remote_env']['PYTHONPATH']}",
           "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        ready = json.loads(line)
        assert ready["event"] == "ready" and ready["role"] == "cluster" and ready["workers"] == 2
        # TLS by default: the ready line names the credentials for clients on this machine.
        assert ready["address"].startswith("tls://")
        sec = Security(**ready["security"], require_encryption=True)
        with Client(ready["address"], security=sec) as client:
            client.wait_for_workers(2, timeout=20)
            assert client.submit(lambda: 7 * 6).result(timeout=20) == 42
        assert python_descendants(sshd)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert "scheduler at" in err and "Ctrl-C to stop" in err
    wait_until(lambda: not python_descendants(sshd), 10, message="no process under sshd")


def test_core_ssh_cli_reports_a_bad_host(sshd, ssh_cluster_kwargs):
    import subprocess
    import sys

    opts = sshd.connect_options(key="wrong_key")
    proc = subprocess.run(
        [sys.executable, "-m", "taskcore.cli.ssh", "127.0.0.1", "127.0.0.1", "--ssh-port",
         str(opts["port"]), "--ssh-username", "root", "--ssh-private-key",
         opts["client_keys"][0], "--no-host-key-check"], capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 1
    assert "core-ssh: error: could not start the cluster" in proc.stderr
    assert "root@127.0.0.1" in proc.stderr and "authentication failed" in proc.stderr
    assert proc.stdout == ""


def test_failed_async_start_leaves_nothing(sshd, ssh_cluster_kwargs, wait_until):
    kw = dict(ssh_cluster_kwargs)
    python = kw.pop("remote_python")

    async def main():
        cluster = SSHCluster(["127.0.0.1", "127.0.0.1"], connect_options=sshd.connect_options(),
                             remote_python=[python, "/nonexistent/python3"], asynchronous=True,
                             **kw)
        with pytest.raises(ProcessStartError, match="not found"):
            await cluster
        assert cluster.status == "failed"
        await cluster.close()
        # The scheduler's host had its credentials removed; the worker host never ran one.
        assert not os.path.exists(os.path.expanduser(cluster._targets[0].credentials_dir))
        assert not any("could not remove" in ln for ln in cluster._logs)
    run(main(), timeout=60)
    wait_until(lambda: not python_descendants(sshd), 10, message="no process under sshd")
