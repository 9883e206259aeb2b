"""SSHCluster: a scheduler and workers on other machines, started over SSH (asyncssh).

    cluster = SSHCluster(["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                         connect_options={"username": "me", "client_keys": ["~/.ssh/id"]},
                         worker_options={"nthreads": 4}, remote_python="/opt/venv/bin/python")

As in dask, the first host runs the scheduler and every further host one
worker process (a host may appear several times). Hosts, `connect_options`
and `remote_python` may be given per host (lists as long as `hosts`).

How a process is started: one SSH exec channel runs
`exec [env K=V...] REMOTE_PYTHON -c <launcher source> run ... -- REMOTE_PYTHON -m
taskcore.cli.worker ...`. The launcher (deploy/launcher.py, stdlib only) first
prints the PIDs, then relays the server's JSON ready line; nothing is ever
read out of log text. stderr streams back into each handle's bounded log
buffer (and to our stderr with `forward_logs=True`).

Failure modes, each a `ProcessStartError` naming the host, raised within
`connect_timeout`/`startup_timeout` and leaving nothing running (everything
already started is killed by PID):
- host unreachable or name unknown: "cannot connect over SSH";
- key rejected: "SSH authentication failed";
- remote Python missing: exit status 127 before the launcher ran;
- taskcore missing remotely: the server's own ImportError, recognised.

The dashboard: the client reaches the scheduler at its host's address (no
tunnel), so `dashboard_link` points there too, unless that address does not
answer for the dashboard; then the link is the local end of an SSH local port
forward (`dashboard_tunnel`, see SSHCluster).

Security: an attached cluster runs over tls:// by default, with throwaway
credentials (`Security.temporary()`, made here; the cluster's `security`, so
`Client(cluster)` uses them). Before anything starts on a host, its
credential files go there over the cluster's own SSH connection (an exec
channel running a stdlib script that reads them from stdin) into a
per-cluster directory, `~/.cache/taskcore/tls/<cluster>/` (created under
umask 077: the directory 0700, the files 0600, written atomically); the
remote processes get `--tls-*` options naming those copies. A token
(`Security(token=...)`, or TASKCORE_TOKEN here) goes into the same directory
and reaches the remote processes through their environment: the remote shell
reads the file (`TASKCORE_TOKEN="$(cat FILE)"`), so the token is never on a
command line. Closing removes the directory on every host (best effort,
logged). `security=False` runs plain tcp:// (with a warning unless a token
is set); a detached cluster (`shutdown_on_close=False`) stays on tcp:// and
refuses `security=`.

Closing kills by PID through a separate exec channel (`launcher kill`:
SIGTERM, grace, SIGKILL of the whole tree), so it works even when the SSH
server ignores channel signals. Attached processes also die on their own if
the SSH connection drops (the launcher sees EOF on stdin); detached ones
(`shutdown_on_close=False`) are handed off to a supervisor in its own session
with a capped log file under `~/.cache/taskcore/clusters/<name>/` on their host.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import shlex
import shutil
import uuid

from taskcore.deploy.cluster import _address_host, _direct_endpoint, tcp_answers
from taskcore.deploy.launched import (LaunchedScheduler, LaunchedWorker, ProcessStartError, Target,
                                      TargetSecurity)
from taskcore.deploy.spec import SpecCluster
from taskcore.security import TOKEN_ENV, Security, cluster_credentials, plain_tcp_warning

logger = logging.getLogger("taskcore.deploy.ssh")

__all__ = ["SSHCluster", "SSHTarget", "SSHConnections"]

_LAUNCHER_SOURCE: str | None = None
# Connection options that may be written to the registry (never secrets).
_SAFE_OPTIONS = {"port", "username", "client_keys", "known_hosts", "client_host_keys",
                 "config", "family", "local_addr", "agent_path", "x509_trusted_certs",
                 "keepalive_interval", "keepalive_count_max", "login_timeout"}


CREDENTIALS_ROOT = "~/.cache/taskcore/tls"

# Runs on the remote host as `PYTHON -c <this> write|remove DIR` (stdlib only, like the
# launcher). `write` reads {"files": {name: text}} on stdin and answers one JSON line with
# the absolute paths; nothing secret is ever on its command line.
_CREDENTIALS_SCRIPT = r"""
import json, os, shutil, stat, sys
op, d = sys.argv[1], os.path.abspath(os.path.expanduser(sys.argv[2]))
if op == "write":
    os.umask(0o077)
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        sys.exit("refusing %s: not a directory of this user" % d)
    os.chmod(d, 0o700)
    out = {}
    for name, text in json.load(sys.stdin)["files"].items():
        if os.sep in name or name.startswith("."):
            sys.exit("bad file name %r" % name)
        path = os.path.join(d, name)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        out[name] = path
    print(json.dumps({"dir": d, "files": out}))
elif op == "remove":
    existed = os.path.lexists(d)
    if os.path.islink(d):
        os.unlink(d)
    elif existed:
        shutil.rmtree(d)
    print(json.dumps({"dir": d, "removed": existed}))
else:
    sys.exit("unknown operation %r" % op)
"""


class _NoRemotePython(ProcessStartError):
    """The remote Python does not exist (exit status 127): nothing ran there."""


def _credentials_dir(cluster_name: str, unique: bool) -> str:
    """`~/.cache/taskcore/tls/<name>`: the name made safe as one path component, plus a
    random suffix unless the name is already unique (two clusters given the same name
    must not share, or remove, each other's credentials)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(cluster_name)).lstrip(".") or "cluster"
    if not unique:
        safe = f"{safe[:100]}-{uuid.uuid4().hex[:8]}"
    return f"{CREDENTIALS_ROOT}/{safe[:128]}"


def _asyncssh():
    try:
        import asyncssh
    except ImportError as e:
        raise ImportError("SSHCluster needs asyncssh: pip install 'taskcore[ssh]' "
                          "(the 'ssh' extra)") from e
    return asyncssh


def _launcher_source() -> str:
    global _LAUNCHER_SOURCE
    if _LAUNCHER_SOURCE is None:
        from taskcore.deploy import launcher

        _LAUNCHER_SOURCE = launcher.source()
    return _LAUNCHER_SOURCE


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _plain_options(options: dict) -> dict:
    """The registry-safe part of connect_options: JSON data, never passwords or key objects."""
    out = {}
    for k, v in (options or {}).items():
        if k not in _SAFE_OPTIONS:
            continue
        if k == "client_keys" and isinstance(v, (list, tuple)):
            if not all(isinstance(x, str) for x in v):
                continue
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------

class _Connection:
    __slots__ = ("conn", "channels")

    def __init__(self, conn):
        self.conn = conn
        self.channels = 0


class SSHConnections:
    """SSH connections per (host, options), shared by a cluster's handles.

    Each connection carries at most `max_channels` channels at once: OpenSSH's
    `MaxSessions` defaults to 10, and every attached process holds one channel
    for its whole life, so a host with many workers gets several connections.
    One pool per cluster: closing a connection ends every attached process
    started through it, so two clusters must never share one.
    """

    MAX_CHANNELS = 8  # below OpenSSH's default MaxSessions (10): room for kill/alive commands

    def __init__(self, max_channels: int | None = None):
        self.max_channels = max_channels or self.MAX_CHANNELS
        self._conns: dict = {}
        self._locks: dict = {}

    @staticmethod
    def _key(host, options):
        return host, json.dumps(options, sort_keys=True, default=repr)

    async def acquire(self, host: str, options: dict, timeout: float, label: str):
        """A connection with a free channel slot, and the function that gives the slot back."""
        key = self._key(host, options)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one connection attempt at a time per host
            entries = self._conns.setdefault(key, [])
            entries[:] = [e for e in entries if not e.conn.is_closed()]
            entry = next((e for e in entries if e.channels < self.max_channels), None)
            if entry is None:
                entry = _Connection(await self._connect(host, options, timeout, label))
                entries.append(entry)
            entry.channels += 1
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                entry.channels -= 1
        return entry.conn, release

    async def any(self, host: str, options: dict, timeout: float, label: str):
        conn, release = await self.acquire(host, options, timeout, label)
        release()
        return conn

    async def _connect(self, host, options, timeout, label):
        asyncssh = _asyncssh()
        try:
            return await asyncio.wait_for(asyncssh.connect(host, **options), timeout)
        except asyncio.TimeoutError:
            raise ProcessStartError(f"{label}: no SSH connection within {timeout} s (is the host "
                                    f"reachable and sshd listening?)") from None
        except asyncssh.PermissionDenied as e:
            user = options.get("username") or "the default user"
            raise ProcessStartError(f"{label}: SSH authentication failed for {user}: the server "
                                    f"rejected the key(s) ({e.reason})") from None
        except asyncssh.HostKeyNotVerifiable as e:
            raise ProcessStartError(f"{label}: SSH host key not verifiable ({e.reason}); add it "
                                    f"to known_hosts or pass connect_options={{'known_hosts': "
                                    f"None}} to skip the check") from None
        except (OSError, asyncssh.Error) as e:
            if isinstance(e, OSError):
                reason = e.strerror or str(e)
            else:
                reason = getattr(e, "reason", None) or str(e)
            raise ProcessStartError(f"{label}: cannot connect over SSH: {reason}") from None

    async def close(self):
        conns = [e.conn for entries in self._conns.values() for e in entries]
        self._conns = {}
        for c in conns:
            c.close()
        for c in conns:
            try:
                await asyncio.wait_for(c.wait_closed(), 5)
            except Exception:
                pass


class _SSHChannel:
    """An asyncssh process behind the channel API LaunchedProcess uses."""

    def __init__(self, proc, release):
        self.proc = proc
        self._release = release  # the channel slot on its connection

    @property
    def returncode(self):
        return self.proc.exit_status

    async def wait(self):
        try:
            await self.proc.wait_closed()
        finally:
            self._release()
        status = self.proc.exit_status
        if status is None or status < 0:
            # No status: the connection was lost, or the launcher died of a signal.
            return 255
        return status

    def close_stdin(self):
        try:
            self.proc.stdin.write_eof()
        except Exception:
            pass

    def abort(self):
        try:
            self.proc.close()
        except Exception:
            pass


class SSHTarget(Target):
    """A host reached over SSH; commands run as `exec [env ...] PYTHON -c LAUNCHER ...`."""

    kind = "ssh"

    def __init__(self, host: str, connect_options: dict | None = None,
                 remote_python: str | None = None, env: dict | None = None,
                 pool: SSHConnections | None = None, connect_timeout: float = 15,
                 credentials_dir: str | None = None):
        self.host = host
        self.connect_options = dict(connect_options or {})
        self.python = remote_python or "python3"
        self.env = self._check_env(dict(env or {}))
        self.pool = pool if pool is not None else SSHConnections()
        self.connect_timeout = connect_timeout
        # Where `credentials()` copies TLS files and tokens to (removed by
        # remove_credentials()); the cluster names it after itself.
        self.credentials_dir = credentials_dir or _credentials_dir("target", unique=False)
        self._shipped: dict = {}  # sha256 of a file's text -> its path on the host
        self._ship_lock: asyncio.Lock | None = None
        self._wrote = False  # a write was attempted: the directory may exist

    @staticmethod
    def _check_env(env: dict) -> dict:
        if TOKEN_ENV in env:
            raise ValueError(f"remote_env must not hold {TOKEN_ENV}: it would be on the remote "
                             f"command line (and in the registry). Give Security(token=...) "
                             f"(or set {TOKEN_ENV} here): it reaches remote processes through "
                             f"a private file and their environment")
        return env

    @property
    def label(self) -> str:
        user = self.connect_options.get("username")
        port = self.connect_options.get("port")
        return f"{user + '@' if user else ''}{self.host}{':' + str(port) if port else ''}"

    def __repr__(self):
        return f"<SSHTarget {self.label} python={self.python!r}>"

    async def connection(self):
        """Some connection to this host (for questions that open no channel)."""
        return await self.pool.any(self.host, self.connect_options, self.connect_timeout,
                                   self.label)

    async def _acquire(self):
        return await self.pool.acquire(self.host, self.connect_options, self.connect_timeout,
                                       self.label)

    def command(self, args, env=None, token_file: str | None = None) -> str:
        """The remote shell command running the launcher with `args`. With `token_file`,
        the shell reads TASKCORE_TOKEN from that file (never a command line) and refuses
        to start without it; a token in `env` is refused here (see open_channel)."""
        words = []
        merged = {**self.env, **(env or {})}
        if TOKEN_ENV in merged:
            raise ValueError(f"{TOKEN_ENV} must not be put on a remote command line (open_channel "
                             f"moves it into a private file)")
        if merged:
            words += ["env"] + [f"{k}={v}" for k, v in merged.items()]
        words += [self.python, "-c", _launcher_source(), *map(str, args)]
        command = "exec " + shlex.join(words)
        if token_file is None:
            return command
        # Shell builtins only between reading the file and the exec: the token is in no
        # process's argv. An unreadable or empty file stops here (never a server without it).
        path = shlex.quote(token_file)
        return (f'{TOKEN_ENV}="$(cat -- {path})" || exit 1; '
                f'case "${TOKEN_ENV}" in "") echo "taskcore: the token file is empty" >&2; '
                f'exit 1;; esac; export {TOKEN_ENV}; {command}')

    async def open_channel(self, args, env=None):
        asyncssh = _asyncssh()
        env = dict(env or {})
        token = env.pop(TOKEN_ENV, None)
        token_file = None
        if token:
            token_file = (await self._ship({"token": token}))["token"]
        command = self.command(args, env, token_file=token_file)
        conn, release = await self._acquire()
        try:
            proc = await conn.create_process(command, encoding=None)
        except (asyncssh.Error, OSError) as e:
            release()
            raise ProcessStartError(f"{self.label}: cannot start a remote command: {e}") from e
        except BaseException:
            release()
            raise
        return _SSHChannel(proc, release), proc.stdout, proc.stderr

    async def run_launcher(self, args, timeout: float = 60):
        """Run one launcher command to completion: its JSON output line."""
        conn, release = await self._acquire()
        try:
            result = await asyncio.wait_for(conn.run(self.command(args), check=False), timeout)
        finally:
            release()
        out = (result.stdout or "").strip().splitlines()
        if result.exit_status == 127 and not out:
            raise ProcessStartError(f"{self.label}: remote Python {self.python!r} not found "
                                    f"(exit status 127): {(result.stderr or '').strip()[:300]}")
        for line in reversed(out):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.label}: launcher {args[0]} gave no answer (exit status "
                           f"{result.exit_status}): {(result.stderr or '').strip()[:500]}")

    # -- credentials ----------------------------------------------------------------------------
    async def credentials(self, security):
        """Copy the Security's TLS files here (once per content) into `credentials_dir`;
        a TargetSecurity naming the copies. A Security without files is returned as is
        (its token travels through open_channel)."""
        if security is None or not getattr(security, "enabled", False):
            return security
        texts = {}
        for name, path in (("ca.pem", security.ca_file), ("cert.pem", security.cert_file),
                           ("key.pem", security.key_file)):
            with open(path) as f:
                texts[name] = f.read()
        paths = await self._ship(texts)
        return TargetSecurity(paths["ca.pem"], paths["cert.pem"], paths["key.pem"],
                              token=getattr(security, "token", None),
                              require_encryption=getattr(security, "require_encryption", True))

    async def _ship(self, files: dict) -> dict:
        """{name: text} -> {name: absolute path on the host}, writing only what is not there
        yet. Different content under a name already used gets a name of its own (processes
        started earlier, and their restarts, keep reading the first)."""
        if self._ship_lock is None:
            self._ship_lock = asyncio.Lock()
        async with self._ship_lock:
            out, todo = {}, {}
            used = {p.rsplit("/", 1)[-1] for p in self._shipped.values()}
            for name, text in files.items():
                digest = hashlib.sha256(text.encode()).hexdigest()
                if digest in self._shipped:
                    out[name] = self._shipped[digest]
                    continue
                remote_name = name if name not in used else f"{digest[:12]}-{name}"
                used.add(remote_name)
                todo[remote_name] = (name, digest, text)
            if todo:
                wrote, self._wrote = self._wrote, True
                try:
                    got = await self._credentials_op(
                        "write", {"files": {rn: t for rn, (_, _, t) in todo.items()}})
                except _NoRemotePython:
                    self._wrote = wrote  # nothing ran there: nothing to remove later
                    raise
                for remote_name, (name, digest, _) in todo.items():
                    self._shipped[digest] = out[name] = got["files"][remote_name]
            return out

    async def remove_credentials(self):
        """Remove `credentials_dir` from the host, if anything was written there."""
        if not self._wrote:
            return
        await self._credentials_op("remove", None)
        self._wrote = False
        self._shipped.clear()

    async def _credentials_op(self, op, payload):
        words = []
        if self.env:
            words += ["env"] + [f"{k}={v}" for k, v in self.env.items()]
        words += [self.python, "-c", _CREDENTIALS_SCRIPT, op, self.credentials_dir]
        asyncssh = _asyncssh()
        conn, release = await self._acquire()
        try:
            result = await asyncio.wait_for(
                conn.run("exec " + shlex.join(words), check=False,
                         input=None if payload is None else json.dumps(payload)),
                self.connect_timeout + 30)
        except asyncio.TimeoutError:
            raise ProcessStartError(f"{self.label}: {op} {self.credentials_dir} (TLS "
                                    f"credentials) timed out") from None
        except (asyncssh.Error, OSError) as e:
            raise ProcessStartError(f"{self.label}: cannot run a remote command: {e}") from e
        finally:
            release()
        err = (result.stderr or "").strip()[-500:]
        if result.exit_status == 127:
            raise _NoRemotePython(f"{self.label}: remote Python {self.python!r} not found "
                                  f"(exit status 127): {err[:300]}")
        lines = [ln for ln in (result.stdout or "").splitlines() if ln.startswith("{")]
        if result.exit_status != 0 or not lines:
            what = "write the TLS credentials to" if op == "write" else "remove"
            raise ProcessStartError(f"{self.label}: could not {what} {self.credentials_dir} "
                                    f"(exit status {result.exit_status}): {err}")
        return json.loads(lines[-1])

    async def kill(self, targets, grace=5.0, remove=()):
        args = ["kill", "--grace", str(grace)]
        for p in remove:
            args += ["--rm", p]
        args += [f"{p}:{'' if s is None else s}" for p, s in targets]
        return await self.run_launcher(args, timeout=grace + 30)

    async def alive(self, targets):
        got = await self.run_launcher(["alive"] + [f"{p}:{'' if s is None else s}"
                                                   for p, s in targets], timeout=30)
        return [bool(got.get(str(p))) for p, _ in targets]

    async def tail(self, paths, n=200):
        return await self.run_launcher(["tail", str(n), *paths], timeout=30)

    async def listen_host(self):
        conn = await self.connection()
        peer = conn.get_extra_info("peername")
        return peer[0] if peer else None

    def record(self):
        return {"kind": "ssh", "host": self.host,
                "connect_options": _plain_options(self.connect_options),
                "python": self.python, "env": self.env,
                "connect_timeout": self.connect_timeout}

    @classmethod
    def from_record(cls, record, context):
        """The target a record describes, on the rebuilding cluster's pool (`ssh_pool` in
        `context`), with `connect_options[host]` there replacing the recorded options (a
        password is never recorded). One object per host, options and python."""
        cache = context.setdefault("targets", {})
        key = ("ssh", record["host"], json.dumps(record.get("connect_options") or {},
                                                 sort_keys=True), record.get("python"))
        if key not in cache:
            override = (context.get("connect_options") or {}).get(record["host"])
            cache[key] = cls(record["host"],
                             connect_options=override or record.get("connect_options"),
                             remote_python=record.get("python"), env=record.get("env"),
                             pool=context.get("ssh_pool"),
                             connect_timeout=record.get("connect_timeout", 15))
        return cache[key]

    def explain_exit(self, code, stderr_tail, launched):
        if not launched and code == 127:
            return (f"{self.label}: remote Python {self.python!r} not found (exit status 127)"
                    f"{stderr_tail}")
        if not launched and code == 126:
            return f"{self.label}: remote Python {self.python!r} is not executable{stderr_tail}"
        if "No module named 'taskcore" in stderr_tail or "No module named taskcore" in stderr_tail:
            return (f"{self.label}: taskcore is not importable by the remote Python "
                    f"{self.python!r} (install it there, or set PYTHONPATH with remote_env=)"
                    f"{stderr_tail}")
        return None


# ---------------------------------------------------------------------------------------------
# SSHCluster
# ---------------------------------------------------------------------------------------------

def _per_host(value, n, what, kind):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} is a list of {len(value)}, but there are {n} hosts")
        return list(value)
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{what} must be a {kind.__name__} or a list of them, one per host")
    return [value] * n


_CUDA_CLASSES = ("taskcore.CUDAWorker", "taskcore.deploy.CUDAWorker",
                 "taskcore.deploy.cuda.CUDAWorker", "cuda")
# worker_options that only GPU workers take (left out for a CPU host of a mixed cluster).
_GPU_OPTIONS = ("CUDA_VISIBLE_DEVICES", "device_memory_limit", "rmm_pool_size",
                "rmm_managed_memory")


def _class_name(worker_class) -> str:
    if isinstance(worker_class, str):
        return worker_class
    return f"{getattr(worker_class, '__module__', '')}.{getattr(worker_class, '__name__', '')}"


def _worker_kind(worker_class) -> str:
    """"nanny" (a nanny-supervised worker), "worker" (a bare one) or "cuda" (core-cuda-worker:
    one nanny and worker per GPU of the host)."""
    name = _class_name(worker_class)
    if name in ("taskcore.Nanny", "taskcore.nanny.Nanny", "nanny"):
        return "nanny"
    if name in ("taskcore.Worker", "taskcore.worker.Worker", "worker"):
        return "worker"
    if name in _CUDA_CLASSES:
        return "cuda"
    raise ValueError(f"worker_class must be 'taskcore.Nanny', 'taskcore.Worker' or "
                     f"'taskcore.CUDAWorker' (or a list of them, one per host), got "
                     f"{worker_class!r}")


def _worker_kinds(worker_class, n: int) -> list:
    """One kind per host (the scheduler's entry included, and not used)."""
    if isinstance(worker_class, (list, tuple)):
        if len(worker_class) != n:
            raise ValueError(f"worker_class is a list of {len(worker_class)}, but there are "
                             f"{n} hosts")
        return [None if c is None else _worker_kind(c) for c in worker_class]
    return [_worker_kind(worker_class)] * n


class SSHCluster(SpecCluster):
    """Scheduler on `hosts[0]`, one worker process on each of `hosts[1:]`; see the module doc.

    `worker_options` go to `core-worker` (nthreads, memory_limit, resources,
    nworkers: several workers per host process, ...); `scheduler_options` to the
    Scheduler (port, idle_timeout, worker_ttl, ...). `remote_env` is set for
    every remote process. Further keyword arguments go to SpecCluster
    (close_timeout, retire_timeout, ...). `scale(n)` places new workers on the
    worker hosts with the fewest workers.

    GPU hosts: `worker_class="taskcore.CUDAWorker"` runs `core-cuda-worker` on each
    worker host instead (deploy/cuda.py): one nanny and worker per GPU there, each
    seeing its own device first, pinned to the CPUs near it and offering GPU=1, the
    devices found by that host's NVML. `worker_options` then also take
    `CUDA_VISIBLE_DEVICES` (the same on every GPU host; given, the cluster also counts
    one worker per device), `device_memory_limit`, `rmm_pool_size` and
    `rmm_managed_memory`; `nworkers` does not apply. `worker_class` may be a list, one
    per host like `connect_options` (the scheduler's entry is not used, and may be
    None), to mix CPU and GPU hosts; the GPU options are left out for the CPU ones.

    The scheduler serves its dashboard as `core-scheduler` does (port 8787 on its
    host; `scheduler_options={"dashboard_address": None}` for none, or
    `{"dashboard_address": "127.0.0.1:8787", "dashboard_prefix": "/tc"}`...).
    `dashboard_link` reaches it from here: directly at the scheduler host's address,
    or through an SSH tunnel (a local port on 127.0.0.1, open while this handle is)
    when `dashboard_tunnel=True`, or with the default None when the direct address
    does not answer (a firewall, a dashboard bound to the host's loopback).

    `security`: None (the default) makes throwaway TLS credentials
    (`Security.temporary()`) and runs everything over tls://; a `Security` is used as
    given (tls:// with its files, else tcp:// with its token); False runs plain
    tcp://. `cluster.security` is what clients here use (`Client(cluster)` takes it).
    The files are copied to each host before anything starts there and removed when
    the cluster closes; a token reaches remote processes only through their
    environment (see the module doc). Detached clusters (`shutdown_on_close=False`)
    run over tcp:// and refuse a `Security`.
    """

    backend = "ssh"

    def __init__(self, hosts=None, connect_options=None, worker_options=None,
                 scheduler_options=None, worker_class="taskcore.Nanny", remote_python=None, *,
                 remote_env: dict | None = None, name: str | None = None,
                 asynchronous: bool = False, shutdown_on_close: bool = True,
                 connect_timeout: float = 15, startup_timeout: float = 60,
                 close_grace: float = 5, forward_logs: bool = False,
                 log_level: str = "warning", dashboard_tunnel: bool | None = None,
                 security=None, **kwargs):
        _asyncssh()
        if dashboard_tunnel not in (None, True, False):
            raise TypeError(f"dashboard_tunnel must be None (auto), True or False, got "
                            f"{dashboard_tunnel!r}")
        self.dashboard_tunnel = dashboard_tunnel
        self._tunnel = None
        if isinstance(hosts, str) or not hosts:
            raise ValueError("SSHCluster needs a list of hosts: the scheduler's first, then the "
                             "workers'")
        hosts = list(hosts)
        n = len(hosts)
        options = _per_host(connect_options, n, "connect_options", dict)
        pythons = _per_host(remote_python, n, "remote_python", str)
        self.hosts = hosts
        self._kinds = _worker_kinds(worker_class, n)
        self.worker_class = [None if c is None else _class_name(c) for c in worker_class] \
            if isinstance(worker_class, (list, tuple)) else _class_name(worker_class)
        self.worker_options = dict(worker_options or {})
        self.scheduler_options = dict(scheduler_options or {})
        self.remote_env = dict(remote_env or {})
        self.connect_timeout = connect_timeout
        self.startup_timeout = startup_timeout
        self.close_grace = close_grace
        self.forward_logs = forward_logs
        self.log_level = log_level
        self._detached_processes = not shutdown_on_close
        SSHTarget._check_env(self.remote_env)
        named = name is not None
        if not shutdown_on_close:
            from taskcore.deploy import registry

            if name is None:
                name = f"sshcluster-{uuid.uuid4().hex[:8]}"
            registry.check_name(name)
        elif name is None:
            name = f"sshcluster-{uuid.uuid4().hex[:8]}"  # known now: it names the credentials
        self._own_credentials = None  # the local directory of credentials made here
        self.security, self._token = self._resolve_security(security, not shutdown_on_close,
                                                            name)
        self._pool = SSHConnections()
        self._targets = self._make_targets(hosts, options, pythons,
                                           _credentials_dir(name, unique=not named))
        scheduler, workers, template = self._specs(name, not shutdown_on_close)
        try:
            super().__init__(workers=workers, scheduler=scheduler, worker=template,
                             asynchronous=asynchronous, name=name,
                             shutdown_on_close=shutdown_on_close, **kwargs)
        except BaseException:
            self._remove_local_credentials()  # a failed sync start closed everything else
            raise

    # -- security -------------------------------------------------------------------------------
    def _resolve_security(self, security, detached, name):
        """(the Security clients here use, the token remote processes get); see
        `cluster_credentials`. A detached cluster stays on plain tcp://."""
        if detached:
            if isinstance(security, Security):
                raise ValueError("shutdown_on_close=False does not support TLS security yet "
                                 "(give security=False, or keep the cluster attached)")
            if security not in (None, False):
                raise TypeError(f"security must be None, a Security or False, got {security!r}")
            logger.warning(plain_tcp_warning(name, "a detached cluster runs over plain tcp://"))
            return None, None
        security, token, self._own_credentials = cluster_credentials(security, name,
                                                                     logger.warning)
        return security, token

    def _security_options(self) -> dict:
        """Options for the scheduler's and every worker's spec: the Security (its files
        reach each host before the process starts), and the token through the
        environment (never a command line; SSHTarget.open_channel)."""
        out = {}
        if self.security is not None:
            out["security"] = self.security
        if self._token is not None:
            out["env"] = {TOKEN_ENV: self._token}
        return out

    async def _remove_credentials(self):
        """Remove the credential directory from every host it reached (best effort), then
        the local one made here."""
        targets = list({id(t): t for t in self._targets}.values())

        async def one(t):
            try:
                await asyncio.wait_for(t.remove_credentials(), t.connect_timeout + 30)
            except Exception as e:
                self._log(logging.WARNING, "%s: could not remove the TLS credentials %s on "
                          "%s: %s", self.name, t.credentials_dir, t.label, e)
        await asyncio.gather(*(one(t) for t in targets))
        self._remove_local_credentials()

    def _remove_local_credentials(self):
        path, self._own_credentials = getattr(self, "_own_credentials", None), None
        if path:
            shutil.rmtree(path, ignore_errors=True)

    # -- building specs -------------------------------------------------------------------------
    def _make_targets(self, hosts, options, pythons, credentials_dir=None):
        """One SSHTarget per distinct (host, options, python), all on this cluster's pool."""
        seen = {}
        out = []
        for h, o, p, k in zip(hosts, options, pythons, self._kinds):
            # The kind too: CPU and GPU workers on one host are two targets (one pool).
            key = (h, json.dumps(o or {}, sort_keys=True, default=repr), p, k)
            if key not in seen:
                seen[key] = SSHTarget(h, o, p, env=self.remote_env, pool=self._pool,
                                      connect_timeout=self.connect_timeout,
                                      credentials_dir=credentials_dir)
            out.append(seen[key])
        self._target_kinds = self._kinds_by_target(out)
        return out

    def _kinds_by_target(self, targets) -> dict:
        """{id(target): worker kind} for the worker hosts."""
        kinds = {}
        for i, (t, k) in enumerate(zip(targets, self._kinds)):
            if i == 0 and len(targets) > 1:
                continue  # the scheduler's host (a worker host too only when it is alone)
            if k is None:
                raise ValueError(f"worker_class for worker host {t.host!r} is None")
            if kinds.setdefault(id(t), k) != k:
                # Only after from_name: the registry keeps one target per host. The host's
                # first kind is used for workers started from now on.
                logger.warning("%s: host %s has CPU and GPU workers; new ones there are %s",
                               getattr(self, "name", "SSHCluster"), t.host, kinds[id(t)])
        return kinds

    @property
    def nanny(self) -> bool:
        """Whether workers run under nannies (every GPU worker does)."""
        return all(k != "worker" for k in self._target_kinds.values())

    @property
    def _worker_targets(self):
        return self._targets[1:] or self._targets[:1]

    def _log_root(self, name):
        return f"~/.cache/taskcore/clusters/{name}"

    def _worker_template(self, target, detached, name):
        opts = dict(self.worker_options)
        kinds = getattr(self, "_target_kinds", {})
        kind = kinds.get(id(target)) if target is not None else \
            (next(iter(kinds.values())) if kinds else "nanny")
        if kind == "cuda":
            return self._cuda_template(opts, target, detached, name)
        for k in _GPU_OPTIONS:  # a CPU host of a mixed cluster
            opts.pop(k, None)
        nworkers = opts.pop("nworkers", None) or 1
        spec_opts = dict(opts, target=target, nanny=kind != "worker", detach=detached,
                         log_level=self.log_level, startup_timeout=self.startup_timeout,
                         close_grace=self.close_grace, forward_logs=self.forward_logs)
        for k, v in self._security_options().items():
            spec_opts.setdefault(k, v)
        if detached:
            spec_opts["log_dir"] = self._log_root(name)
        if nworkers > 1:
            spec_opts["nworkers"] = nworkers
        spec = {"cls": LaunchedWorker, "options": spec_opts}
        if nworkers > 1:
            spec["group"] = [f"-{i}" for i in range(nworkers)]  # core-worker names NAME-i
        return spec

    def _cuda_template(self, opts, target, detached, name):
        """A GPU host: one `core-cuda-worker` (deploy/cuda.py), one worker per GPU there."""
        from taskcore.deploy.cuda import LaunchedCUDAWorker, launched_group

        if opts.pop("nworkers", None) not in (None, 1):
            raise ValueError("worker_options nworkers does not apply to GPU hosts: "
                             "core-cuda-worker runs one worker per GPU")
        spec_opts = dict(opts, target=target, detach=detached, log_level=self.log_level,
                         startup_timeout=self.startup_timeout, close_grace=self.close_grace,
                         forward_logs=self.forward_logs)
        for k, v in self._security_options().items():
            spec_opts.setdefault(k, v)
        if detached:
            spec_opts["log_dir"] = self._log_root(name)
        spec = {"cls": LaunchedCUDAWorker, "options": spec_opts}
        group = launched_group(opts)
        if group:
            spec["group"] = group
        return spec

    def _specs(self, name, detached):
        sched = dict(self.scheduler_options)
        listen_any = any(not _is_loopback(h) for h in self.hosts[1:])
        sopts = dict(sched, target=self._targets[0], detach=detached, listen_any=listen_any,
                     log_level=self.log_level, startup_timeout=self.startup_timeout,
                     close_grace=self.close_grace, forward_logs=self.forward_logs)
        for k, v in self._security_options().items():
            sopts.setdefault(k, v)
        if self.security is not None and self.security.enabled:
            sopts.setdefault("protocol", "tls")
        if detached:
            sopts["log_file"] = f"{self._log_root(name)}/scheduler.log"
        scheduler = {"cls": LaunchedScheduler, "options": sopts}
        workers = {i: self._worker_template(t, detached, name)
                   for i, t in enumerate(self._targets[1:])}
        template = self._worker_template(None, detached, name)
        return scheduler, workers, template

    def _template_for(self, worker_group=None):
        spec = super()._template_for(worker_group)
        if spec["options"].get("target") is None:
            target = self._least_loaded_target()
            if worker_group is None and len(set(self._target_kinds.values())) > 1:
                # Mixed CPU and GPU hosts: the new worker is of its host's kind.
                return self._worker_template(target, self._detachable(), self.name)
            spec["options"]["target"] = target
        return spec

    def _least_loaded_target(self):
        counts = {id(t): 0 for t in self._worker_targets}
        for s in self.worker_spec.values():
            t = (s.get("options") or {}).get("target")
            if id(t) in counts:
                counts[id(t)] += 1
        return min(self._worker_targets, key=lambda t: counts[id(t)])

    # -- the dashboard ------------------------------------------------------------------------
    async def _open_dashboard_route(self, info):
        """Tunnel the dashboard over the scheduler host's SSH connection when it must be:
        always with dashboard_tunnel=True; with None (auto) when its address does not
        answer from here (a firewall, or a dashboard bound to the host's loopback)."""
        if self.dashboard_tunnel is False:
            return
        host, port = _direct_endpoint(info, _address_host(self.scheduler_address))
        if self.dashboard_tunnel is None and await tcp_answers(host, port):
            return
        bound = info.get("dashboard_host") or ""
        # On the scheduler's host: its own bind address, or its loopback for a wildcard.
        dest = "::1" if bound == "::" else "127.0.0.1" if bound in ("", "0.0.0.0") else bound
        conn = await self.scheduler.target.connection()
        self._tunnel = await conn.forward_local_port("127.0.0.1", 0, dest, int(port))
        self._log(logging.INFO, "%s: tunnelling the dashboard from 127.0.0.1:%d to %s:%d on "
                  "%s", self.name, self._tunnel.get_port(), dest, port,
                  self.scheduler.target.label)

    def _dashboard_route(self, info):
        if self._tunnel is None:
            return super()._dashboard_route(info)
        return {**info, "dashboard_host": "127.0.0.1",
                "dashboard_port": self._tunnel.get_port()}, "127.0.0.1"

    async def _close_dashboard_route(self):
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.close()
            await tunnel.wait_closed()

    # -- lifecycle ------------------------------------------------------------------------------
    async def _close(self):
        try:
            await super()._close()
        finally:
            await self._remove_credentials()  # every process is gone: nothing reads them now

    async def _release(self):
        await super()._release()
        await self._pool.close()

    # -- registry -------------------------------------------------------------------------------
    def _detachable(self) -> bool:
        return bool(getattr(self, "_detached_processes", not self.shutdown_on_close))

    def _registry_config(self):
        return {"kind": "ssh", "hosts": self.hosts,
                "targets": [t.record() for t in self._targets],
                "worker_options": self.worker_options, "worker_class": self.worker_class,
                "scheduler_options": self.scheduler_options, "remote_env": self.remote_env,
                "connect_timeout": self.connect_timeout, "startup_timeout": self.startup_timeout,
                "close_grace": self.close_grace, "log_level": self.log_level,
                "dashboard_tunnel": self.dashboard_tunnel}

    def _restore(self, config, connect_options=None, forward_logs=False, **kwargs):
        """`connect_options` (a dict, or a list per host) replaces the recorded ones, for
        instance to supply a password that was never written to the registry."""
        cfg = config
        self.hosts = list(cfg.get("hosts") or [])
        self.worker_class = cfg.get("worker_class", "taskcore.Nanny")
        self._kinds = _worker_kinds(self.worker_class, len(self.hosts))
        self.worker_options = dict(cfg.get("worker_options") or {})
        self.scheduler_options = dict(cfg.get("scheduler_options") or {})
        self.remote_env = dict(cfg.get("remote_env") or {})
        self.connect_timeout = cfg.get("connect_timeout", 15)
        self.startup_timeout = cfg.get("startup_timeout", 60)
        self.close_grace = cfg.get("close_grace", 5)
        self.forward_logs = forward_logs
        self.log_level = cfg.get("log_level", "warning")
        self.dashboard_tunnel = cfg.get("dashboard_tunnel")
        self._tunnel = None
        self._detached_processes = True
        self.security, self._token, self._own_credentials = None, None, None  # detached: tcp
        self._pool = SSHConnections()
        overrides = {}
        if connect_options is not None:
            per_host = _per_host(connect_options, len(self.hosts), "connect_options", dict)
            overrides = {h: o for h, o in zip(self.hosts, per_host) if o}
        context = dict(super()._restore(config, **kwargs), ssh_pool=self._pool,
                       connect_options=overrides)
        self._targets = [SSHTarget.from_record(rec, context) for rec in cfg.get("targets") or []]
        self._target_kinds = self._kinds_by_target(self._targets)
        return context
