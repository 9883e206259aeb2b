"""SSHCluster security checks that need no running cluster (each is well under a second).

The ones that do need a cluster ride on the clusters tests/deploy/test_ssh.py starts
anyway: the default (temporary TLS, files shipped 0600 and removed on close, a plain
tcp:// client refused), a Security with a token (never on a command line), and
security=False (tcp://, one warning).
"""
import logging
import os
import stat

import pytest

from taskcore import Security
from taskcore.testing import import_required, run

import_required("asyncssh", "SSH tests need the [ssh] extra")

from taskcore.deploy.launched import LaunchedScheduler, LaunchedWorker  # noqa: E402
from taskcore.deploy.ssh import SSHCluster, SSHTarget, _credentials_dir  # noqa: E402


def test_detached_cluster_refuses_a_security_and_warns_about_plain_tcp(caplog, tmp_path,
                                                                       ssh_cluster_kwargs):
    with pytest.raises(ValueError, match="shutdown_on_close=False does not support TLS"):
        SSHCluster(["127.0.0.1"], security=Security.temporary(str(tmp_path)),
                   shutdown_on_close=False, **ssh_cluster_kwargs)
    # The default for a detached cluster stays tcp://, with the warning: check the specs
    # it would start (asynchronous, so nothing starts).
    with caplog.at_level(logging.WARNING, logger="taskcore.deploy.ssh"):
        cluster = SSHCluster(["127.0.0.1", "127.0.0.1"], shutdown_on_close=False,
                             asynchronous=True, name="det-plain", **ssh_cluster_kwargs)
    assert cluster.security is None
    assert "security" not in cluster.scheduler_spec["options"]
    assert "security" not in cluster.new_spec["options"]
    assert "anyone who can reach the scheduler's port" in caplog.text


def test_the_default_specs_carry_tls_and_the_token_only_in_the_environment(monkeypatch,
                                                                         ssh_cluster_kwargs):
    monkeypatch.setenv("TASKCORE_TOKEN", "from-the-environment")
    cluster = SSHCluster(["127.0.0.1", "127.0.0.1"], asynchronous=True, name="spec-check",
                         **ssh_cluster_kwargs)
    sec = cluster.security
    try:
        assert sec.enabled and cluster.scheduler_spec["options"]["protocol"] == "tls"
        for spec in (cluster.scheduler_spec, cluster.new_spec, cluster.worker_spec[0]):
            assert spec["options"]["security"] is sec
            assert spec["options"]["env"] == {"TASKCORE_TOKEN": "from-the-environment"}
        # A named cluster's directory gets a random suffix: two clusters given one name
        # must not share (or remove) each other's credentials.
        d = cluster._targets[0].credentials_dir
        assert d.startswith("~/.cache/taskcore/tls/spec-check-") and d != _credentials_dir(
            "spec-check", unique=False)
        assert _credentials_dir("../../etc x", unique=True) == "~/.cache/taskcore/tls/_.._etc_x"
    finally:
        run(cluster.close())
    assert not os.path.exists(os.path.dirname(sec.key_file))  # our local temporary files


def test_security_false_warns_unless_a_token_is_set(monkeypatch, caplog, ssh_cluster_kwargs):
    monkeypatch.delenv("TASKCORE_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING, logger="taskcore.deploy.ssh"):
        c = SSHCluster(["127.0.0.1"], security=Security(token="t0k"), asynchronous=True,
                       **ssh_cluster_kwargs)
        assert "anyone who can reach" not in caplog.text
        assert c.security.token == "t0k" and "protocol" not in c.scheduler_spec["options"]
        assert c.scheduler_spec["options"]["env"] == {"TASKCORE_TOKEN": "t0k"}
        c = SSHCluster(["127.0.0.1"], security=False, asynchronous=True, **ssh_cluster_kwargs)
        assert c.security is None and "security" not in c.scheduler_spec["options"]
    assert caplog.text.count("anyone who can reach the scheduler's port") == 1
    with pytest.raises(TypeError, match="security must be"):
        SSHCluster(["127.0.0.1"], security="yes", asynchronous=True, **ssh_cluster_kwargs)


def test_a_token_never_reaches_a_remote_command_line(tmp_path):
    target = SSHTarget("h", remote_python="/opt/py", env={"A": "1"})
    cmd = target.command(["run", "--", "x"], {"B": "2"}, token_file="/home/u/.cache/t/token")
    assert "TASKCORE_TOKEN=\"$(cat -- /home/u/.cache/t/token)\" || exit 1" in cmd
    assert "; export TASKCORE_TOKEN; exec env A=1 B=2 /opt/py -c " in cmd
    with pytest.raises(ValueError, match="must not be put on a remote command line"):
        target.command(["run"], {"TASKCORE_TOKEN": "secret"})
    with pytest.raises(ValueError, match="remote_env must not hold TASKCORE_TOKEN"):
        SSHCluster(["127.0.0.1"], remote_env={"TASKCORE_TOKEN": "secret"}, asynchronous=True)


def test_launched_processes_name_the_targets_copies_and_pass_the_token_by_env(tmp_path):
    """Target.credentials maps local files to the target's copies; a LocalTarget keeps them."""
    sec = Security.temporary(str(tmp_path))
    sec.token = "tok"

    class Remote(SSHTarget):
        async def _ship(self, files):
            assert set(files) <= {"ca.pem", "cert.pem", "key.pem", "token"}
            return {n: f"/remote/{n}" for n in files}

    target = Remote("h", remote_python="/opt/py")

    async def main():
        s = LaunchedScheduler(target=target, security=sec, protocol="tls", host="h")
        w = LaunchedWorker("tls://h:1", name="w", target=target, security=sec)
        return await s._server_argv_async(), await w._server_argv_async(), s._child_env()
    sargv, wargv, env = run(main())
    for argv in (sargv, wargv):
        assert argv[argv.index("--tls-key") + 1] == "/remote/key.pem"
        assert "tok" not in argv and str(tmp_path) not in " ".join(argv)
    assert env == {"TASKCORE_TOKEN": "tok"}
    for f in ("ca.pem", "cert.pem", "key.pem"):
        assert stat.S_IMODE(os.stat(tmp_path / f).st_mode) == 0o600


def test_core_ssh_tls_options():
    from taskcore.cli.ssh import cluster_kwargs, parse_args

    assert cluster_kwargs(parse_args(["h1", "h2"]))["security"] is None  # temporary TLS
    assert cluster_kwargs(parse_args(["h1", "h2", "--no-tls"]))["security"] is False
    assert cluster_kwargs(parse_args(["h1", "--detach"]))["security"] is None  # tcp, detached
    with pytest.raises(SystemExit):
        parse_args(["h1", "--detach", "--token", "x"])


def test_a_failed_removal_is_logged_and_does_not_stop_the_close(ssh_cluster_kwargs):
    cluster = SSHCluster(["127.0.0.1", "127.0.0.2"], asynchronous=True, **ssh_cluster_kwargs)
    local = os.path.dirname(cluster.security.key_file)

    async def broken():
        raise OSError("host gone")

    cluster._targets[1].remove_credentials = broken
    run(cluster.close())
    lines = [ln for ln in cluster._logs if "could not remove the TLS" in ln]
    assert len(lines) == 1 and "127.0.0.2" in lines[0] and "host gone" in lines[0]
    assert not os.path.exists(local)
