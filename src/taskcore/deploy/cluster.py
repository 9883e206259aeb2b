"""Cluster: the user-facing interface every deployment backend shares.

A cluster object owns an event loop on which its scheduler/worker handles live.
- Synchronous use (the default): the loop runs in a background uvloop thread
  (`LoopRunner`); every public method blocks on `run_sync`.
- `asynchronous=True`: the cluster lives on the caller's running loop; public
  methods return awaitables, `await Cluster(asynchronous=True)` starts it.

Subclasses implement `_start`, `_close`, `_scale`, and (optionally)
`_count_workers` and `_gather_logs`. A later issue adds `adapt`,
`dashboard_link` and `from_name`.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import enum
import html
import logging
import time
import uuid
import weakref

from taskcore.utils import LoopRunner, format_bytes

logger = logging.getLogger("taskcore.deploy")


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


class _BufferHandler(logging.Handler):
    """Keeps the last N formatted records in a deque (for `Cluster.get_logs`)."""

    def __init__(self, buffer):
        super().__init__(logging.DEBUG)
        self.buffer = buffer
        self.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record):
        try:
            self.buffer.append(self.format(record))
        except Exception:
            self.handleError(record)


# Synchronous clusters still open at interpreter exit are closed by this hook, so a
# forgotten `cluster.close()` in a script does not leave worker processes behind.
_sync_clusters: "weakref.WeakSet[Cluster]" = weakref.WeakSet()
_atexit_registered = False


def _register_atexit():
    # Registered on first use, i.e. after deploy.process registered its own hook: atexit
    # runs hooks last-in first-out, so clusters close politely before leftovers are killed.
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


class Cluster:
    """Base class of LocalCluster, SpecCluster and the remote backends."""

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
        logger.log(level, msg, *args)

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
        except BaseException:
            self.status = Status.failed
            raise
        self.status = Status.running

    async def _close_once(self):
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close_wrapper())
        await asyncio.shield(self._close_task)

    async def _close_wrapper(self):
        self.status = Status.closing
        try:
            if self._start_task is not None and not self._start_task.done():
                self._start_task.cancel()
                await asyncio.gather(self._start_task, return_exceptions=True)
            if self.shutdown_on_close:
                await self._close()
        finally:
            logging.getLogger("taskcore").removeHandler(self._log_handler)
            self.status = Status.closed

    async def _start(self):  # pragma: no cover - subclasses
        pass

    async def _close(self):  # pragma: no cover - subclasses
        pass

    def close(self, timeout: float | None = None):
        """Close the scheduler and every worker, leaving no process behind.

        With `shutdown_on_close=False` only this handle is closed (the cluster keeps running).
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
        """Ask for `n` workers. Sync: blocks until reconciled. Async: returns an awaitable."""
        return self.sync(self._scale, n, **kwargs)

    async def _scale(self, n, **kwargs):  # pragma: no cover - subclasses
        raise NotImplementedError(f"{type(self).__name__} cannot scale")

    # -- introspection ------------------------------------------------------------------------
    @property
    def scheduler_address(self) -> str | None:
        return getattr(self.scheduler, "address", None)

    def _count_workers(self) -> int:
        """Workers up and connected. Subclasses with a better source (the scheduler) override."""
        return sum(1 for w in self.workers.values()
                   if str(getattr(w, "status", "")) == Status.running.value)

    def wait_for_workers(self, n: int, timeout: float | None = None):
        """Block (or, async, wait) until at least `n` workers are running."""
        async def _wait():
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._count_workers() < n:
                if self.status in (Status.closing, Status.closed, Status.failed):
                    raise RuntimeError(f"{self.name} is {self.status.value}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"only {self._count_workers()} of {n} workers after "
                                       f"{timeout} s")
                await asyncio.sleep(0.02)
        return self.sync(_wait)

    def get_logs(self, cluster: bool = True, scheduler: bool = True, workers: bool = True):
        """Recent log lines: {"Cluster": [...], "Scheduler": [...], <worker name>: [...]}."""
        def collect():
            return self._gather_logs(cluster, scheduler, workers)
        if self.asynchronous:
            async def _():
                return collect()
            return _()
        if self._runner is not None and self._runner.running:
            # Read the buffers on the loop thread, which is the only writer.
            async def _on_loop():
                return collect()
            return self._runner.run_sync(_on_loop)
        return collect()

    def _gather_logs(self, cluster, scheduler, workers):
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
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_html_(self):
        s = self._summary()
        rows = [("Name", self.name), ("Scheduler", self.scheduler_address or "not started"),
                ("Status", self.status.value), ("Workers", s["workers"])]
        if s.get("threads") is not None:
            rows.append(("Threads", s["threads"]))
        if s.get("memory"):
            rows.append(("Memory", format_bytes(s["memory"])))
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                       f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                       for k, v in rows)
        return (f"<div><h3 style='margin-bottom:0'>{html.escape(type(self).__name__)}</h3>"
                f"<table>{body}</table></div>")

