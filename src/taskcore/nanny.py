"""Nanny: a small supervisor that runs one worker as a child process.

Why a separate process: a worker that runs user code can crash the
interpreter, leak memory or hang in C code. The nanny stays small and
responsive, so it can
- restart the worker when it dies (with backoff, giving up after
  `max_rapid_failures` deaths in a row that each came soon after a start),
- kill and restart it when its resident memory passes
  `memory_terminate_fraction * memory_limit` (polled with psutil; False or 0 turns
  it off),
- tell the scheduler about each death and carry out the scheduler's
  "restart-worker" and "close" requests,
- restart a worker that retires because it stayed paused for memory too long
  (worker_memory.py): the worker asks first (`restart-after-retire` on the nanny's
  own address), then retires through the scheduler; the scheduler's "close" that
  ends a retirement is then not for the nanny, and the worker's clean exit is
  followed by a new worker instead of the nanny closing.

Memory kills. A worker over the terminate threshold is stopped first (SIGSTOP: it
cannot allocate more), the scheduler is told why (`worker-died` with the reason,
written before the kill, so it arrives before the worker's connection drops), and
only then killed (SIGKILL). The scheduler thus removes the worker with the memory
reason, which a task's `KilledWorker` error carries to the client.

The worker is `python -m taskcore.cli.worker --no-nanny ...`; the nanny
learns its address from the JSON ready line on its stdout (see
taskcore/process.py), never from logs.

Exit codes tell the nanny why the worker ended: 0 means the worker chose to
leave (retired, lifetime over, scheduler gone past death_timeout, told to
close), so the nanny closes too; anything else is a crash and is restarted.

Scheduler link: the nanny connects to the scheduler (role "nanny") and sends
`{"op": "register-nanny", "nanny": <our address>, "worker": ..., "name": ...}`.
It does not wait for any answer, ignores messages it does not know, and
reconnects when the link drops. If the scheduler stays unreachable for longer
than `death_timeout`, the nanny closes (and with it the worker). The nanny
also listens on its own address and accepts the same requests there.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import time

import taskcore.shm as shm
from taskcore.errors import CommClosedError, HandshakeError, ProtocolError
from taskcore.member import ClusterMember
from taskcore.process import ProcessStartError, Status, Subprocess, worker_cli_args
from taskcore.security import token_env
from taskcore.utils import format_bytes, get_ip_interface, parse_memory_limit
from taskcore.worker_memory import check_device_memory_limit, memory_options

# The worker's memory options that a nanny checks before handing them on (worker_memory.py).
_MEMORY_OPTIONS = ("memory_target_fraction", "memory_spill_fraction", "memory_pause_fraction",
                   "memory_pause_timeout", "memory_monitor_interval", "memory_max_spill",
                   "memory_spill_compression")
# How long a `restart-after-retire` request holds: the retirement (up to 60 s at the
# scheduler) and the worker's own fallback close (60 s more) fit in it.
RESTART_AFTER_RETIRE_WINDOW = 180.0
# After the scheduler was told about a memory kill: time for it to read that message
# before the worker's connection drops (the worker is stopped meanwhile).
MEMORY_KILL_REPORT_DELAY = 0.1
MALLOC_TRIM_THRESHOLD = 65536

logger = logging.getLogger("taskcore.nanny")

_COMM_ERRORS = (CommClosedError, HandshakeError, ProtocolError, OSError, EOFError)


class Nanny(ClusterMember):
    """Supervise one worker process; see the module docstring. A cluster member.

    `address` is the nanny's own listen address; `worker_address` and `worker_pid`
    describe the current worker process (they change on every restart).
    """

    def __init__(self, scheduler_address: str, env: dict | None = None,
                 memory_limit="auto", memory_terminate_fraction: float | None = 0.95,
                 restart: bool = True, *, nthreads: int = 1, name=None, host: str | None = None,
                 port: int = 0, protocol: str = "tcp", interface: str | None = None,
                 security=None, death_timeout: float | None = None, resources=None,
                 local_directory: str | None = None, lifetime=None, lifetime_stagger=None,
                 log_level: str = "info", worker_command: list | None = None,
                 startup_timeout: float = 60, close_grace: float = 5,
                 memory_poll_interval: float = 0.1, max_rapid_failures: int = 5,
                 rapid_failure_seconds: float = 10, backoff_base: float = 0.1,
                 backoff_max: float = 10, forward_logs: bool = True, log_capacity: int = 1000,
                 **worker_kwargs):
        if protocol in ("inproc", "inproc://"):
            raise ValueError("a Nanny runs its worker in another process; inproc:// cannot reach it")
        self.scheduler_address = scheduler_address
        self.env = dict(env or {})
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            # As dask's nanny does: a fixed trim threshold turns off glibc's sliding mmap
            # threshold, so a large result freed (spilled, released) goes back to the
            # system at once instead of staying in the heap as RSS that spilling cannot
            # lower (measured: docs/design.md, Memory).
            self.env.setdefault("MALLOC_TRIM_THRESHOLD_", str(MALLOC_TRIM_THRESHOLD))
        self.nthreads = nthreads
        self.memory_limit = parse_memory_limit(memory_limit, nthreads)
        # Fails here, in the caller, on a bad fraction (not in the worker process).
        checked = memory_options(memory_terminate_fraction=memory_terminate_fraction,
                                 **{k: worker_kwargs[k] for k in _MEMORY_OPTIONS
                                    if k in worker_kwargs})
        self.memory_terminate_fraction = checked["terminate"]
        if "device_memory_limit" in worker_kwargs:
            # Its form only: a fraction is of the worker's GPU, which the worker reads itself
            # (its CUDA_VISIBLE_DEVICES may differ from ours). It reaches the worker in
            # --worker-options like any other worker keyword.
            check_device_memory_limit(worker_kwargs["device_memory_limit"])
        self.restart = restart
        self.name = name
        self.protocol = protocol.rstrip(":/")
        self.interface = interface
        self.host = host
        self.port = port
        self.security = security
        self.death_timeout = death_timeout
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.close_grace = close_grace
        self.memory_poll_interval = memory_poll_interval
        self.max_rapid_failures = max_rapid_failures
        self.rapid_failure_seconds = rapid_failure_seconds
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.forward_logs = forward_logs
        self.logs = collections.deque(maxlen=log_capacity)  # survives worker restarts
        self._worker_options = dict(
            nthreads=nthreads, resources=resources, local_directory=local_directory,
            death_timeout=death_timeout, lifetime=lifetime, lifetime_stagger=lifetime_stagger,
            protocol=self.protocol, host=host, interface=interface, security=security,
            **worker_kwargs)
        self._worker_command = list(worker_command) if worker_command else None
        if self._worker_command is None:
            # Fail now, in the caller, if options cannot be handed to a worker process.
            worker_cli_args(scheduler_address, **self._worker_options)
        self.status = Status.created
        self.address: str | None = None
        self.process: Subprocess | None = None
        self.restarts = 0  # how many times a worker was started after the first
        self.deaths: list = []  # (time, reason) of each unplanned worker exit
        self._rapid_failures = 0
        self._kill_reason: str | None = None
        self._reported_death = None       # the process whose death was already reported
        self._restart_after_retire = None  # (deadline, reason) while a worker retires to restart
        self._listener = None
        self._comm = None
        self._tasks: set = set()
        self._lock = asyncio.Lock()
        self._finished = asyncio.Event()
        self._registered = asyncio.Event()
        self._close_task: asyncio.Future | None = None

    # -- introspection ------------------------------------------------------------------------
    @property
    def worker_address(self) -> str | None:
        return self.process.address if self.process is not None else None

    @property
    def worker_pid(self) -> int | None:
        p = self.process
        return p.pid if p is not None and p.returncode is None else None

    role = "worker"

    async def fetch_logs(self, n: int = 1000) -> list:
        return list(self.logs)[-n:]

    def kill(self) -> None:
        """After close() timed out: SIGKILL the worker process now."""
        if self.process is not None:
            self.process.kill()

    def __repr__(self):
        return (f"<Nanny {self.name!r} address={self.address!r} worker={self.worker_address!r} "
                f"pid={self.worker_pid} status={self.status.value}>")

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self):
        if self.status is not Status.created:
            return self
        self.status = Status.starting
        try:
            await self._start_listener()
            await self._spawn()  # the first start's failure is the caller's error
        except BaseException:
            await self._teardown()
            self.status = Status.failed
            self._finished.set()
            raise
        self.status = Status.running
        self._spawn_task(self._scheduler_link())
        if self.memory_limit and self.memory_terminate_fraction:
            self._spawn_task(self._memory_monitor())
        # Registration is best effort: wait briefly so that, normally, the scheduler knows
        # us when start() returns, but never fail because the scheduler is slow to answer.
        waits = [asyncio.ensure_future(self._registered.wait()),
                 asyncio.ensure_future(self._finished.wait())]
        done, pending = await asyncio.wait(waits, timeout=min(5, self.death_timeout or 5),
                                           return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        if not self._registered.is_set() and self.status is Status.running:
            logger.info("nanny %s: not yet registered with %s; still trying",
                        self.address, self.scheduler_address)
        return self

    def __await__(self):
        return self.start().__await__()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.close()

    async def finished(self):
        await self._finished.wait()

    async def close(self, timeout: float | None = None, reason: str = "nanny-close"):
        """Stop the worker (SIGTERM, SIGKILL after `close_grace`), then the nanny itself."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close(reason))
        task = asyncio.shield(self._close_task)
        if timeout is None:
            await task
        else:
            await asyncio.wait_for(task, timeout)

    async def _close(self, reason):
        if self._finished.is_set():
            return
        logger.info("nanny %s closing (%s)", self.address, reason)
        failed = self.status is Status.failed
        self.status = Status.closing
        await self._teardown()
        self.status = Status.failed if failed else Status.closed
        self._finished.set()

    async def _teardown(self):
        current = asyncio.current_task()
        # Taken first: the scheduler link, cancelled below, clears `_comm` as it ends, and
        # a comm left open keeps this nanny listed on the scheduler.
        comm, self._comm = self._comm, None
        for t in list(self._tasks):
            if t is not current:
                t.cancel()
        proc = self.process
        if proc is not None and proc.returncode is None:
            self._kill_reason = "nanny closing"
            await proc.close(grace=self.close_grace)
        if proc is not None:
            _remove_shm(proc)           # the _watch that would have was cancelled above
        if comm is not None:
            try:
                await comm.close()
            except Exception:
                comm.abort()
        if self._listener is not None:
            try:
                await self._listener.stop()
            except Exception:
                pass
            self._listener = None
        # Plugins' teardown last, when the worker process is gone (taskcore/plugins.py).
        if getattr(self, "_plugin_host", None) is not None:
            await self._plugin_host.close()

    def _spawn_task(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the worker process -------------------------------------------------------------------
    def _command(self) -> list:
        if self._worker_command is not None:
            return self._worker_command
        return worker_cli_args(self.scheduler_address, nanny=False, name=self.name,
                               memory_limit=self.memory_limit, nanny_address=self.address,
                               log_level=self.log_level, **self._worker_options)

    async def _spawn(self):
        """Start one worker process and wait for its ready line."""
        proc = Subprocess(self._command(), env=token_env(self.env, self.security),
                          name=self.name, role="worker",
                          scheduler=self.scheduler_address, startup_timeout=self.startup_timeout,
                          close_grace=self.close_grace, logs=self.logs,
                          forward_stderr=self.forward_logs)
        self._kill_reason = None
        self.process = proc
        await proc.start()
        self._started_at = time.monotonic()
        self._spawn_task(self._watch(proc))
        logger.info("nanny %s: worker %s started (pid %s)", self.address, proc.address, proc.pid)
        return proc

    async def _watch(self, proc: Subprocess):
        await proc.finished()
        _remove_shm(proc)
        if proc is not self.process or self.status is not Status.running:
            return  # replaced on purpose, or we are closing
        code = proc.returncode
        reason = self._kill_reason or _describe_exit(code)
        planned = code == 0 and self._kill_reason is None
        self.deaths.append((time.time(), reason))
        (logger.info if planned else logger.warning)(
            "nanny %s: worker %s (pid %s) exited: %s", self.address, proc.address, proc.pid, reason)
        if self._reported_death is not proc:
            self._report({"op": "worker-died", "worker": proc.address, "reason": reason})
        if planned and self._restart_pending():
            # It retired to be restarted (paused for memory too long): a fresh worker.
            logger.warning("nanny %s: worker %s retired (%s); starting a new one", self.address,
                           proc.address, self._restart_after_retire[1])
            self._restart_after_retire = None
            self._spawn_task(self._restart_after_death(proc))
            return
        if planned:
            # The worker left on purpose (retired, lifetime, death_timeout): so do we.
            self._spawn_task(self.close(reason="worker exited cleanly"))
            return
        if not self.restart:
            self._spawn_task(self.close(reason=f"worker died ({reason}) and restart=False"))
            return
        self._spawn_task(self._restart_after_death(proc))

    async def _restart_after_death(self, dead: Subprocess):
        lived = time.monotonic() - getattr(self, "_started_at", 0)
        self._rapid_failures = self._rapid_failures + 1 if lived < self.rapid_failure_seconds else 1
        while self.status is Status.running:
            if self._rapid_failures >= self.max_rapid_failures:
                logger.error("nanny %s: worker failed %d times in a row shortly after starting; "
                             "giving up", self.address, self._rapid_failures)
                self.status = Status.failed
                self._spawn_task(self.close(reason="too many rapid worker failures"))
                return
            delay = 0.0 if self._rapid_failures <= 1 else min(
                self.backoff_base * 2 ** (self._rapid_failures - 2), self.backoff_max)
            if delay:
                await asyncio.sleep(delay)
            async with self._lock:
                if self.process is not dead or self.status is not Status.running:
                    return  # someone (a restart request) already replaced it
                try:
                    new = await self._spawn()
                except ProcessStartError as e:
                    logger.warning("nanny %s: restarting the worker failed: %s", self.address, e)
                    self._rapid_failures += 1
                    dead = self.process
                    continue
            self.restarts += 1
            self._register(new.address)
            return

    async def restart_worker(self, reason: str = "restart requested", timeout: float | None = None):
        """Kill the worker process and start a new one; returns the new worker address."""
        async with self._lock:
            if self.status is not Status.running:
                raise RuntimeError(f"nanny is {self.status.value}")
            old = self.process
            if old is not None and old.returncode is None:
                self._kill_reason = reason
                self.process = None  # so _watch sees a planned replacement
                await old.close(grace=self.close_grace)
            self._rapid_failures = 0
            try:
                new = await (self._spawn() if timeout is None
                             else asyncio.wait_for(self._spawn(), timeout))
            except (ProcessStartError, asyncio.TimeoutError):
                # Never stay without a worker: fall back to the crash path (backoff, give-up).
                self._spawn_task(self._restart_after_death(self.process))
                raise
            self.restarts += 1
        self._register(new.address)
        return new.address

    async def kill_worker(self, reason: str = "killed"):
        """SIGKILL the worker now; the normal death path (report, restart) follows."""
        proc = self.process
        if proc is not None and proc.returncode is None:
            self._kill_reason = reason
            proc.kill()

    async def _memory_monitor(self):
        import psutil

        threshold = self.memory_terminate_fraction * self.memory_limit
        watched = None                  # (process, psutil handle) of the worker watched
        while True:
            await asyncio.sleep(self.memory_poll_interval)
            proc = self.process
            # Not yet started (no pid): psutil.Process(None) would be this nanny itself.
            if (proc is None or proc.pid is None or proc.returncode is not None
                    or self._kill_reason):
                continue
            try:
                if watched is None or watched[0] is not proc:
                    watched = (proc, psutil.Process(proc.pid))
                rss = watched[1].memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rss > threshold:
                reason = (f"killed by its nanny: memory limit exceeded (rss {format_bytes(rss)} > "
                          f"{self.memory_terminate_fraction:.0%} of "
                          f"{format_bytes(self.memory_limit)})")
                logger.warning("nanny %s: worker %s %s; restarting it", self.address,
                               proc.address, reason)
                try:
                    await self._memory_kill(proc, reason, rss)
                except Exception:       # the watch must go on, whatever happened here
                    logger.exception("nanny %s: killing worker %s failed", self.address,
                                     proc.address)

    async def _memory_kill(self, proc, reason, rss):
        """Stop the worker, tell the scheduler why, then kill it (see the module doc)."""
        import signal

        self._kill_reason = reason
        comm = self._comm
        if comm is not None and not comm.closed and proc.pid is not None:
            try:
                os.kill(proc.pid, signal.SIGSTOP)   # no more allocations meanwhile
            except OSError:
                pass
            try:
                await asyncio.wait_for(comm.write(
                    {"op": "worker-died", "worker": proc.address, "reason": reason,
                     "cause": "memory", "rss": rss, "memory_limit": self.memory_limit}), 1.0)
                self._reported_death = proc
                await asyncio.sleep(MEMORY_KILL_REPORT_DELAY)
            except Exception as e:
                logger.debug("nanny %s: could not report the memory kill: %r", self.address, e)
        # SIGKILL, not SIGTERM: a process that is busy allocating will not stop politely.
        proc.kill()

    # -- talking to the scheduler -------------------------------------------------------------
    async def _start_listener(self):
        from taskcore.transports import listen

        host = self.host
        if host is None and self.interface:
            host = get_ip_interface(self.interface)
        if host is None:
            host = _host_towards(self.scheduler_address)
        kw = {"security": self.security} if self.security is not None else {}
        self._listener = await listen(f"{self.protocol}://{_bracket(host)}:{self.port}",
                                      self._handle_incoming, role="nanny", **kw)
        self.address = self._listener.contact_address

    def _register(self, worker_address):
        self._report({"op": "register-nanny", "nanny": self.address, "worker": worker_address,
                      "name": self.name})

    def _report(self, msg):
        comm = self._comm
        if comm is None:
            return
        try:
            comm.send(msg)
        except Exception as e:
            logger.debug("nanny %s: could not send %s: %r", self.address, msg.get("op"), e)

    async def _scheduler_link(self):
        """Stay connected to the scheduler; close the nanny if it is gone past death_timeout."""
        from taskcore.transports import connect

        kw = {"security": self.security} if self.security is not None else {}
        lost_since = None
        delay = 0.1
        while self.status is Status.running:
            try:
                timeout = 5.0 if self.death_timeout is None else max(0.5, min(5.0, self.death_timeout))
                comm = await connect(self.scheduler_address, timeout=timeout, role="nanny", **kw)
            except (asyncio.TimeoutError, *_COMM_ERRORS) as e:
                now = time.monotonic()
                lost_since = lost_since or now
                if self.death_timeout is not None and now - lost_since > self.death_timeout:
                    logger.error("nanny %s: scheduler %s unreachable for %.1f s (death_timeout); "
                                 "closing", self.address, self.scheduler_address, now - lost_since)
                    self._spawn_task(self.close(reason="scheduler gone"))
                    return
                logger.debug("nanny %s: cannot reach scheduler: %r", self.address, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            lost_since, delay = None, 0.1
            self._comm = comm
            try:
                self._register(self.worker_address)
                self._registered.set()
                await self._serve(comm)
            except _COMM_ERRORS:
                pass
            finally:
                if self._comm is comm:
                    self._comm = None
            if self.status is Status.running:
                logger.warning("nanny %s: lost the connection to scheduler %s; reconnecting",
                               self.address, self.scheduler_address)
                lost_since = time.monotonic()

    async def _handle_incoming(self, comm):
        await self._serve(comm)

    async def _serve(self, comm):
        """Read requests until the comm closes. Unknown ops and replies are ignored."""
        while True:
            msg = await comm.read()
            for m in (msg if isinstance(msg, list) else [msg]):
                if isinstance(m, dict):
                    self._handle_op(m, comm)

    def _restart_pending(self) -> bool:
        r = self._restart_after_retire
        if r is not None and time.monotonic() > r[0]:
            self._restart_after_retire = r = None
        return r is not None

    def _handle_op(self, msg, comm):
        op = msg.get("op")
        if op == "restart-worker":
            self._spawn_task(self._handle_restart(comm, msg))
        elif op == "restart-after-retire":
            # From our worker, paused for memory too long: it is about to retire.
            reason = str(msg.get("reason") or "restart after retiring")
            ok = self.status is Status.running and self.restart
            if ok:
                self._restart_after_retire = (time.monotonic() + RESTART_AFTER_RETIRE_WINDOW,
                                              reason)
                logger.warning("nanny %s: worker %s retires to be restarted: %s", self.address,
                               self.worker_address, reason)
            try:
                comm.send({"op": "reply", "ok": ok})
            except Exception:
                pass
        elif op == "close" and self._restart_pending():
            # The scheduler ends the retirement of a worker that is to be restarted: it
            # closes the worker, and we start a new one (_watch).
            logger.info("nanny %s: %s closes the retiring worker; a new one follows",
                        self.address, comm.peer_address)
        elif op in ("close", "terminate"):
            self._spawn_task(self.close(reason=f"{op} requested by {comm.peer_address}"))
        elif op in ("plugin-add", "plugin-remove"):      # NannyPlugins (taskcore/plugins.py)
            self._spawn_task(self._plugin_request(msg, comm))
        elif op == "identity":
            try:
                comm.send(self.identity())
            except Exception:
                pass
        elif op == "get-logs":           # client.get_worker_logs(nanny=True), via the scheduler
            n = msg.get("n")
            lines = list(self.logs)
            if isinstance(n, int) and n >= 0:
                lines = lines[len(lines) - n:] if n else []
            try:
                comm.send({"op": "reply", "reqid": msg.get("reqid"), "result": lines})
            except Exception:
                pass
        else:
            logger.debug("nanny %s: ignoring message %r", self.address, op)

    async def _plugin_request(self, msg, comm):
        """Set up (or tear down) a NannyPlugin; one with `restart = True` restarts the
        worker afterwards, so the new process starts with what it set up."""
        from taskcore import plugins as _plugins

        host = getattr(self, "_plugin_host", None)
        if host is None:
            host = self._plugin_host = _plugins.PluginHost(self, _plugins.NannyPlugin)
        try:
            if msg["op"] == "plugin-add":
                plugin = msg["plugin"]
                plugin = plugin.deserialize() if hasattr(plugin, "deserialize") else plugin
                await host.add(msg["name"], plugin)
                if getattr(plugin, "restart", False) and msg.get("restart", True) \
                        and self.status is Status.running:
                    await self.restart_worker(reason=f"plugin {msg['name']!r} asked for it")
            else:
                await host.remove(msg["name"])
            result = _plugins.outcome()
            if msg["op"] == "plugin-add" and getattr(plugin, "restart", False):
                result["restart"] = True
        except Exception as e:
            result = _plugins.outcome(e)
        try:
            comm.send({"op": "reply", "reqid": msg.get("reqid"), "result": result})
        except Exception:
            pass

    async def _handle_restart(self, comm, msg):
        reply = {"op": "worker-restarted", "worker": None}
        try:
            reply["worker"] = await self.restart_worker(reason=msg.get("reason") or
                                                        "restart requested by scheduler")
        except Exception as e:
            logger.warning("nanny %s: restart request failed: %r", self.address, e)
            reply["error"] = f"{type(e).__name__}: {e}"
        try:
            comm.send(reply)
        except Exception:
            pass

    def identity(self) -> dict:
        return {"op": "identity", "type": "Nanny", "address": self.address, "name": self.name,
                "worker": self.worker_address, "pid": os.getpid(), "worker_pid": self.worker_pid,
                "status": self.status.value, "restarts": self.restarts,
                "memory_limit": self.memory_limit}


def _remove_shm(proc):
    """Remove the shared-memory files (shm.py) a worker process that ended left in
    /dev/shm: a killed one had no chance to. Files its peers mapped are unlinked
    already; what is left nobody will map."""
    if proc.pid is not None:
        n = shm.remove_process_files(proc.pid)
        if n:
            logger.info("removed %d shared-memory file(s) of worker pid %s", n, proc.pid)


def _describe_exit(code) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        import signal

        try:
            return f"worker killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"worker killed by signal {-code}"
    return f"worker exited with code {code}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _host_towards(address: str) -> str:
    """Listen where the scheduler can reach us: loopback for a local scheduler."""
    from taskcore.transports.addressing import get_address_host, get_ip, is_local_host

    try:
        host = get_address_host(address)
    except ValueError:
        return "127.0.0.1"
    if not host or host in ("localhost",) or host.startswith("127."):
        return "127.0.0.1"
    if host == "::1":
        return "::1"
    if is_local_host(host):
        return host
    return get_ip(host)


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("taskcore.nanny needs a POSIX system")
