"""Servers started through the launcher (deploy/launcher.py), here or on another machine.

Two objects split the work:

- a **Target** says *where* commands run: `LocalTarget` (this machine) or
  `SSHTarget` (deploy/ssh.py). It opens a launcher channel (a process whose
  stdin/stdout/stderr we hold) and runs short launcher commands (kill, alive,
  tail). Targets are shared by every handle of a cluster, so `deepcopy`
  returns the same object: specs are deep-copied on scale-up, connections are not.
- a **LaunchedProcess** is the ProcessInterface for one scheduler or worker
  process: it reads the launcher's `launched` line (PIDs, known before the
  server is ready), then the server's JSON ready line. Nothing is ever parsed
  out of log text.

Attached vs detached: attached processes die when their channel closes (the
launcher watches stdin), detached ones are handed off to a supervisor in its
own session and keep running after we exit; `record()` describes them for the
registry, and a handle made with `record=` adopts a running process instead of
starting one (`from_name`).

Closing always kills by PID (TERM, then KILL of the whole process tree after a
grace period) through the target, whatever the channel is doing.

Credentials: a scheduler or worker given `security=` gets `--tls-*` options
naming the files *as its target sees them* (`Target.credentials`: the same
paths locally; an SSHTarget first copies the files to its host, once, and
names the copies). A token in the Security reaches the process through its
environment (TASKCORE_TOKEN), never its command line (an SSHTarget moves it
into a private file on the host, read by the remote shell).
"""
from __future__ import annotations

import abc
import asyncio
import collections
import json
import logging
import os
import socket
import sys

from taskcore.process import (ProcessGone, ProcessInterface, ProcessStartError, Status,
                              _describe_exit, read_lines, scheduler_cli_args, worker_cli_args)
from taskcore.security import TOKEN_ENV

logger = logging.getLogger("taskcore.deploy")

__all__ = ["Target", "LocalTarget", "LaunchedProcess", "LaunchedScheduler", "LaunchedWorker",
           "ProcessGone", "TargetSecurity"]

# ProcessGone (a recorded process to adopt is no longer running) is defined in taskcore.process,
# next to ProcessStartError, so that deploy/spec.py can catch it without importing this module.


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------

class TargetSecurity:
    """A Security's TLS files as another machine sees them: paths *there* (so not checked
    here, unlike `Security`), with the same token. Only for building command lines
    (`security_cli_args`); never used to open a connection from this process."""

    def __init__(self, ca_file, cert_file, key_file, token=None, require_encryption=True):
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.token = token
        self.require_encryption = require_encryption

    @property
    def enabled(self):
        return bool(self.ca_file and self.cert_file and self.key_file)

    def __repr__(self):
        return (f"TargetSecurity(ca_file={self.ca_file!r}, cert_file={self.cert_file!r}, "
                f"key_file={self.key_file!r}{', token=<hidden>' if self.token else ''})")


class Target(abc.ABC):
    """Where launcher commands run. Subclasses: LocalTarget, ssh.SSHTarget."""

    kind = "abstract"
    python: str = sys.executable

    @property
    def label(self) -> str:
        return self.kind

    def __deepcopy__(self, memo):
        return self  # shared by all handles: never copy connections

    @abc.abstractmethod
    async def open_channel(self, args: list, env: dict | None = None):
        """Start `launcher ARGS...`; returns (channel, stdout reader, stderr reader)."""

    @abc.abstractmethod
    async def kill(self, targets, grace: float = 5.0, remove=()) -> dict:
        """`launcher kill`: TERM, grace, KILL of each (pid, start time) and its tree."""

    @abc.abstractmethod
    async def alive(self, targets) -> list[bool]:
        """Whether each (pid, start time) still runs there."""

    @abc.abstractmethod
    async def tail(self, paths, n: int = 200) -> dict:
        """{path: its last n lines} of files there."""

    async def listen_host(self) -> str | None:
        """An address of this target that the manager reaches it on (None: no opinion)."""
        return None

    async def credentials(self, security):
        """`security` as processes started here see it: the paths of its TLS files there.
        This machine: unchanged. A remote target copies the files first (once) and
        returns a `TargetSecurity` naming the copies."""
        return security

    async def remove_credentials(self) -> None:
        """Remove what `credentials` (or a token) copied to the target (best effort)."""

    def record(self) -> dict:
        return {"kind": self.kind}

    async def close(self) -> None:
        pass

    def explain_exit(self, code, stderr_tail: str, launched: bool) -> str | None:
        """A clearer message for a launcher that failed before it was ready, or None."""
        return None


class LocalTarget(Target):
    """This machine. Launcher commands run in-process (kill/alive/tail) or as a child (run)."""

    kind = "local"

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable

    @property
    def label(self) -> str:
        return f"localhost ({socket.gethostname()})"

    async def open_channel(self, args, env=None):
        from taskcore.deploy import launcher

        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update({str(k): str(v) for k, v in env.items()})
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, launcher.__file__, *args, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env,
                start_new_session=True)
        except OSError as e:
            raise ProcessStartError(f"{self.label}: cannot run {self.python!r}: {e}") from e
        return _LocalChannel(proc), proc.stdout, proc.stderr

    async def kill(self, targets, grace=5.0, remove=()):
        from taskcore.deploy import launcher

        return await asyncio.get_running_loop().run_in_executor(
            None, launcher.kill, list(targets), grace, list(remove))

    async def alive(self, targets):
        from taskcore.deploy import launcher

        return [launcher.is_alive(p, s) for p, s in targets]

    async def tail(self, paths, n=200):
        from taskcore.deploy import launcher

        return {p: launcher.tail(p, n) for p in paths}

    async def listen_host(self):
        return "127.0.0.1"

    def record(self):
        return {"kind": "local", "python": self.python}

    @classmethod
    def from_record(cls, record, context):
        """One LocalTarget per python per rebuild (deploy/specdata.py)."""
        cache = context.setdefault("targets", {})
        key = ("local", record.get("python"))
        if key not in cache:
            cache[key] = cls(python=record.get("python"))
        return cache[key]


class _LocalChannel:
    """The launcher as a local child process, behind the same small API as an SSH channel."""

    def __init__(self, proc):
        self.proc = proc

    @property
    def returncode(self):
        return self.proc.returncode

    async def wait(self):
        return await self.proc.wait()

    def close_stdin(self):
        try:
            if self.proc.stdin is not None and not self.proc.stdin.is_closing():
                self.proc.stdin.close()
        except Exception:
            pass

    def abort(self):
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# LaunchedProcess
# ---------------------------------------------------------------------------------------------

class LaunchedProcess(ProcessInterface, metaclass=abc.ABCMeta):
    """One scheduler or worker process started (or adopted) through the launcher on a Target.

    `address` is the server's address from its ready line; `launch` the
    launcher's `launched` message (PIDs); `logs` a bounded deque of its stderr
    (while attached; for a detached process `fetch_logs()` reads its log file).
    """

    role: str | None = None

    def __init__(self, scheduler=None, name=None, *, target: Target | None = None,
                 detach: bool = False, log_file: str | None = None,
                 startup_timeout: float = 60, close_grace: float = 5,
                 log_capacity: int = 1000, forward_logs: bool = False,
                 poll_interval: float | None = None, record: dict | None = None,
                 remove_logs: bool = True, env: dict | None = None):
        super().__init__(scheduler=scheduler, name=name)
        self.target = target or LocalTarget()
        self.detach = detach
        self.log_file = log_file
        self.startup_timeout = startup_timeout
        self.close_grace = close_grace
        self.forward_logs = forward_logs
        self.poll_interval = poll_interval if poll_interval is not None else (
            1.0 if self.target.kind == "local" else 5.0)
        self.remove_logs = remove_logs
        self.env = env
        self.logs = collections.deque(maxlen=log_capacity)
        self.info: dict | None = None
        self.launch: dict | None = None
        self.adopted = record is not None
        self._record = record
        self._channel = None
        self._ready: asyncio.Future | None = None
        self._readers: list = []
        self._waiter: asyncio.Task | None = None
        self._poller: asyncio.Task | None = None
        self._closing = False
        self._close_task: asyncio.Future | None = None
        self.exit_code = None
        if record is not None:
            self.address = record.get("address")
            self.info = record.get("info")
            self.launch = record.get("launch")
            self.log_file = record.get("log_file", log_file)
            self.detach = True
            if self.name is None:
                self.name = record.get("name")

    # -- what to run ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def _server_argv_async(self) -> list:
        """The server's argv: the scheduler's or the worker's program."""

    @property
    def security(self):
        """The Security the server is started with (None: plain, unless a token)."""
        return None

    def _child_env(self) -> dict | None:
        """`env`, plus TASKCORE_TOKEN when the Security holds a token: a token travels in
        the environment, never on the command line."""
        token = getattr(self.security, "token", None)
        if not token:
            return self.env
        return {**(self.env or {}), TOKEN_ENV: token}

    @property
    def pids(self) -> list:
        """[(pid, start time), ...] of the supervising launcher and of the server."""
        la = self.launch or {}
        out = []
        if la.get("pid"):
            out.append((la["pid"], la.get("pid_start")))
        if la.get("child_pid"):
            out.append((la["child_pid"], la.get("child_start")))
        return out

    @property
    def pid(self):
        return (self.launch or {}).get("child_pid")

    def _label(self):
        what = self.role or "process"
        return f"{what} {self.name!r} on {self.target.label}"

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name!r} on {self.target.label} "
                f"address={self.address!r} pid={self.pid} status={self.status.value}>")

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self):
        if self.status is not Status.created:
            return self
        self.status = Status.starting
        if self.adopted:
            return await self._adopt()
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        args = ["run", "--grace", str(self.close_grace)]
        if self.detach:
            args.append("--detach")
        if self.log_file:
            args += ["--log-file", self.log_file]
        try:
            argv = await self._server_argv_async()
            args += ["--", *argv]
            self._channel, out, err = await self.target.open_channel(args,
                                                                     env=self._child_env())
        except BaseException:
            self.status = Status.failed
            self._finished.set()
            raise
        self._readers = [asyncio.ensure_future(read_lines(out, self._on_stdout)),
                         asyncio.ensure_future(read_lines(err, self._on_stderr))]
        self._waiter = asyncio.ensure_future(self._wait_channel())
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready), self.startup_timeout)
        except asyncio.TimeoutError:
            await self._abort()
            raise ProcessStartError(f"{self._label()} did not report ready within "
                                    f"{self.startup_timeout} s{self._stderr_tail()}") from None
        except ProcessStartError:
            await self._abort()
            raise
        except asyncio.CancelledError:
            await asyncio.shield(self._abort())
            raise
        self.info = info
        self.address = info["address"]
        if self.status is Status.starting:
            self.status = Status.running
        return self

    async def _adopt(self):
        """Take over a running process from its registry record (no new process)."""
        pids = self.pids
        if not pids:
            self.status = Status.failed
            self._finished.set()
            raise ProcessGone(f"{self._label()}: the registry record has no PIDs")
        try:
            alive = await self.target.alive(pids)
        except BaseException:
            self.status = Status.failed
            self._finished.set()
            raise
        if not all(alive):
            self.status = Status.failed
            self._finished.set()
            raise ProcessGone(f"{self._label()} (pid {self.pid}) is no longer running")
        self.status = Status.running
        self._poller = asyncio.ensure_future(self._poll_alive())
        return self

    async def _wait_channel(self):
        code = await self._channel.wait()
        self.exit_code = code
        try:
            await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), 2)
        except asyncio.TimeoutError:
            for t in self._readers:
                t.cancel()
        ready = self._ready
        if ready is not None and not ready.done():
            msg = self.target.explain_exit(code, self._stderr_tail(), self.launch is not None)
            if msg is None:
                msg = (f"{self._label()} exited with {_describe_exit(code)} before it was "
                       f"ready{self._stderr_tail()}")
            ready.set_exception(ProcessStartError(msg))
            ready.exception()  # retrieved: start() may already have given up
            return
        if self.detach and code == 0 and not self._closing:
            # The launcher handed the server off to its detached supervisor: watch that instead.
            self._poller = asyncio.ensure_future(self._poll_alive())
            return
        if not self._closing:
            self.status = Status.failed if code else Status.closed
            logger.debug("%s ended: %s", self._label(), _describe_exit(code))
        self._finished.set()

    async def _poll_alive(self):
        while not self._closing:
            await asyncio.sleep(self.poll_interval)
            if self._closing:
                return
            try:
                alive = await self.target.alive(self.pids)
            except Exception as e:  # the target is unreachable: we cannot tell, keep it
                logger.debug("%s: liveness check failed: %r", self._label(), e)
                continue
            if not all(alive) and not self._closing:
                self.status = Status.failed
                self._finished.set()
                return

    async def close(self):
        """Kill the process tree by PID (TERM, grace, KILL), whatever the channel does."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self):
        self._closing = True
        if self.status not in (Status.closed, Status.failed):
            self.status = Status.closing
        if self._poller is not None:
            self._poller.cancel()
        try:
            await self._kill_tree()
        finally:
            await self._close_channel()
            self.status = Status.closed
            self._finished.set()

    async def _kill_tree(self):
        pids = self.pids
        if not pids:
            return
        remove = [self.log_file] if (self.remove_logs and self.log_file) else []
        try:
            result = await asyncio.wait_for(
                self.target.kill(pids, grace=self.close_grace, remove=remove),
                self.close_grace + 30)
        except Exception as e:
            logger.warning("%s: killing pids %s failed: %r", self._label(),
                           [p for p, _ in pids], e)
            return
        if result.get("alive"):
            logger.warning("%s: processes %s survived SIGKILL", self._label(), result["alive"])

    async def _close_channel(self):
        ch = self._channel
        if ch is None:
            return
        ch.close_stdin()
        if self._waiter is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._waiter), 5)
            except (asyncio.TimeoutError, Exception):
                ch.abort()

    async def _abort(self):
        """A start that failed or timed out: leave nothing running."""
        self._closing = True
        try:
            await self._kill_tree()
        finally:
            await self._close_channel()
            self.status = Status.failed
            self._finished.set()

    def kill(self):
        """Hard kill, fire and forget (used when close() timed out)."""
        if self._channel is not None:
            self._channel.abort()
        if self.pids:
            asyncio.ensure_future(self.target.kill(self.pids, grace=0))

    def detach_handle(self):
        """Forget the process without stopping it (the cluster detaches)."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
        for t in self._readers:
            t.cancel()
        self._finished.set()

    # -- lines from the launcher ----------------------------------------------------------------
    def _on_stdout(self, line: str):
        ready = self._ready
        if line.lstrip().startswith("{"):
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if isinstance(msg, dict):
                event = msg.get("event")
                if event == "launched" and self.launch is None:
                    self.launch = msg
                    return
                if event == "ready" and ready is not None and not ready.done():
                    if self.role is not None and msg.get("role") != self.role:
                        ready.set_exception(ProcessStartError(
                            f"{self._label()} reported role {msg.get('role')!r}, "
                            f"expected {self.role!r}"))
                    elif not isinstance(msg.get("address"), str):
                        ready.set_exception(ProcessStartError(
                            f"{self._label()} sent a ready line without an address: "
                            f"{line[:200]}"))
                    else:
                        ready.set_result(msg)
                    return
                if event == "error":
                    self.logs.append(f"launcher: {msg.get('message')}")
                    return
        self.logs.append(line)

    def _on_stderr(self, line: str):
        self.logs.append(line)
        if self.forward_logs:
            try:
                sys.stderr.write(f"[{self.name} @ {self.target.label}] {line}\n")
            except Exception:
                pass

    def _stderr_tail(self, n: int = 15) -> str:
        lines = list(self.logs)[-n:]
        return ("; last output:\n  " + "\n  ".join(lines)) if lines else ""

    async def fetch_logs(self, n: int = 1000) -> list:
        """Recent log lines: the buffer, plus the log file's tail for a detached process."""
        lines = list(self.logs)
        if self.detach and self.log_file and self.pids:
            try:
                got = await asyncio.wait_for(self.target.tail([self.log_file], n), 10)
                lines = got.get(self.log_file) or lines
            except Exception as e:
                lines.append(f"(could not read {self.log_file} on {self.target.label}: {e!r})")
        return lines[-n:]

    # -- registry -------------------------------------------------------------------------------
    def record(self) -> dict:
        return {"role": self.role, "name": self.name, "address": self.address,
                "info": self.info, "launch": self.launch, "log_file": self.log_file,
                "target": self.target.record(),
                "machine": (self.launch or {}).get("host")}


class LaunchedScheduler(LaunchedProcess):
    """`core-scheduler` through the launcher. `host=None` asks the target where to listen."""

    role = "scheduler"

    def __init__(self, name="Scheduler", *, target=None, python=None, host=None, port=0,
                 protocol=None, security=None, idle_timeout=None, log_level="warning",
                 listen_any: bool = False, detach=False, log_file=None, startup_timeout=60,
                 close_grace=5, log_capacity=1000, forward_logs=False, poll_interval=None,
                 record=None, remove_logs=True, env=None, **scheduler_options):
        super().__init__(name=name, target=target, detach=detach, log_file=log_file,
                         startup_timeout=startup_timeout, close_grace=close_grace,
                         log_capacity=log_capacity, forward_logs=forward_logs,
                         poll_interval=poll_interval, record=record, remove_logs=remove_logs,
                         env=env)
        self.python = python
        self.host = host
        self.listen_any = listen_any
        self.options = dict(port=port, protocol=protocol, security=security,
                            idle_timeout=idle_timeout, log_level=log_level, **scheduler_options)
        if record is None:  # fail here, in the caller, on options that cannot travel
            scheduler_cli_args(host=host, python=python or self.target.python, **self.options)

    @property
    def security(self):
        return self.options.get("security")

    async def _server_argv_async(self):
        host = self.host
        if host is None:
            host = await self.target.listen_host() or "127.0.0.1"
            if self.listen_any and (host.startswith("127.") or host == "::1"):
                # Reached over loopback, but workers on other machines must reach it too.
                host = "0.0.0.0"
        options = dict(self.options)
        if options.get("security") is not None:
            options["security"] = await self.target.credentials(options["security"])
        return scheduler_cli_args(host=host, python=self.python or self.target.python,
                                  **options)


class LaunchedWorker(LaunchedProcess):
    """`core-worker` (with its nanny unless nanny=False) through the launcher."""

    role = "worker"

    def __init__(self, scheduler, name=None, *, target=None, python=None, nanny: bool = True,
                 log_level="warning", detach=False, log_file=None, log_dir=None,
                 startup_timeout=60, close_grace=5, log_capacity=1000, forward_logs=False,
                 poll_interval=None, record=None, remove_logs=True, env=None, **worker_options):
        if log_file is None and log_dir is not None and name is not None:
            log_file = f"{log_dir.rstrip('/')}/worker-{name}.log"
        super().__init__(scheduler=scheduler, name=name, target=target, detach=detach,
                         log_file=log_file, startup_timeout=startup_timeout,
                         close_grace=close_grace, log_capacity=log_capacity,
                         forward_logs=forward_logs, poll_interval=poll_interval, record=record,
                         remove_logs=remove_logs, env=env)
        self.python = python
        self.nanny = nanny
        self.worker_options = dict(log_level=log_level, **worker_options)
        if record is None:
            self._server_argv()  # fail here on options that cannot reach a worker process

    @property
    def security(self):
        return self.worker_options.get("security")

    async def _server_argv_async(self):
        security = self.security
        if security is None:
            return self._server_argv()
        return self._server_argv(security=await self.target.credentials(security))

    def _server_argv(self, **override):
        options = {**self.worker_options, **override}
        return worker_cli_args(self.scheduler, nanny=self.nanny, name=self.name,
                               python=self.python or self.target.python, **options)

    @property
    def worker_address(self):
        return self.address

    @property
    def worker_names(self) -> list:
        """Names of the workers this process runs (several with nworkers > 1)."""
        info = self.info or {}
        ws = info.get("workers")
        if ws:
            return [w.get("name") for w in ws]
        return [info.get("name", self.name)]
