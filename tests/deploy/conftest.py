"""Real components for the deployment tests: a private cluster registry, sshd, network namespaces.

- `cluster_registry` (autouse): every test gets its own registry directory, and
  afterwards every process a registry entry still names is killed (by PID and
  start time), so a failing test cannot leak a detached cluster.
- `sshd`: our own OpenSSH server on 127.0.0.1 and a free port, with throwaway
  host and client keys; killed by PID at the end of the session.
- `netns_hosts`: three network namespaces on our own bridge (10.200.0.0/24), each
  with its own sshd on port 22 and its own hostname (h1, h2, h3); torn down at
  the end of the session.

Both skip outside CI when sshd, `ip` or root are missing, and fail under CI=true
(`taskcore.testing.require`). We log in as root (the machine's only account
that can run the project's Python); `remote_python` is this interpreter and
PYTHONPATH points at this checkout, so nothing has to be installed.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import taskcore
from taskcore import testing
from taskcore.testing import require

SSHD = "/usr/sbin/sshd"
SRC_DIR = str(Path(taskcore.__file__).resolve().parent.parent)
REMOTE_ENV = {"PYTHONPATH": SRC_DIR}


# ---------------------------------------------------------------------------------------------
# Registry isolation and the leak safety net
# ---------------------------------------------------------------------------------------------

def _recorded_pids(directory: Path):
    out = []
    for f in directory.glob("*.json"):
        try:
            entry = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        records = [entry.get("scheduler") or {}]
        records += [w.get("record") or {} for w in (entry.get("workers") or {}).values()]
        for r in records:
            la = r.get("launch") or {}
            for p, s in ((la.get("pid"), la.get("pid_start")),
                         (la.get("child_pid"), la.get("child_start"))):
                if p:
                    out.append((p, s))
    return out


@pytest.fixture(autouse=True)
def cluster_registry(tmp_path, monkeypatch):
    d = tmp_path / "clusters"
    monkeypatch.setenv("TASKCORE_CLUSTERS_DIR", str(d))
    yield d
    if d.exists():
        from taskcore.deploy.launcher import is_alive, kill

        # Every test host shares this kernel (namespaces isolate networks, not PIDs).
        leftovers = [(p, s) for p, s in _recorded_pids(d) if is_alive(p, s)]
        if leftovers:
            kill(leftovers, grace=2)
            pytest.fail(f"processes left running by the test, now killed: {leftovers}")


# ---------------------------------------------------------------------------------------------
# sshd
# ---------------------------------------------------------------------------------------------

def _have_sshd():
    return os.path.exists(SSHD) and os.geteuid() == 0


def _keygen(path: Path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory):
    require(_have_sshd(), "sshd (openssh-server) and root are needed for SSH tests")
    require(shutil.which("ssh-keygen") is not None, "ssh-keygen is needed for SSH tests")
    d = tmp_path_factory.mktemp("ssh")
    for name in ("host_key", "client_key", "wrong_key"):
        _keygen(d / name)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    return d


def _sshd_config(d: Path, tag: str, address: str, port: int) -> Path:
    cfg = d / f"sshd_config_{tag}"
    cfg.write_text("\n".join([
        f"Port {port}", f"ListenAddress {address}", f"HostKey {d / 'host_key'}",
        f"PidFile {d / f'sshd_{tag}.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "UsePAM no",
        "StrictModes no", "AllowTcpForwarding yes", "MaxStartups 100:30:200",
        "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
    return cfg


class Daemon:
    """An sshd that daemonized itself: not our child (other tests count our children), so it
    is managed by the PID in its PidFile, checked against its start time."""

    def __init__(self, pid):
        from taskcore.deploy.launcher import start_time

        self.pid = pid
        self.start = start_time(pid)

    def alive(self):
        from taskcore.deploy.launcher import is_alive

        return is_alive(self.pid, self.start)

    def stop(self):
        from taskcore.deploy.launcher import kill

        kill([(self.pid, self.start)], grace=5)


def _start_sshd(prefix, cfg: Path, pidfile: Path) -> Daemon:
    """Run sshd without -D: it forks into the background once it listens; we read its pid."""
    try:
        pidfile.unlink()
    except FileNotFoundError:
        pass
    proc = subprocess.run([*prefix, SSHD, "-f", str(cfg)], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"sshd failed to start ({proc.returncode}): {proc.stderr[-2000:]}")
    deadline = time.monotonic() + 10
    while True:
        try:
            return Daemon(int(pidfile.read_text().strip()))
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd wrote no pid file {pidfile}") from None
            time.sleep(0.02)


def _wait_listening(address, port, daemon, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"sshd (pid {daemon.pid}) exited")
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd on {address}:{port} did not start listening")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SSHServer:
    def __init__(self, host, port, keys, daemon):
        self.host = host
        self.port = port
        self.keys = keys
        self.daemon = daemon

    @property
    def pid(self):
        return self.daemon.pid

    def connect_options(self, key="client_key"):
        return {"port": self.port, "username": "root", "known_hosts": None,
                "client_keys": [str(self.keys / key)]}


@pytest.fixture(scope="session")
def sshd(ssh_keys):
    port = _free_port()
    cfg = _sshd_config(ssh_keys, "local", "127.0.0.1", port)
    daemon = _start_sshd([], cfg, ssh_keys / "sshd_local.pid")
    try:
        _wait_listening("127.0.0.1", port, daemon)
        yield SSHServer("127.0.0.1", port, ssh_keys, daemon)
    finally:
        daemon.stop()


# ---------------------------------------------------------------------------------------------
# Network namespaces: three hosts
# ---------------------------------------------------------------------------------------------

def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Host:
    def __init__(self, index, netns, address, veth, sshd):
        self.index = index
        self.name = f"h{index}"
        self.netns = netns
        self.address = address
        self.veth = veth
        self.sshd = sshd  # a Daemon

    def pids(self):
        """Every process in this host's network namespace."""
        out = _ip("netns", "pids", self.netns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def other_pids(self):
        """Processes in the namespace that are neither our sshd nor short-lived sshd sessions."""
        out = []
        for p in self.pids():
            if p == self.sshd.pid:
                continue
            try:
                exe = os.path.basename(os.readlink(f"/proc/{p}/exe"))
            except OSError:
                continue
            if exe != "sshd":
                out.append(p)
        return out

    def cut(self):
        _ip("link", "set", self.veth, "down")

    def heal(self):
        _ip("link", "set", self.veth, "up")


class NetnsHosts(list):
    def __init__(self, hosts, keys):
        super().__init__(hosts)
        self.keys = keys

    def connect_options(self, key="client_key"):
        return {"username": "root", "known_hosts": None, "client_keys": [str(self.keys / key)]}


@pytest.fixture(scope="session")
def netns_hosts(ssh_keys):
    require(shutil.which("ip") is not None, "iproute2 ('ip') is needed for network namespaces")
    require(shutil.which("unshare") is not None, "unshare (util-linux) is needed")
    tag = uuid.uuid4().hex[:4]
    bridge = f"tcbr{tag}"
    created_ns = []
    etc_dirs = []
    procs = []
    bridge_made = False
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as e:
            require(False, f"cannot create a bridge (no CAP_NET_ADMIN?): {e.stderr.strip()}")
        bridge_made = True
        _ip("addr", "add", "10.200.0.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = []
        for i in (1, 2, 3):
            ns, veth, addr = f"tc{tag}h{i}", f"tcv{tag}h{i}", f"10.200.0.1{i}"
            _ip("netns", "add", ns)
            created_ns.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", "10.200.0.1")
            # `ip netns exec` bind-mounts /etc/netns/NS/* over /etc: give each host a hosts
            # file naming all three, and no DNS server (one that cannot be reached from the
            # namespace makes every hostname lookup hang for seconds).
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            etc_dirs.append(etc)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"10.200.0.1{j} h{j}\n" for j in (1, 2, 3)))
            (etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")
            cfg = _sshd_config(ssh_keys, f"h{i}", addr, 22)
            # sshd daemonizes inside the namespace and keeps its own hostname (UTS namespace).
            daemon = _start_sshd(["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                                  f'hostname h{i}; exec "$0" "$@"'], cfg,
                                 ssh_keys / f"sshd_h{i}.pid")
            procs.append(daemon)
            hosts.append(Host(i, ns, addr, veth, daemon))
        for h in hosts:
            _wait_listening(h.address, 22, h.sshd)
        yield NetnsHosts(hosts, ssh_keys)
    finally:
        for d in procs:
            d.stop()
        for ns in created_ns:
            # Anything still inside is ours (we made the namespace): do not leave it running.
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        if bridge_made:
            _ip("link", "del", bridge, check=False)
        for etc in etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture
def wait_until():
    """`wait_until(predicate, timeout, message=)`: poll until truthy (returns the value)."""
    return testing.wait_until


@pytest.fixture
def ssh_cluster_kwargs():
    """What every SSHCluster in these tests needs: this interpreter, this checkout."""
    return {"remote_python": sys.executable, "remote_env": dict(REMOTE_ENV)}
