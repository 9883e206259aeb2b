"""A shared token works end to end (issue 16, fault 7): Client, Worker, Nanny,
LocalCluster's processes, the CLIs and TASKCORE_TOKEN."""
import json
import os
import subprocess
import sys

import cloudpickle
import pytest

from taskcore import Client, LocalCluster
from taskcore.errors import HandshakeError
from taskcore.scheduler import Scheduler
from taskcore.security import Security, resolve_token, token_env
from taskcore.testing import run


def inc(x):
    return x + 1


cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests


def test_resolve_token_order(monkeypatch):
    monkeypatch.delenv("TASKCORE_TOKEN", raising=False)
    assert resolve_token() is None
    monkeypatch.setenv("TASKCORE_TOKEN", "from-env")
    assert resolve_token() == "from-env"
    assert resolve_token(security=Security(token="from-sec")) == "from-sec"
    assert resolve_token("given", Security(token="from-sec")) == "given"
    assert token_env({"A": "1"}, Security(token="t")) == {"A": "1", "TASKCORE_TOKEN": "t"}
    assert "hidden" in repr(Security(token="secret")) and "secret" not in repr(Security(token="secret"))
    with pytest.raises(TypeError):
        Security(token="")


def test_client_token_is_used_and_enforced(monkeypatch):
    monkeypatch.delenv("TASKCORE_TOKEN", raising=False)

    async def main():
        async with Scheduler(port=0, token="s3cret-é") as s:
            with pytest.raises(HandshakeError, match="authentication failed"):
                await Client(s.address, asynchronous=True, token="wrong", timeout=3)
            with pytest.raises(HandshakeError, match="authentication failed"):
                await Client(s.address, asynchronous=True, timeout=3)
            c = await Client(s.address, asynchronous=True, token="s3cret-é")
            info = await c.scheduler_info()
            await c.close()
            return info

    assert run(main())["address"]


def test_unknown_client_option_is_an_error():
    with pytest.raises(TypeError, match="unknown options: \\['tokn'\\]"):
        Client("tcp://127.0.0.1:1", tokn="x")


def test_local_cluster_processes_get_the_token_through_their_environment(monkeypatch):
    monkeypatch.delenv("TASKCORE_TOKEN", raising=False)
    sec = Security(token="cluster-token")
    with LocalCluster(n_workers=1, threads_per_worker=1, security=sec,
                      dashboard_address=None) as cluster:
        with Client(cluster) as c:                       # the cluster's Security
            assert c.submit(inc, 1).result(timeout=30) == 2
            env_token = c.run(lambda: os.environ.get("TASKCORE_TOKEN"))
            assert list(env_token.values()) == ["cluster-token"]
        with pytest.raises(HandshakeError):
            Client(cluster.scheduler_address, timeout=3)
        # The token never appears on a command line.
        cmdlines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "cluster-token" not in cmdlines


def test_cli_token_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKCORE_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    sched = subprocess.Popen(
        [sys.executable, "-m", "taskcore.cli.scheduler", "--port", "0", "--no-dashboard",
         "--token-file", str(token_file)], stdout=subprocess.PIPE, text=True)
    try:
        address = json.loads(sched.stdout.readline())["address"]
        env = dict(os.environ, TASKCORE_TOKEN="file-token")
        worker = subprocess.Popen(
            [sys.executable, "-m", "taskcore.cli.worker", address, "--no-nanny",
             "--nthreads", "1", "--no-dashboard"], stdout=subprocess.PIPE, text=True, env=env)
        try:
            json.loads(worker.stdout.readline())
            with Client(address, token="file-token") as c:
                assert c.submit(inc, 41).result(timeout=30) == 42
            bad = subprocess.run(
                [sys.executable, "-m", "taskcore.cli.worker", address, "--no-nanny",
                 "--death-timeout", "2", "--token", "nope", "--no-dashboard"],
                capture_output=True, text=True, timeout=60)
            assert bad.returncode != 0
            assert "authentication failed" in bad.stderr
        finally:
            worker.terminate()
            worker.wait(30)
    finally:
        sched.terminate()
        sched.wait(30)


def test_cli_rejects_both_token_options(tmp_path):
    out = subprocess.run([sys.executable, "-m", "taskcore.cli.scheduler", "--token", "a",
                          "--token-file", str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and "not both" in out.stderr
