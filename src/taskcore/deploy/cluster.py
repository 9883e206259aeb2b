"""Cluster: the user-facing interface every deployment backend shares.

A cluster object owns an event loop on which its scheduler/worker handles live.
- Synchronous use (the default): the loop runs in a background uvloop thread
  (`LoopRunner`); every public method blocks on `run_sync`.
- `asynchronous=True`: the cluster lives on the caller's running loop; public
  methods return awaitables, `await Cluster(asynchronous=True)` starts it.

Subclasses must implement `_start`, `_close`, `_scale`, `_scale_down` and
`_from_registry` (abstract here; SpecCluster implements them for every
backend), and may override `_count_workers`, `_gather_logs`, `_detach`,
`_release`, `_registry_entry` and the dashboard's route (below).

The dashboard: `dashboard_link` is made here, once, by `link_from_info`
(taskcore/dashboard/link.py) from what the scheduler reported about its
dashboard (`_learn_dashboard`, at start: the scheduler handle's
`dashboard_info`, else one `scheduler_info` RPC). A backend only says how
this process reaches it: `_open_dashboard_route` (a tunnel, a port-forward),
`_dashboard_route` (the host and port to link to) and `_close_dashboard_route`.

Talking to the scheduler: the scheduler may live on the cluster's loop (an
in-process `Scheduler`), in a subprocess, in a batch job, or on another
machine. Everything the cluster asks it (retire workers, the adaptive target,
wait for workers) goes through `_scheduler_rpc`: one request over a one-shot
connection to its address (inproc:// for one on our loop), so every backend
runs the same scheduler code the same way, and none reaches into a scheduler
object.

Backends: a cluster class names itself in `backend` and is registered under
that name in the `taskcore.deploy` entry-point group (as transports are in
`taskcore.transports`); `from_name` finds the class of a registered cluster
that way, so a backend from another package reconnects like the built-in ones.

Lifetime: `close()` stops everything unless `shutdown_on_close=False`, in
which case it only detaches this handle (the processes keep running, and
`from_name` finds them again through the registry, deploy/registry.py).
`shutdown()` always stops everything.
"""
from __future__ import annotations

import abc
import asyncio
import atexit
import collections
import html
import logging
import math
import os
import socket
import time
import uuid
import weakref

from taskcore.process import Status  # re-exported: `Status` used to be defined here
from taskcore.utils import LoopRunner, format_bytes

logger = logging.getLogger("taskcore.deploy")


class _BufferHandler(logging.Handler):
    """Keeps the last N formatted records in a deque (for `Cluster.get_logs`)."""

    def __init__(self, buffer):
        super().__init__(logging.DEBUG)
        self.buffer = buffer
        self.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record):
        if getattr(record, "_taskcore_cluster_event", False):
            return  # a cluster's own event: Cluster._log already put it in its buffer
        try:
            self.buffer.append(self.format(record))
        except Exception:
            self.handleError(record)


# Synchronous clusters still open at interpreter exit are closed by this hook, so a
# forgotten `cluster.close()` in a script does not leave worker processes behind.
_sync_clusters: "weakref.WeakSet[Cluster]" = weakref.WeakSet()
_atexit_registered = False


def _register_atexit():
    # Registered on first use, i.e. after taskcore.process (imported above) registered its own
    # hook: atexit runs hooks last-in first-out, so clusters close politely before leftovers
    # are killed.
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_close_clusters_at_exit)
        _atexit_registered = True


def _close_clusters_at_exit():
    for cluster in list(_sync_clusters):
        try:
            cluster.close(timeout=10)
        except Exception:
            pass


class Cluster(abc.ABC):
    """Base class of LocalCluster, SpecCluster and the remote backends."""

    backend: str | None = None  # its name in the `taskcore.deploy` entry-point group

    def __init__(self, asynchronous: bool = False, name: str | None = None,
                 shutdown_on_close: bool = True, log_capacity: int = 10_000):
        self.asynchronous = asynchronous
        self.name = name or f"{type(self).__name__.lower()}-{uuid.uuid4().hex[:8]}"
        self.shutdown_on_close = shutdown_on_close
        self.status = Status.created
        self.scheduler = None  # the scheduler handle (server object or ProcessInterface)
        self.workers: dict = {}  # name -> worker handle
        self._logs = collections.deque(maxlen=log_capacity)
        self._log_handler = _BufferHandler(self._logs)
        self._runner: LoopRunner | None = None if asynchronous else LoopRunner(
            name=f"taskcore-cluster-{self.name}")
        self._start_task: asyncio.Future | None = None
        self._close_task: asyncio.Future | None = None
        self.adaptive = None  # the Adaptive policy while adapt() is in force
        self.security = getattr(self, "security", None)
        self._registered = False
        self._created = getattr(self, "_created", None) or time.time()  # kept on reconnect
        self._dashboard: dict | None = None  # the scheduler's dashboard_host/_port/_prefix

    # -- loop plumbing ------------------------------------------------------------------------
    @property
    def loop(self):
        if self._runner is not None:
            return self._runner.loop
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def sync(self, func, *args, timeout=None, **kwargs):
        """Run coroutine function `func`: awaitable in async mode, blocking in sync mode."""
        if self.asynchronous:
            coro = func(*args, **kwargs)
            return coro if timeout is None else asyncio.wait_for(coro, timeout)
        if self._runner is None or not self._runner.running:
            raise RuntimeError(f"{self.name} is not running (status {self.status.value})")
        return self._runner.run_sync(func, *args, timeout=timeout, **kwargs)

    def _start_sync(self):
        """For subclasses' constructors in sync mode: start the loop thread and the cluster."""
        self._runner.start()
        _register_atexit()
        _sync_clusters.add(self)
        try:
            self._runner.run_sync(self._start_once)
        except BaseException:
            try:
                self._runner.run_sync(self._close_once, timeout=30)
            except Exception:
                pass
            self._runner.stop()
            _sync_clusters.discard(self)
            raise

    def _log(self, level, msg, *args):
        """Record a cluster event in get_logs() whatever the logger's level, and log it."""
        record = logger.makeRecord(logger.name, level, __file__, 0, msg, args, None)
        self._logs.append(self._log_handler.format(record))
        logger.log(level, msg, *args, extra={"_taskcore_cluster_event": True})

    # -- lifecycle ----------------------------------------------------------------------------
    async def _start_once(self):
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start_wrapper())
        await asyncio.shield(self._start_task)
        return self

    async def _start_wrapper(self):
        if self.status in (Status.closing, Status.closed):
            raise RuntimeError(f"{self.name} is closed")
        self.status = Status.starting
        # Catch warnings from in-process servers on the cluster loop (records below the
        # loggers' levels never get here; the cluster's own events go in via _log).
        logging.getLogger("taskcore").addHandler(self._log_handler)
        try:
            await self._start()
        except BaseException as e:
            self.status = Status.failed
            if not isinstance(e, asyncio.CancelledError):
                # Whatever did start (a scheduler, some workers) is stopped now, detached or
                # not, so a failed start leaves nothing running, in sync and async mode alike.
                try:
                    await asyncio.shield(self._close())
                except Exception as close_error:
                    self._log(logging.WARNING, "%s: cleaning up after a failed start: %r",
                              self.name, close_error)
                self._unregister()
            raise
        self._started = True
        self.status = Status.running

    async def _close_once(self):
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close_wrapper())
        await asyncio.shield(self._close_task)

    async def _close_wrapper(self):
        self.status = Status.closing
        try:
            if self.adaptive is not None:
                self.adaptive._stop_now()
                self.adaptive = None
            if self._start_task is not None and not self._start_task.done():
                self._start_task.cancel()
                await asyncio.gather(self._start_task, return_exceptions=True)
            if self.shutdown_on_close or not getattr(self, "_started", False):
                await self._close()
                self._unregister()
            else:
                await self._detach()
                self._save_registry(detaching=True)
                self._log(logging.INFO, "%s: detached; reconnect with %s.from_name(%r)",
                          self.name, type(self).__name__, self.name)
        finally:
            try:
                await self._close_dashboard_route()
            except Exception as e:
                self._log(logging.WARNING, "%s: closing the way to the dashboard: %r",
                          self.name, e)
            await self._release()
            logging.getLogger("taskcore").removeHandler(self._log_handler)
            self.status = Status.closed

    @abc.abstractmethod
    async def _start(self):
        """Start the scheduler and the first workers."""

    @abc.abstractmethod
    async def _close(self):
        """Stop every worker and the scheduler."""

    async def _detach(self):
        """Let go of the processes without stopping them (shutdown_on_close=False)."""

    async def _release(self):
        """Free what this handle holds either way (connections), after _close or _detach."""

    def close(self, timeout: float | None = None):
        """Close the scheduler and every worker, leaving no process behind.

        With `shutdown_on_close=False` only this handle is closed: the cluster keeps
        running, and `from_name(name)` reconnects to it (see `shutdown()`).
        """
        if self.asynchronous:
            coro = self._close_once()
            return coro if timeout is None else asyncio.wait_for(coro, timeout)
        if self._runner is None or not self._runner.running:
            return None
        try:
            self._runner.run_sync(self._close_once, timeout=timeout)
        finally:
            self._runner.stop()
            _sync_clusters.discard(self)
        return None

    def shutdown(self, timeout: float | None = None):
        """Stop the scheduler and every worker, even when `shutdown_on_close` is False."""
        self.shutdown_on_close = True
        return self.close(timeout=timeout)

    def __await__(self):
        async def _():
            if not self.asynchronous:
                raise TypeError("await a cluster only when it was made with asynchronous=True")
            await self._start_once()
            return self
        return _().__await__()

    def __enter__(self):
        if self.asynchronous:
            raise TypeError("use `async with` for an asynchronous cluster")
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        if self.asynchronous:
            await self._start_once()
        return self

    async def __aexit__(self, *exc):
        if self.asynchronous:
            await self._close_once()
        else:
            # A sync cluster used in `async with`: do not block the caller's loop.
            await asyncio.get_running_loop().run_in_executor(None, self.close)

    # -- scaling ------------------------------------------------------------------------------
    def scale(self, n: int | None = None, **kwargs):
        """Ask for `n` workers. Sync: blocks until reconciled. Async: returns an awaitable.

        A manual scale ends adaptive mode (see `adapt`).
        """
        self._stop_adaptive("manual scale")
        return self.sync(self._scale, n, **kwargs)

    @abc.abstractmethod
    async def _scale(self, n, **kwargs):
        """Make the cluster hold `n` workers."""

    def scale_up(self, n: int, **kwargs):
        """Scale to `n` workers if that is more than planned now (never scales down)."""
        self._stop_adaptive("manual scale_up")
        return self.sync(self._scale_up, n, **kwargs)

    async def _scale_up(self, n, **kwargs):
        if n > self._planned_workers(kwargs.get("worker_group")):
            await self._scale(n, **kwargs)

    def scale_down(self, workers):
        """Retire and close these workers (names or addresses); their data moves first."""
        self._stop_adaptive("manual scale_down")
        return self.sync(self._scale_down, list(workers))

    @abc.abstractmethod
    async def _scale_down(self, workers):
        """Retire and close these workers (names or addresses)."""

    def _planned_workers(self, worker_group=None) -> int:
        return len(self.workers)

    # -- adaptive -----------------------------------------------------------------------------
    def adapt(self, minimum: int = 0, maximum: float = math.inf, target_duration="5s",
              wait_count: int = 3, interval="1s", **kwargs):
        """Scale between `minimum` and `maximum` workers by the scheduler's load.

        Returns the `Adaptive` object (also `cluster.adaptive`). Calling `adapt`
        again replaces the running policy with the new one; a manual scale of the
        group it manages ends adaptive mode; `adaptive.stop()` ends it and keeps
        the current workers. See deploy/adaptive.py.
        """
        from taskcore.deploy.adaptive import Adaptive

        if self.status not in (Status.running, Status.starting):
            raise RuntimeError(f"{self.name} is {self.status.value}; adapt() needs a running "
                               f"cluster")
        adaptive = Adaptive(self, minimum=minimum, maximum=maximum,
                            target_duration=target_duration, wait_count=wait_count,
                            interval=interval, **kwargs)

        def install():
            old, self.adaptive = self.adaptive, adaptive
            if old is not None:
                old._stop_now()
                self._log(logging.INFO, "%s: adapt() replaces the previous adaptive policy",
                          self.name)
            adaptive._start_now()
            return adaptive

        if self.asynchronous:
            # Installed at once on the running loop: `adapt` stays a plain call in async code.
            return install()

        async def install_on_loop():
            return install()
        return self.sync(install_on_loop)

    def _stop_adaptive(self, why: str):
        adaptive = self.adaptive
        if adaptive is None:
            return
        self.adaptive = None
        self._log(logging.INFO, "%s: %s ends adaptive mode", self.name, why)
        if self.asynchronous or self._runner is None or not self._runner.running:
            adaptive._stop_now()
        else:
            self._runner.call_soon(adaptive._stop_now)

    # -- the scheduler --------------------------------------------------------------------------
    async def _scheduler_rpc(self, method: str, args: dict | None = None,
                             timeout: float | None = 30):
        """Call the scheduler's `rpc_<method>(**args)` over a one-shot connection (the one
        path to the scheduler, wherever it runs). `timeout` bounds our wait for the answer."""
        if not self.scheduler_address:
            raise RuntimeError(f"{self.name} has no scheduler address yet")
        return await scheduler_rpc(self.scheduler_address, method, args or {},
                                   security=self.security, timeout=timeout)

    async def _scheduler_call(self, func, timeout: float | None = 30, **kwargs):
        """Run `func(scheduler, **kwargs)` on the scheduler (in its process) and return the
        result. `func` must be importable there (a module-level function)."""
        from taskcore.core.serialize import Serialized, serialize_obj

        status, value = await self._scheduler_rpc(
            "run_on_scheduler", {"func": serialize_obj((func, (), kwargs))}, timeout=timeout)
        if isinstance(value, Serialized):
            value = value.deserialize()
        if status == "error":
            raise value
        return value

    # -- the dashboard ------------------------------------------------------------------------
    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL as this process reaches it (through a tunnel or port-forward
        where the backend needs one), or None when the scheduler serves no dashboard.
        `$TASKCORE_DASHBOARD_LINK` shapes it (taskcore.dashboard.link)."""
        info = self._dashboard
        if not info or not info.get("dashboard_port"):
            return None
        from taskcore.dashboard.link import link_from_info

        info, reach_host = self._dashboard_route(info)
        return link_from_info(info, reach_host)

    def _dashboard_route(self, info: dict) -> tuple[dict, str | None]:
        """How this process reaches the dashboard `info` describes: `(info, reach_host)` for
        `link_from_info`. Directly by default, at the host we reach the scheduler at (it
        replaces a wildcard or loopback bind address). A backend that tunnels returns the
        tunnel's local end instead (SSHCluster, KubeCluster)."""
        return info, _address_host(self.scheduler_address)

    async def _learn_dashboard(self):
        """Keep what the scheduler reports about its dashboard (`_dashboard`): from its
        handle when the handle was told (a ready line), else by asking it once. A scheduler
        that cannot say leaves the link None, never a guess."""
        info = getattr(self.scheduler, "dashboard_info", None)
        if info is None and self.scheduler_address:
            from taskcore.member import dashboard_fields

            try:
                info = dashboard_fields(await self._scheduler_rpc("scheduler_info", timeout=10))
            except Exception as e:
                self._log(logging.WARNING, "%s: cannot ask the scheduler about its dashboard: "
                          "%r", self.name, e)
        self._dashboard = info
        if not info or not info.get("dashboard_port"):
            return
        try:
            await self._open_dashboard_route(info)
        except Exception as e:
            # The dashboard is for people: a tunnel that cannot open must not fail the cluster.
            self._log(logging.WARNING, "%s: cannot open the way to the dashboard: %r",
                      self.name, e)
        self._log(logging.INFO, "%s: dashboard at %s", self.name, self._safe_dashboard_link())

    async def _open_dashboard_route(self, info: dict):
        """Prepare what `_dashboard_route` needs (a tunnel, a port-forward); nothing here."""

    async def _close_dashboard_route(self):
        """Close what `_open_dashboard_route` opened; runs when the handle is let go."""

    # -- registry and reconnecting --------------------------------------------------------------
    def _registry_entry(self) -> dict | None:
        """What the registry should hold for this cluster, or None to stay unregistered."""
        return None

    def _save_registry(self, detaching: bool = False):
        try:
            entry = self._registry_entry()
        except Exception as e:
            self._log(logging.WARNING, "%s: cannot describe the cluster for the registry: %r",
                      self.name, e)
            return
        if entry is None:
            return
        from taskcore.deploy import registry

        entry.setdefault("name", self.name)
        entry.setdefault("cls", f"{type(self).__module__}.{type(self).__qualname__}")
        entry.setdefault("created", self._created)
        entry.setdefault("host", socket.gethostname())
        entry["manager_pid"] = None if detaching else os.getpid()
        entry.setdefault("scheduler_address", self.scheduler_address)
        try:
            registry.save(entry)
            self._registered = True
        except (OSError, ValueError) as e:
            self._log(logging.WARNING, "%s: cannot write the cluster registry: %r", self.name, e)

    def _unregister(self):
        if not self._registered:
            return
        from taskcore.deploy import registry

        try:
            registry.remove(self.name)
        except (OSError, ValueError):
            pass
        self._registered = False

    @classmethod
    def from_name(cls, name: str, asynchronous: bool = False, shutdown_on_close: bool = False,
                  **kwargs):
        """Reconnect to the running cluster registered as `name` (see `list_clusters()`).

        The new object manages the same scheduler and workers: it can scale,
        adapt, compute and `shutdown()`. By default `close()` detaches again
        (`shutdown_on_close=False`); pass True to stop the cluster on close.
        """
        from taskcore.deploy import registry

        entry = registry.load(name)
        actual = registry.backend_class(entry)
        if not (isinstance(actual, type) and issubclass(actual, cls)):
            raise TypeError(f"cluster {name!r} is a {actual.__name__}, not a {cls.__name__}")
        if not entry.get("detached"):
            raise RuntimeError(
                f"cluster {name!r} runs inside process {entry.get('manager_pid')} on "
                f"{entry.get('host')} and stops with it (it was not made with "
                f"shutdown_on_close=False); connect a Client to "
                f"{entry.get('scheduler_address')} instead")
        return actual._from_registry(entry, asynchronous=asynchronous,
                                     shutdown_on_close=shutdown_on_close, **kwargs)

    @classmethod
    @abc.abstractmethod
    def _from_registry(cls, entry, asynchronous=False, shutdown_on_close=False, **kwargs):
        """Rebuild a cluster object around the running cluster a registry entry describes."""

    # -- introspection ------------------------------------------------------------------------
    @property
    def scheduler_address(self) -> str | None:
        return getattr(self.scheduler, "address", None)

    def _count_workers(self) -> int:
        """Workers up and running, as far as the handles know."""
        return sum(1 for w in self.workers.values() if w.status == Status.running.value)

    def wait_for_workers(self, n: int, timeout: float | None = None):
        """Block (or, async, wait) until at least `n` workers are connected to the scheduler.

        Returns the number connected. One request that the scheduler answers when
        enough workers have arrived (or raises TimeoutError after `timeout` seconds).
        """
        async def _wait():
            if self.status in (Status.closing, Status.closed, Status.failed):
                raise RuntimeError(f"{self.name} is {self.status.value}")
            return await self._scheduler_rpc("wait_for_workers", {"n": n, "timeout": timeout},
                                             timeout=None)
        return self.sync(_wait)

    def get_logs(self, cluster: bool = True, scheduler: bool = True, workers: bool = True):
        """Recent log lines: {"Cluster": [...], "Scheduler": [...], <worker name>: [...]}.

        Each source is a bounded buffer (the cluster manager's own events, and
        each process's stderr); a detached process's lines come from its log file.
        """
        if self.asynchronous:
            return self._gather_logs(cluster, scheduler, workers)
        if self._runner is not None and self._runner.running:
            # Read the buffers on the loop thread, which is the only writer.
            return self._runner.run_sync(self._gather_logs, cluster, scheduler, workers)
        out = {}
        if cluster:
            out["Cluster"] = list(self._logs)
        return out

    async def _gather_logs(self, cluster, scheduler, workers):
        out = {}
        if cluster:
            out["Cluster"] = list(self._logs)
        return out

    def _summary(self) -> dict:
        """What __repr__ and _repr_html_ show; subclasses fill in threads and memory."""
        return {"workers": len(self.workers), "threads": None, "memory": None}

    def __repr__(self):
        s = self._summary()
        parts = [f"{self.name!r}", f"{self.scheduler_address!r}",
                 f"status={self.status.value}", f"workers={s['workers']}"]
        if s.get("threads") is not None:
            parts.append(f"threads={s['threads']}")
        if s.get("memory"):
            parts.append(f"memory={format_bytes(s['memory'])}")
        parts += [f"{k}={v}" for k, v in self._extra_summary()]
        link = self._safe_dashboard_link()
        if link:
            parts.append(f"dashboard={link}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _safe_dashboard_link(self) -> str | None:
        """The link for a repr: a bad $TASKCORE_DASHBOARD_LINK must not break printing."""
        try:
            return self.dashboard_link
        except (KeyError, ValueError, IndexError) as e:
            from taskcore.dashboard.link import ENV_TEMPLATE

            return f"(bad ${ENV_TEMPLATE}: {e})"

    def _extra_summary(self) -> list:
        """Backend-specific (key, value) pairs for the repr and _repr_html_ (job counts...)."""
        return []

    def _repr_html_(self):
        s = self._summary()
        rows = [("Name", self.name), ("Scheduler", self.scheduler_address or "not started"),
                ("Status", self.status.value), ("Workers", s["workers"])]
        if s.get("threads") is not None:
            rows.append(("Threads", s["threads"]))
        if s.get("memory"):
            rows.append(("Memory", format_bytes(s["memory"])))
        rows += [(k.replace("_", " ").capitalize(), v) for k, v in self._extra_summary()]
        cells = [(html.escape(str(k)), html.escape(str(v))) for k, v in rows]
        link = self._safe_dashboard_link()
        if link:
            cells.insert(2, ("Dashboard", _html_link(link)))
        body = "".join(f"<tr><th style='text-align:left'>{k}</th>"
                       f"<td style='text-align:left'>{v}</td></tr>" for k, v in cells)
        return (f"<div><h3 style='margin-bottom:0'>{html.escape(type(self).__name__)}</h3>"
                f"<table>{body}</table></div>")


def _html_link(url: str) -> str:
    """An <a> to `url`, or the text alone when it is not an http(s) URL (a template may
    make anything: never put a javascript: URL in a notebook's href)."""
    text = html.escape(url)
    if not url.lower().startswith(("http://", "https://", "/")):
        return text
    return f"<a href='{html.escape(url, quote=True)}' target='_blank'>{text}</a>"


def _address_host(address: str | None) -> str | None:
    """The host of a scheduler address ("tcp://10.0.0.1:8786" -> "10.0.0.1"); None for an
    in-process (inproc://) or unknown address."""
    if not address or address.startswith("inproc://"):
        return None
    from taskcore.transports.addressing import get_address_host

    try:
        return get_address_host(address) or None
    except ValueError:
        return None


def _direct_endpoint(info: dict, reach_host: str | None) -> tuple[str, int]:
    """(host, port) the dashboard link points at when nothing tunnels: link_from_info's own
    rule for a wildcard or loopback bind address, read back from the link it makes."""
    from urllib.parse import urlsplit

    from taskcore.dashboard.link import link_from_info

    url = urlsplit(link_from_info(info, reach_host, template="{scheme}://{host}:{port}/"))
    return url.hostname, url.port


async def tcp_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to (host, port) opens from here within `timeout` seconds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def scheduler_rpc(address: str, method: str, args: dict | None = None, security=None,
                        timeout: float | None = 30):
    """One request to a scheduler over a fresh connection: its `rpc_<method>(**args)` result."""
    from taskcore.core.serialize import Serialized
    from taskcore.transports import connect

    opts = {"security": security} if security is not None else {}
    comm = await connect(address, timeout=10 if timeout is None else min(timeout, 10),
                         role="client", **opts)
    try:
        await comm.write({"op": "rpc", "reqid": 1, "method": method, "args": args or {}})
        reply = await (comm.read() if timeout is None else asyncio.wait_for(comm.read(), timeout))
    finally:
        try:
            await comm.close()
        except Exception:
            comm.abort()
    if not isinstance(reply, dict):
        raise RuntimeError(f"unexpected reply from {address}: {reply!r}")
    if "error" in reply:
        err = reply["error"]
        if isinstance(err, Serialized):
            err = err.deserialize()
        if isinstance(err, BaseException):
            raise err
        raise RuntimeError(f"scheduler {address}: {method} failed: {err}")
    return reply.get("result")
