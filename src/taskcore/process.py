"""Processes of taskcore programs as async objects: the interface, its states, local children.

This is the layer that both the nanny and the deployment code (deploy/) stand
on, so it imports nothing from either:

- `Status`: the lifecycle of clusters, process interfaces and nannies;
- `ProcessInterface`: one scheduler or worker "process" somewhere, as an async
  object (the handles a SpecCluster holds);
- `Subprocess`: a local child process that reports readiness with a JSON line;
- `ProcessStartError` / `ProcessGone`: starting (or adopting) one failed;
- `worker_cli_args` / `scheduler_cli_args`: the argv of taskcore's own programs.

They are still importable from the deploy modules that used to define them
(deploy.cluster, deploy.spec, deploy.process, deploy.launched), and the
public classes from `taskcore.deploy`.

Subprocess
----------
A taskcore program reports readiness by printing one JSON object on stdout,
`{"event": "ready", "role": ..., "address": ..., "pid": ...}`. We never look
at log text to decide anything: stdout lines that are not the ready line, and
all of stderr, only go into a bounded log buffer (`.logs`, optionally echoed
to our own stderr).

Cleanup is layered, because a leaked worker process is the classic failure
of local clusters:
- `close()`: SIGTERM, then SIGKILL after a grace period;
- an atexit hook kills whatever is still running when the interpreter exits;
- on Linux the child gets PR_SET_PDEATHSIG(SIGTERM), so even a SIGKILLed
  parent takes its children with it.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import enum
import json
import logging
import os
import signal
import sys
import time
import weakref

from taskcore.member import ClusterMember, dashboard_fields

__all__ = ["Status", "ProcessInterface", "ProcessStartError", "ProcessGone", "Subprocess",
           "read_lines", "worker_cli_args", "scheduler_cli_args", "security_cli_args"]

# The name it had in deploy/process.py, so logging configured for it still applies.
logger = logging.getLogger("taskcore.deploy.process")

MAX_LINE = 64 * 1024  # a longer line is cut; one runaway line must not exhaust memory


# ---------------------------------------------------------------------------------------------
# Lifecycle and the process interface
# ---------------------------------------------------------------------------------------------

class Status(str, enum.Enum):
    """Lifecycle of clusters and process interfaces. A str, so `status == "running"` works."""

    created = "created"
    starting = "starting"
    running = "running"
    closing = "closing"
    closed = "closed"
    failed = "failed"

    def __str__(self):
        return self.value


class ProcessInterface(ClusterMember):
    """One scheduler or worker "process" somewhere, as an async object: a `ClusterMember`.

    Subclasses override `start()` (set `self.address`, then call
    `await super().start()`) and `close()` (stop it, then `await super().close()`).
    `finished()` resolves once the process is gone, whether closed by us or not.
    `info` is the process's ready message once it has one (taskcore/member.py lists
    the optional hooks a subclass may override).
    """

    info: dict | None = None

    def __init__(self, scheduler: str | None = None, name=None):
        self.scheduler = scheduler  # the scheduler's address, for workers
        self.name = name
        self.address: str | None = None
        self.external_address: str | None = None
        self.status = Status.created
        self._finished = asyncio.Event()

    async def start(self):
        self.status = Status.running
        return self

    async def close(self):
        self.status = Status.closed
        self._finished.set()

    async def finished(self):
        await self._finished.wait()

    def __await__(self):
        return self.start().__await__()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    @property
    def dashboard_info(self) -> dict | None:
        return dashboard_fields(self.info)

    @property
    def dashboard_address(self) -> str | None:
        d = self.dashboard_info
        if d is not None:
            port = d.get("dashboard_port")
            return f"{d.get('dashboard_host') or ''}:{port}" if port else None
        info = self.info or {}
        return info.get("dashboard_address") or info.get("dashboard")

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name!r} address={self.address!r} "
                f"status={self.status.value}>")


class ProcessStartError(RuntimeError):
    """The child exited, or said nothing usable, before printing its ready line."""


class ProcessGone(ProcessStartError):
    """A recorded process (to adopt) is no longer running."""


# ---------------------------------------------------------------------------------------------
# Cleanup at exit and on parent death
# ---------------------------------------------------------------------------------------------

_live: "weakref.WeakSet[Subprocess]" = weakref.WeakSet()
_atexit_registered = False


def _kill_all_at_exit(grace: float = 2.0) -> None:
    """Terminate every child still running when the interpreter exits (SIGTERM, then SIGKILL)."""
    pids = []
    for p in list(_live):
        pid = p.pid
        if pid is not None and p._exit_code is None:
            pids.append(pid)
    if not pids:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    remaining = set(pids)
    while remaining and time.monotonic() < deadline:
        for pid in list(remaining):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere, or not our child
                done = pid if not _pid_alive(pid) else 0
            if done:
                remaining.discard(pid)
        if remaining:
            time.sleep(0.02)
    for pid in remaining:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError, PermissionError):
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_kill_all_at_exit)
        _atexit_registered = True


_register_atexit()  # at import: earlier than any cluster's hook, so it runs after them


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


async def read_lines(stream, on_line, max_line: int = MAX_LINE):
    """Split a byte stream into lines for `on_line(str)`, without trusting the writer.

    `stream.read(n)` must return bytes (b"" at EOF): asyncio StreamReaders and
    asyncssh readers opened with encoding=None both qualify. A line longer than
    `max_line` is cut, so one runaway line cannot exhaust memory.
    """
    buf = bytearray()
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > max_line:
                    on_line(bytes(buf[:max_line]).decode(errors="replace") + " [cut]")
                    del buf[:]
                break
            line = bytes(buf[:i]) if i <= max_line else bytes(buf[:max_line]) + b" [cut]"
            del buf[:i + 1]
            on_line(line.decode(errors="replace").rstrip("\r"))
    if buf:
        on_line(bytes(buf[:max_line]).decode(errors="replace"))


# ---------------------------------------------------------------------------------------------
# Subprocess
# ---------------------------------------------------------------------------------------------

class Subprocess(ProcessInterface):
    """Runs `args` as a child process; `start()` returns once it printed its ready line.

    After start, `.info` is the ready message, `.address` its "address", `.pid` the
    child's pid. `.logs` is a bounded deque of the child's stderr (and stray stdout)
    lines. `finished()` resolves when the process has exited; `.returncode` is then
    its exit status (negative: killed by that signal).
    """

    def __init__(self, args, *, env=None, name=None, cwd=None, role=None, scheduler=None,
                 startup_timeout: float = 60, close_grace: float = 5, logs=None,
                 log_capacity: int = 1000, forward_stderr: bool = False,
                 kill_with_parent: bool = True, new_session: bool = True,
                 kill_at_exit: bool = True, pass_fds=()):
        super().__init__(scheduler=scheduler, name=name)
        self.args = [str(a) for a in args]
        self.pass_fds = tuple(pass_fds)     # inherited by the child under the same numbers
        self.env = env
        self.cwd = cwd
        self.role = role
        self.startup_timeout = startup_timeout
        self.close_grace = close_grace
        self.logs = logs if logs is not None else collections.deque(maxlen=log_capacity)
        self.forward_stderr = forward_stderr
        self.kill_with_parent = kill_with_parent
        # In its own session the child does not get the terminal's Ctrl-C (which goes to the
        # whole foreground process group): interrupting the user's script must not kill the
        # cluster's workers behind the owner's back. The owner stops them, and the
        # parent-death signal covers the owner dying.
        self.new_session = new_session
        # False for processes meant to outlive us (detached clusters): the atexit hook skips them.
        self.kill_at_exit = kill_at_exit
        self.info: dict | None = None
        self.proc = None
        self._exit_code = None
        self._ready: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._waiter: asyncio.Task | None = None
        self._closing = False

    # -- introspection ------------------------------------------------------------------------
    @property
    def pid(self):
        return None if self.proc is None else self.proc.pid

    @property
    def returncode(self):
        return self._exit_code

    def __repr__(self):
        prog = " ".join(self.args[:4]) + (" ..." if len(self.args) > 4 else "")
        return (f"<{type(self).__name__} {self.name!r} pid={self.pid} status={self.status.value} "
                f"address={self.address!r} cmd={prog!r}>")

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self):
        if self.proc is not None:
            return self
        self.status = Status.starting
        loop = asyncio.get_running_loop()
        env = None
        if self.env:
            env = dict(os.environ)
            env.update({str(k): str(v) for k, v in self.env.items()})
        _register_atexit()
        self._ready = loop.create_future()
        preexec = _set_parent_death_signal if (self.kill_with_parent
                                                and sys.platform.startswith("linux")) else None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=self.cwd, preexec_fn=preexec,
                start_new_session=self.new_session, pass_fds=self.pass_fds)
        except OSError as e:
            self.status = Status.failed
            self._finished.set()
            raise ProcessStartError(f"could not launch {self.args[0]!r}: {e}") from e
        if self.kill_at_exit:
            _live.add(self)
        self._tasks = [
            asyncio.ensure_future(read_lines(self.proc.stdout, self._on_stdout_line)),
            asyncio.ensure_future(read_lines(self.proc.stderr, self._on_stderr_line)),
        ]
        self._waiter = asyncio.ensure_future(self._wait_exit())
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready), self.startup_timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise ProcessStartError(
                f"{self._label()} did not report ready within {self.startup_timeout} s"
                f"{self._stderr_tail()}") from None
        except ProcessStartError:
            await self.close()  # a no-op wait when it already exited; a kill when it lied
            self.status = Status.failed
            raise
        except asyncio.CancelledError:
            await asyncio.shield(self.close())
            raise
        self.info = info
        self.address = info.get("address")
        if self.name is None:
            self.name = info.get("name")
        if self.status is Status.starting:
            self.status = Status.running
        return self

    async def close(self, grace: float | None = None):
        """SIGTERM, wait up to `grace` seconds (default `close_grace`), then SIGKILL."""
        if self.proc is None:
            self.status = Status.closed
            self._finished.set()
            return
        self._closing = True
        if self.status not in (Status.closed, Status.failed):
            self.status = Status.closing
        grace = self.close_grace if grace is None else grace
        if self._exit_code is None:
            self.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._waiter), grace)
            except asyncio.TimeoutError:
                logger.warning("%s did not exit %.1f s after SIGTERM; killing it",
                               self._label(), grace)
                self.kill()
        await asyncio.shield(self._waiter)

    def send_signal(self, sig) -> None:
        if self.proc is not None and self._exit_code is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL now, without waiting (`finished()` resolves once it is reaped)."""
        self.send_signal(signal.SIGKILL)

    async def fetch_logs(self, n: int = 1000) -> list:
        return list(self.logs)[-n:]

    # -- internals ----------------------------------------------------------------------------
    def _label(self):
        return f"process {self.name or self.args[0]!r} (pid {self.pid})"

    def _stderr_tail(self, n: int = 15) -> str:
        lines = list(self.logs)[-n:]
        if not lines:
            return ""
        return "; last output:\n  " + "\n  ".join(lines)

    def _on_stdout_line(self, line: str):
        ready = self._ready
        if ready is not None and not ready.done() and line.lstrip().startswith("{"):
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if isinstance(msg, dict) and msg.get("event") == "ready":
                if self.role is not None and msg.get("role") != self.role:
                    ready.set_exception(ProcessStartError(
                        f"{self._label()} reported role {msg.get('role')!r}, expected {self.role!r}"))
                elif not isinstance(msg.get("address"), str):
                    ready.set_exception(ProcessStartError(
                        f"{self._label()} sent a ready line without an address: {line[:200]}"))
                else:
                    ready.set_result(msg)
                return
        self.logs.append(line)

    def _on_stderr_line(self, line: str):
        self.logs.append(line)
        if self.forward_stderr:
            try:
                sys.stderr.write(line + "\n")
            except Exception:
                pass

    async def _wait_exit(self):
        # No try/finally: when the loop is torn down with the child still running, it must
        # stay in `_live` so the atexit hook can still terminate it.
        code = await self.proc.wait()
        _live.discard(self)
        self._exit_code = code
        # Let the readers drain what the child wrote last (its error message, typically),
        # but do not hang on grandchildren that inherited the pipes.
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 2)
        except asyncio.TimeoutError:
            for t in self._tasks:
                t.cancel()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ProcessStartError(
                f"{self._label()} exited with {_describe_exit(code)} before it was ready"
                f"{self._stderr_tail()}"))
            self._ready.exception()  # mark retrieved: start() may already have given up
        if self._closing or code == 0:
            self.status = Status.closed
        else:
            self.status = Status.failed
            logger.debug("%s exited with %s", self._label(), _describe_exit(code))
        self._finished.set()
        return code


def _describe_exit(code) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------------------------
# Command lines for taskcore's own programs
# ---------------------------------------------------------------------------------------------

def _fmt_number(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def security_cli_args(security) -> list[str]:
    if security is None or not getattr(security, "enabled", False):
        return []
    return ["--tls-ca-file", security.ca_file, "--tls-cert", security.cert_file,
            "--tls-key", security.key_file]


def worker_cli_args(scheduler_address, *, nanny: bool = False, nthreads=None, memory_limit=None,
                    name=None, resources=None, local_directory=None, death_timeout=None,
                    lifetime=None, lifetime_stagger=None, protocol=None, host=None,
                    interface=None, security=None, nanny_address=None, log_level=None,
                    nworkers=None, python=None, **worker_kwargs) -> list[str]:
    """The argv that runs `core-worker` with these options (`python -m`, no PATH lookup)."""
    args = [python or sys.executable, "-m", "taskcore.cli.worker", scheduler_address,
            "--nanny" if nanny else "--no-nanny"]
    if nthreads is not None:
        args += ["--nthreads", str(int(nthreads))]
    if nworkers is not None:
        args += ["--nworkers", str(nworkers)]
    if memory_limit is None:
        limit = "0"  # explicit "no limit": the worker's own default would be "auto"
    elif isinstance(memory_limit, str):
        limit = memory_limit
    elif isinstance(memory_limit, float) and 0 < memory_limit <= 1:
        limit = repr(memory_limit)  # a fraction of system memory
    else:
        limit = str(int(memory_limit))
    args += ["--memory-limit", limit]
    if name is not None:
        args += ["--name", str(name)]
    if resources:
        if isinstance(resources, str):
            text = resources
        else:
            text = ",".join(f"{k}={_fmt_number(v)}" for k, v in resources.items())
        args += ["--resources", text]
    if local_directory is not None:
        args += ["--local-directory", str(local_directory)]
    if death_timeout is not None:
        args += ["--death-timeout", str(death_timeout)]
    if lifetime is not None:
        args += ["--lifetime", str(lifetime)]
    if lifetime_stagger:
        args += ["--lifetime-stagger", str(lifetime_stagger)]
    if protocol is not None:
        args += ["--protocol", protocol]
    if host is not None:
        args += ["--host", host]
    if interface is not None:
        args += ["--interface", interface]
    if nanny_address is not None:
        args += ["--nanny-address", nanny_address]
    if log_level is not None:
        args += ["--log-level", log_level]
    args += security_cli_args(security)
    return args + _json_options("worker", worker_kwargs)


def cuda_worker_cli_args(scheduler_address, *, device_memory_limit=None, cuda_visible_devices=None,
                         **options) -> list[str]:
    """The argv that runs `core-cuda-worker` (one nanny and worker per visible GPU) with
    core-worker's options (`worker_cli_args`'s names) plus the GPU ones."""
    args = worker_cli_args(scheduler_address, nanny=True, **options)
    args[2] = "taskcore.cli.cuda_worker"
    args.remove("--nanny")      # every GPU worker has its nanny
    if device_memory_limit is not None:
        args += ["--device-memory-limit", str(device_memory_limit)]
    if cuda_visible_devices is not None:
        devices = cuda_visible_devices
        if not isinstance(devices, str):
            devices = ",".join(str(d) for d in devices)
        args += ["--cuda-visible-devices", devices]
    return args


def _json_options(role, options):
    """`--<role>-options JSON` for the options that have no flag of their own."""
    if not options:
        return []
    try:
        blob = json.dumps(options)
    except TypeError as e:
        raise TypeError(
            f"{role} options must be JSON-serializable to reach a {role} process: {e} "
            f"(options: {sorted(options)})") from None
    return [f"--{role}-options", blob]


_DEFAULT = object()  # an option not given: the program's own default applies


def scheduler_cli_args(*, host=None, port=0, protocol=None, security=None, idle_timeout=None,
                       scheduler_file=None, log_level=None, python=None,
                       dashboard_address=_DEFAULT, dashboard_prefix=None,
                       **scheduler_options) -> list[str]:
    """The argv that runs `core-scheduler`; other options travel as JSON (`--scheduler-options`).

    `dashboard_address`: "[HOST]:PORT" (an empty host is the scheduler's), None for no
    dashboard, or not given for core-scheduler's default (:8787)."""
    args = [python or sys.executable, "-m", "taskcore.cli.scheduler", "--port", str(int(port))]
    if host is not None:
        args += ["--host", host]
    if dashboard_address is None:
        args.append("--no-dashboard")
    elif dashboard_address is not _DEFAULT:
        if isinstance(dashboard_address, bool) or not isinstance(dashboard_address, (str, int)):
            raise TypeError(f"dashboard_address must be a string like ':8787' or None, got "
                            f"{dashboard_address!r}")
        args += ["--dashboard-address", str(dashboard_address)]
    if dashboard_prefix:
        args += ["--dashboard-prefix", str(dashboard_prefix)]
    if protocol is not None:
        args += ["--protocol", protocol]
    if idle_timeout is not None:
        args += ["--idle-timeout", str(idle_timeout)]
    if scheduler_file is not None:
        args += ["--scheduler-file", scheduler_file]
    if log_level is not None:
        args += ["--log-level", log_level]
    return args + _json_options("scheduler", scheduler_options) + security_cli_args(security)
