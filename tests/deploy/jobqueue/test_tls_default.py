"""Job queue clusters run over tls:// with temporary credentials by default (issue 16).

Against the real SLURM (tests/deploy/jobqueue/slurm_server.py): the default cluster
computes over tls:// with the jobs' copy of the credentials private (0700/0600) and
gone after close, a client without credentials is refused, and neither the script
nor any process command line holds a key; `security=False` runs over tcp://.
The other batch systems' scripts (the scheduler's job's too), the credentials
directory written through a `command_prefix` as another user, tokens, detached
clusters and `core-jobqueue` need no server. SGE, OAR and the stand-ins run with
the new default in test_backends_e2e.py.
"""
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import cloudpickle
import psutil
import pytest

from taskcore import Client, Security
from taskcore.deploy.jobqueue.cluster import _CREDENTIALS_SH
from taskcore.deploy.jobqueue.job import JobCredentials
from taskcore.deploy.jobqueue.slurm import SLURMCluster
from taskcore.deploy.jobqueue.system import BatchCommandError
from taskcore.deploy.specdata import import_dotted
from taskcore.testing import require, run

from .test_backends_e2e import STANDINS

cloudpickle.register_pickle_by_value(sys.modules[__name__])
FAST = dict(poll_interval=0.5)
SYSTEMS = {"slurm": "taskcore.deploy.jobqueue.slurm.SLURMCluster",
           "sge": "taskcore.deploy.jobqueue.sge.SGECluster",
           "oar": "taskcore.deploy.jobqueue.oar.OARCluster",
           **{f: STANDINS[f][0].replace(":", ".") for f in STANDINS}}
PLAIN_WARNING = "anyone who can reach the scheduler's port can run code"


@pytest.fixture(autouse=True)
def _no_token_or_site_config(monkeypatch, tmp_path):
    monkeypatch.delenv("TASKCORE_TOKEN", raising=False)
    monkeypatch.delenv("TASKCORE_JOBQUEUE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


def inc(x):
    return x + 1


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def _assert_private(directory, names):
    assert _mode(directory) == 0o700, oct(_mode(directory))
    assert sorted(os.listdir(directory)) == sorted(names)
    for name in names:
        path = os.path.join(directory, name)
        assert _mode(path) == 0o600, (path, oct(_mode(path)))
        assert os.stat(path).st_uid == os.stat(directory).st_uid


def _cmdlines(address):
    port = address.rsplit(":", 1)[1]
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "taskcore.cli" in cmd and f":{port}" in cmd:
            out.append(cmd)
    return out


# -- the real SLURM ------------------------------------------------------------------------------

def test_default_slurm_cluster_is_tls_with_private_credentials_gone_after_close(
        slurm_clean, tmp_path):
    slurm = slurm_clean
    shared = tmp_path / "shared"
    with SLURMCluster(cores=1, memory="1GiB", shared_directory=str(shared), **FAST) as cluster:
        sec = cluster.security
        assert isinstance(sec, Security) and sec.enabled
        assert cluster.scheduler_address.startswith("tls://")
        local = os.path.dirname(sec.key_file)
        jobs_dir = cluster._credentials_dir
        assert jobs_dir.startswith(f"{shared}/tls/{cluster.name}-")
        _assert_private(local, ["ca.pem", "cert.pem", "key.pem"])
        _assert_private(jobs_dir, ["ca.pem", "cert.pem", "key.pem"])
        assert _mode(shared / "tls") == 0o700
        for f in ("ca.pem", "cert.pem", "key.pem"):
            with open(os.path.join(local, f)) as a, open(os.path.join(jobs_dir, f)) as b:
                assert a.read() == b.read()
        key_text = open(sec.key_file).read().strip()
        assert "PRIVATE KEY" in key_text
        script = cluster.job_script()
        assert f"--tls-key {jobs_dir}/key.pem" in script and "PRIVATE KEY" not in script

        cluster.scale(jobs=1)
        with Client(cluster) as client:  # takes cluster.security
            client.wait_for_workers(1, timeout=60)
            assert sum(client.gather(client.map(inc, range(20)))) == sum(range(1, 21))
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
        # The batch system's own copy of the script names the files, holds no key.
        job_id = cluster.jobs[0]["job_id"]
        stored = slurm.run("scontrol", "write", "batch_script", job_id, "-").stdout
        assert f"--tls-key {jobs_dir}/key.pem" in stored and "PRIVATE KEY" not in stored
        # Nor does any process's command line (the job's nanny and worker read the files).
        cmds = _cmdlines(cluster.scheduler_address)
        assert len(cmds) >= 2 and all(f"--tls-key {jobs_dir}/key.pem" in c for c in cmds)
        assert not any(key_text.splitlines()[1] in c for c in cmds)
        # No credentials, plain tcp: refused at once, saying why.
        plain = cluster.scheduler_address.replace("tls://", "tcp://")
        with pytest.raises(Exception) as refused:
            Client(plain, timeout=5, set_as_default=False)
        text = f"{refused.value} {refused.value.__cause__}"
        assert "this address speaks tls://" in text, text
    assert slurm.jobs() == []
    assert not os.path.exists(jobs_dir) and not os.path.exists(local)
    assert os.listdir(shared / "tls") == []


def test_slurm_security_false_is_plain_tcp_with_one_warning(slurm_clean, caplog):
    with caplog.at_level(logging.WARNING, logger="taskcore.deploy.jobqueue"):
        cluster = SLURMCluster(cores=1, memory="1GiB", security=False, n_workers=1, **FAST)
    with cluster, Client(cluster) as client:
        assert cluster.security is None and cluster._credentials_dir is None
        assert cluster.scheduler_address.startswith("tcp://")
        assert "--tls" not in cluster.job_script()
        client.wait_for_workers(1, timeout=60)
        assert client.submit(inc, 41).result() == 42
        assert all(a.startswith("tcp://") for a in client.scheduler_info()["workers"])
    assert caplog.text.count(PLAIN_WARNING) == 1, caplog.text


def test_slurm_token_reaches_the_jobs_only_through_a_private_file(slurm_clean, tmp_path):
    """A token-only Security: tcp:// plus the token, which this process's environment does
    not hold (so sbatch cannot pass it on): the job's nanny and worker read --token-file."""
    token = "tok-" + os.urandom(12).hex()
    with SLURMCluster(cores=1, memory="1GiB", security=Security(token=token), n_workers=1,
                      shared_directory=str(tmp_path), **FAST) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        d = cluster._credentials_dir
        _assert_private(d, ["token"])
        with Client(cluster) as client:  # the cluster's Security: the token
            client.wait_for_workers(1, timeout=60)
            assert client.submit(inc, 1).result() == 2
        # The job's command (core-worker with its nanny) names the file; the nanny hands
        # the token to its worker process through the environment. No command line has it.
        cmds = _cmdlines(cluster.scheduler_address)
        nannies = [c for c in cmds if " --nanny " in c]
        assert len(nannies) == 1 and f"--token-file {d}/token" in nannies[0], cmds
        assert len(cmds) >= 2 and not any(token in c for c in cmds)
        assert token not in cluster.job_script()
        with pytest.raises(Exception, match="token"):
            Client(cluster.scheduler_address, timeout=5, set_as_default=False)
    assert not os.path.exists(d)


# -- scripts of every batch system, and the scheduler's job ----------------------------------

@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_every_systems_scripts_name_the_private_copies_and_hold_no_secret(system, tmp_path,
                                                                        monkeypatch):
    """Worker and scheduler job scripts, without a server: the default names the jobs' copy
    (--tls-*), a token reaches them as --token-file, and no secret is in the text."""
    token = "tok-" + os.urandom(8).hex()
    monkeypatch.setenv("TASKCORE_TOKEN", token)
    cls = import_dotted(SYSTEMS[system])
    cluster = cls(cores=1, memory="1GiB", scheduler="job", shared_directory=str(tmp_path),
                  asynchronous=True, name="scripts")
    try:
        d = cluster._credentials_dir
        assert d.startswith(f"{tmp_path}/tls/scripts-")
        creds = cluster._job_security
        assert isinstance(creds, JobCredentials) and creds.key_file == f"{d}/key.pem"
        assert creds.token_file == f"{d}/token"
        assert cluster.scheduler_spec["options"]["security"] is creds
        assert cluster.new_spec["options"]["security"] is creds
        assert cluster.scheduler_spec["options"]["scheduler_options"]["protocol"] == "tls"
        key_line = open(cluster.security.key_file).read().splitlines()[1]
        worker = cluster.job_script()
        scheduler = cluster.scheduler_spec["cls"](
            **cluster.scheduler_spec["options"]).job_script()
        for text in (worker, scheduler):
            for option, f in (("--tls-ca-file", "ca.pem"), ("--tls-cert", "cert.pem"),
                              ("--tls-key", "key.pem"), ("--token-file", "token")):
                assert f"{option} {d}/{f}" in text, (option, text)
            assert token not in text and key_line not in text and "PRIVATE" not in text
        assert "tls://127.0.0.1:1" in worker  # the stand-in address, until the scheduler runs
    finally:
        local = os.path.dirname(cluster.security.key_file)
        run(cluster.close())
    assert not os.path.exists(local)


def test_security_choices_and_their_warnings(tmp_path, caplog):
    from taskcore.deploy.jobqueue.pbs import PBSCluster

    kw = dict(cores=1, memory="1GiB", asynchronous=True, shared_directory=str(tmp_path))
    (tmp_path / "given").mkdir()
    given = Security.temporary(str(tmp_path / "given"))
    with caplog.at_level(logging.WARNING, logger="taskcore.deploy.jobqueue"):
        # A Security with files: used as given, by its own paths; no copy, no directory.
        c = PBSCluster(security=given, **kw)
        assert c.security is given and c._credentials_dir is None
        assert c._job_security.key_file == given.key_file and not c._job_security.token_file
        assert c.scheduler_spec["options"]["security"] is given  # the in-process scheduler
        assert c.scheduler_spec["options"]["protocol"] == "tls"
        # A token only: tcp:// plus the token, through the jobs' private directory.
        c = PBSCluster(security=Security(token="t0k"), **kw)
        assert "protocol" not in c.scheduler_spec["options"]
        assert not c._job_security.enabled and c._job_security.token_file.endswith("/token")
        assert c._job_files() == {"token": b"t0k\n"}
        assert "t0k" not in c.job_script() and "--token-file" in c.job_script()
        assert PLAIN_WARNING not in caplog.text
        # security=False: plain tcp://, one warning; nothing for the jobs.
        c = PBSCluster(security=False, **kw)
        assert c.security is None and c._job_security is None
        assert "security" not in c.new_spec["options"]
    assert caplog.text.count(PLAIN_WARNING) == 1
    with pytest.raises(TypeError, match="security must be"):
        PBSCluster(security=True, **kw)


def test_detached_clusters_stay_on_tcp_and_refuse_a_security(tmp_path, caplog):
    kw = dict(cores=1, memory="1GiB", scheduler="job", shutdown_on_close=False,
              shared_directory=str(tmp_path), asynchronous=True)
    with pytest.raises(ValueError, match="shutdown_on_close=False does not support TLS"):
        SLURMCluster(security=Security.temporary(str(tmp_path)), **kw)
    with caplog.at_level(logging.WARNING, logger="taskcore.deploy.jobqueue"):
        c = SLURMCluster(**kw)
    assert c.security is None and c._job_security is None and c._own_credentials is None
    assert "security" not in c.scheduler_spec["options"]
    assert "--tls" not in c.job_script() and "tcp://" in c.job_script()
    assert "detached cluster" in caplog.text and PLAIN_WARNING in caplog.text


# -- writing and removing the jobs' copy -------------------------------------------------------

def test_the_jobs_copy_is_written_from_stdin_and_removed_at_close(tmp_path, monkeypatch):
    from taskcore.deploy.jobqueue.lsf import LSFCluster

    monkeypatch.setenv("TASKCORE_TOKEN", "from-env")
    c = LSFCluster(cores=1, memory="1GiB", asynchronous=True, shared_directory=str(tmp_path))
    calls = []
    real_run = c.system.run

    async def spy(argv, what, stdin=None, accept=None):
        calls.append((list(argv), stdin))
        return await real_run(argv, what, stdin=stdin, accept=accept)

    c.system.run = spy
    local = c._own_credentials
    run(c._write_job_credentials())
    d = c._credentials_dir
    _assert_private(d, ["ca.pem", "cert.pem", "key.pem", "token"])
    assert open(os.path.join(d, "token")).read() == "from-env\n"
    secrets = [open(os.path.join(d, f)).read() for f in ("key.pem", "token")]
    assert [argv[:5] for argv, _ in calls] == [["sh", "-c", _CREDENTIALS_SH, "sh", op]
                                               for op in ["mkdir"] + ["write"] * 4]
    for argv, stdin in calls:  # the contents went on stdin, never into argv
        assert not any(s.strip() in " ".join(argv) for s in secrets)
    # A second write (a restart of _start) does not touch what is there.
    run(c._write_job_credentials())
    assert len(calls) == 5
    run(c.close())
    assert calls[-1][0][4:] == ["remove", d]
    assert not os.path.exists(d) and not os.path.exists(local)
    assert os.listdir(tmp_path / "tls") == []


def test_the_credentials_script_refuses_a_link_or_a_foreign_directory(tmp_path):
    def sh(*args, stdin=b""):
        return subprocess.run(["sh", "-c", _CREDENTIALS_SH, "sh", *args], input=stdin,
                              capture_output=True)

    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    out = sh("write", str(link), "key.pem", stdin=b"secret")
    assert out.returncode == 1 and b"is not a directory of" in out.stderr
    assert os.listdir(target) == []
    d = tmp_path / "tls" / "c-1"
    assert sh("mkdir", str(d)).returncode == 0 and _mode(d) == 0o700
    assert sh("mkdir", str(d)).returncode != 0  # never reuses a directory that exists
    assert sh("write", str(d), "key.pem", stdin=b"secret").returncode == 0
    assert sh("write", str(d), "key.pem", stdin=b"other").returncode != 0  # no overwrite
    assert (d / "key.pem").read_bytes() == b"secret" and _mode(d / "key.pem") == 0o600
    assert sh("remove", str(link)).returncode == 0 and target.exists()  # only the link
    assert sh("remove", str(d)).returncode == 0 and not d.exists()


@pytest.fixture
def open_tmp():
    """A directory other users can enter (pytest's tmp_path sits under a 0700 one)."""
    d = tempfile.mkdtemp(prefix="tc-jq-tls-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_through_a_command_prefix_the_copy_belongs_to_the_jobs_user(open_tmp):
    """As OAR's test submits (runuser -u USER --): the jobs' copy is that user's, 0700/0600,
    while this process keeps its own; an unwritable shared_directory is a clear error."""
    require(os.geteuid() == 0 and shutil.which("runuser"), "needs root and runuser")
    from taskcore.deploy.jobqueue.sge import SGECluster

    tmp_path = open_tmp
    user = "nobody"
    uid = pwd.getpwnam(user).pw_uid
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, uid, -1)
    prefix = ["runuser", "-u", user, "--"]
    c = SGECluster(cores=1, memory="1GiB", asynchronous=True, shared_directory=str(shared),
                   command_prefix=prefix)
    run(c._write_job_credentials())
    d = c._credentials_dir
    _assert_private(d, ["ca.pem", "cert.pem", "key.pem"])
    assert os.stat(d).st_uid == uid and os.stat(shared / "tls").st_uid == uid
    assert os.stat(c.security.key_file).st_uid == os.geteuid()  # ours stays ours
    run(c.close())
    assert not os.path.exists(d)

    c = SGECluster(cores=1, memory="1GiB", asynchronous=True,
                   shared_directory=str(tmp_path / "root-only"), command_prefix=prefix)
    (tmp_path / "root-only").mkdir(mode=0o700)
    local = c._own_credentials
    with pytest.raises(BatchCommandError, match=f"cannot write the jobs' TLS credentials into "
                                                f".* as {user} \\(command_prefix\\)"):
        run(c._write_job_credentials())
    run(c.close())
    assert not os.path.exists(local)


# -- core-jobqueue ---------------------------------------------------------------------------

def test_core_jobqueue_tls_options(tmp_path):
    from taskcore.cli.jobqueue import cluster_kwargs, parse_args

    base = ["slurm", "--cores", "1", "--memory", "1GiB"]
    assert cluster_kwargs(parse_args(base))["security"] is None  # temporary TLS
    assert cluster_kwargs(parse_args(base + ["--no-tls"]))["security"] is False
    detached = parse_args(base + ["--scheduler-in-job", "--detach"])
    assert cluster_kwargs(detached)["security"] is None  # tcp://, detached
    (tmp_path / "tok").write_text("s3cret\n")
    sec = cluster_kwargs(parse_args(base + ["--token-file", str(tmp_path / "tok")]))["security"]
    assert sec.token == "s3cret" and not sec.enabled
    for bad in (["--scheduler-in-job", "--detach", "--token", "x"],
                ["--no-tls", "--tls-ca-file", "a", "--tls-cert", "b", "--tls-key", "c"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
    script = parse_args(["script", "sge", "--cores", "1", "--memory", "1GiB"])
    text = script.job_script.worker_script(script.scheduler_address, "0")
    assert script.scheduler_address == "tls://SCHEDULER:8786"
    assert "--tls-key " + os.path.expanduser("~/.cache/taskcore/jobqueue/tls/CLUSTER/key.pem") \
        in text
    plain = parse_args(["script", "sge", "--cores", "1", "--memory", "1GiB", "--no-tls"])
    assert plain.scheduler_address == "tcp://SCHEDULER:8786"
    assert "--tls" not in plain.job_script.worker_script(plain.scheduler_address, "0")

