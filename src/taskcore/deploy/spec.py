"""SpecCluster and ProcessInterface: a cluster described as data and reconciled to it.

Theory of operation
-------------------
A SpecCluster holds two dicts of the same shape:

    worker_spec = {name: {"cls": <class or "module.Class">, "options": {...}}, ...}
    workers     = {name: <running handle>, ...}

`_correct_state()` makes `workers` match `worker_spec`: it closes the handles
whose name left the spec and starts one handle per new name, and loops until
both sets agree (the spec may change while it awaits). Everything that
changes the cluster's size (`scale`, later `adapt`) only edits `worker_spec`
and then reconciles, so there is exactly one code path that starts and stops
workers, and it is serialized by one lock.

A handle is anything with `start()`, `close()`, `finished()` and `address`:
a ProcessInterface subclass (a subprocess, an SSH process, a pod...), a
Nanny, or an in-process Worker server. The scheduler spec is built the same
way (`cls(**options)`), workers as `cls(scheduler_address, name=name, **options)`.

Worker groups: a spec may carry `"group": [suffix, ...]`; one handle then
stands for `len(group)` workers (one process running several workers), and
`scale(n)` counts workers, not handles. Handles themselves decide what the
group means; the cluster only uses it for counting.
"""
from __future__ import annotations

import asyncio
import copy
import importlib
import logging
import math

from taskcore.deploy.cluster import Cluster, Status
from taskcore.utils import parse_bytes

logger = logging.getLogger("taskcore.deploy")

__all__ = ["ProcessInterface", "SpecCluster", "Status"]


class ProcessInterface:
    """One scheduler or worker "process" somewhere, as an async object.

    Subclasses override `start()` (set `self.address`, then call
    `await super().start()`) and `close()` (stop it, then `await super().close()`).
    `finished()` resolves once the process is gone, whether closed by us or not.
    """

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

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name!r} address={self.address!r} "
                f"status={self.status.value}>")


def _resolve_cls(cls):
    """A class, or its dotted name ("taskcore.nanny.Nanny"), so specs can be plain data."""
    if isinstance(cls, str):
        module, _, attr = cls.rpartition(".")
        if not module:
            raise ValueError(f"spec cls {cls!r} is not a dotted path like 'package.module.Class'")
        return getattr(importlib.import_module(module), attr)
    if not callable(cls):
        raise TypeError(f"spec cls must be a class or a dotted name, got {cls!r}")
    return cls


def _check_spec(name, spec):
    if not isinstance(spec, dict) or "cls" not in spec:
        raise ValueError(f"spec for {name!r} must be a dict with a 'cls' key, got {spec!r}")
    unknown = set(spec) - {"cls", "options", "group"}
    if unknown:
        raise ValueError(f"spec for {name!r} has unknown keys {sorted(unknown)}")


def _group_size(spec) -> int:
    group = spec.get("group") if spec else None
    return len(group) if group else 1


class SpecCluster(Cluster):
    """A cluster whose workers are described by `workers={name: spec}`; see the module doc.

    `scheduler={"cls": ..., "options": {...}}` is started first; `worker=` is the
    template that `scale()` copies for new workers.
    """

    def __init__(self, workers=None, scheduler=None, worker=None, asynchronous: bool = False,
                 name: str | None = None, shutdown_on_close: bool = True,
                 close_timeout: float = 30, retire_timeout: float = 30):
        super().__init__(asynchronous=asynchronous, name=name, shutdown_on_close=shutdown_on_close)
        if scheduler is None:
            raise ValueError("SpecCluster needs a scheduler spec: {'cls': ..., 'options': {...}}")
        _check_spec("scheduler", scheduler)
        for n, s in (workers or {}).items():
            _check_spec(n, s)
        if worker is not None:
            _check_spec("worker template", worker)
        self.scheduler_spec = copy.copy(scheduler)
        self.worker_spec: dict = dict(workers or {})
        self.new_spec = copy.copy(worker)
        self.close_timeout = close_timeout
        self.retire_timeout = retire_timeout
        self._next_name = 0
        self._lock: asyncio.Lock | None = None
        self._started_names: set = set()
        self._closing_names: set = set()
        self._watchers: dict = {}
        self._pending: set = set()
        self._closing = False
        if not asynchronous:
            self._start_sync()

    # -- starting and closing -----------------------------------------------------------------
    async def _start(self):
        self._lock = asyncio.Lock()
        cls = _resolve_cls(self.scheduler_spec["cls"])
        self.scheduler = cls(**self.scheduler_spec.get("options", {}))
        await self.scheduler.start()
        self._log(logging.INFO, "%s: scheduler at %s", self.name, self.scheduler.address)
        await self._correct_state(raise_errors=True)

    async def _close(self):
        self._closing = True
        for t in list(self._pending):
            t.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        lock = self._lock or asyncio.Lock()
        async with lock:
            names = list(self.workers)
            if names:
                await self._close_workers(names, retire=False)
            for t in list(self._watchers.values()):
                t.cancel()
            if self.scheduler is not None:
                try:
                    await asyncio.wait_for(self.scheduler.close(), self.close_timeout)
                except Exception as e:  # a scheduler that will not close must not block the rest
                    self._log(logging.WARNING, "%s: closing the scheduler failed: %r", self.name, e)
        self._log(logging.INFO, "%s: closed", self.name)

    # -- reconciliation -----------------------------------------------------------------------
    async def _correct_state(self, raise_errors: bool = False):
        """Start and stop handles until the running set matches `worker_spec`."""
        errors = []
        async with self._lock:
            while not self._closing:
                to_close = [n for n in self.workers if n not in self.worker_spec]
                to_open = [n for n in self.worker_spec if n not in self.workers]
                if not to_close and not to_open:
                    break
                if to_close:
                    await self._close_workers(to_close, retire=True)
                if to_open:
                    errors += await self._open_workers(to_open)
        if errors and raise_errors:
            raise errors[0]

    async def _open_workers(self, names):
        handles = {}
        errors = []
        for name in names:
            spec = self.worker_spec[name]
            try:
                cls = _resolve_cls(spec["cls"])
                handles[name] = cls(self.scheduler_address, name=name, **spec.get("options", {}))
            except Exception as e:
                errors.append(e)
                self.worker_spec.pop(name, None)
                self._log(logging.ERROR, "%s: could not create worker %r: %r", self.name, name, e)
        # Registered before starting, so a concurrent close sees and closes them too.
        self.workers.update(handles)
        results = await asyncio.gather(*(h.start() for h in handles.values()),
                                       return_exceptions=True)
        for (name, handle), result in zip(handles.items(), results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                errors.append(result)
                # Dropped from the spec too: retrying a worker that cannot start would loop.
                self.workers.pop(name, None)
                self.worker_spec.pop(name, None)
                self._log(logging.ERROR, "%s: worker %r failed to start: %s", self.name, name,
                          result)
                try:
                    await asyncio.wait_for(handle.close(), self.close_timeout)
                except Exception:
                    pass
            else:
                self._started_names.add(name)
                self._log(logging.INFO, "%s: worker %r started at %s", self.name, name,
                          getattr(handle, "worker_address", None) or handle.address)
                self._watchers[name] = asyncio.ensure_future(self._watch(name, handle))
        return errors

    async def _watch(self, name, handle):
        """Notice a worker that ends without us closing it, and take it out of the spec."""
        try:
            await handle.finished()
        except Exception:
            pass
        if self.workers.get(name) is handle and name not in self._closing_names \
                and not self._closing:
            self._log(logging.WARNING, "%s: worker %r exited on its own; removing it",
                      self.name, name)
            self.workers.pop(name, None)
            self.worker_spec.pop(name, None)
            self._started_names.discard(name)
        self._watchers.pop(name, None)

    async def _close_workers(self, names, retire: bool):
        handles = [(n, self.workers[n]) for n in names if n in self.workers]
        self._closing_names.update(n for n, _ in handles)
        try:
            if retire:
                await self._retire([h for _, h in handles])
            results = await asyncio.gather(*(self._close_handle(h) for _, h in handles),
                                           return_exceptions=True)
            for (name, _), r in zip(handles, results):
                if isinstance(r, BaseException):
                    self._log(logging.WARNING, "%s: closing worker %r failed: %r",
                              self.name, name, r)
                else:
                    self._log(logging.INFO, "%s: worker %r closed", self.name, name)
        finally:
            for name, handle in handles:
                if self.workers.get(name) is handle:
                    del self.workers[name]
                self._started_names.discard(name)
                self._closing_names.discard(name)
                w = self._watchers.pop(name, None)
                if w is not None:
                    w.cancel()

    async def _retire(self, handles):
        """Before a scale-down, let the scheduler move unique data off the leaving workers.

        Uses the in-process scheduler's `retire_workers` when it has one; otherwise an
        in-process worker retires itself (`close_gracefully`). Best effort: on failure the
        workers are closed anyway and the scheduler recomputes what was lost.
        """
        addresses = [getattr(h, "worker_address", None) or h.address for h in handles]
        addresses = [a for a in addresses if a]
        retire = getattr(self.scheduler, "retire_workers", None)
        if retire is None and hasattr(self.scheduler, "rpc_retire_workers"):
            # The in-process Scheduler exposes retirement as an RPC handler (peer first).
            def retire(workers, _rpc=self.scheduler.rpc_retire_workers):
                return _rpc(None, workers=workers)
        try:
            if retire is not None and addresses:
                await asyncio.wait_for(retire(workers=addresses), self.retire_timeout)
            else:
                graceful = [h.close_gracefully() for h in handles
                            if hasattr(h, "close_gracefully")]
                if graceful:
                    await asyncio.wait_for(asyncio.gather(*graceful, return_exceptions=True),
                                           self.retire_timeout)
        except Exception as e:
            self._log(logging.WARNING, "%s: retiring %s failed (closing them anyway): %r",
                      self.name, addresses, e)

    async def _close_handle(self, handle):
        try:
            await asyncio.wait_for(handle.close(), self.close_timeout)
        except asyncio.TimeoutError:
            kill = getattr(handle, "kill", None)
            if kill is not None:
                kill()
            raise

    # -- scaling ------------------------------------------------------------------------------
    def _new_worker_name(self):
        while self._next_name in self.worker_spec or self._next_name in self.workers:
            self._next_name += 1
        name = self._next_name
        self._next_name += 1
        return name

    def _worker_count(self, names) -> int:
        return sum(_group_size(self.worker_spec.get(n)) for n in names)

    def _target_from(self, n=None, cores=None, memory=None) -> int:
        template = self.new_spec or {}
        opts = template.get("options", {})
        per = _group_size(template)
        if n is None and cores is not None:
            threads = opts.get("nthreads", 1) or 1
            n = math.ceil(cores / threads) * per
        if n is None and memory is not None:
            limit = opts.get("memory_limit")
            if not isinstance(limit, (int, float, str)) or limit in ("auto", 0):
                raise ValueError("scale(memory=...) needs a worker template with a numeric "
                                 "memory_limit")
            n = math.ceil(parse_bytes(memory) / parse_bytes(limit)) * per
        if n is None:
            raise TypeError("scale() needs n, cores or memory")
        if n < 0:
            raise ValueError(f"cannot scale to {n} workers")
        return int(n)

    def _edit_spec(self, n: int) -> None:
        """Change `worker_spec` so that it describes `n` workers (never starts anything)."""
        per = _group_size(self.new_spec)
        target = math.ceil(n / per)
        names = list(self.worker_spec)
        if target < len(names):
            # Drop what is not running yet first, then the newest: old workers hold more data.
            def running(x):
                return x in self._started_names

            order = ([x for x in reversed(names) if not running(x)]
                     + [x for x in reversed(names) if running(x)])
            for victim in order[:len(names) - target]:
                del self.worker_spec[victim]
        elif target > len(names):
            if self.new_spec is None:
                raise ValueError(f"{self.name} has no worker template (worker=...) to scale up")
            for _ in range(target - len(names)):
                self.worker_spec[self._new_worker_name()] = copy.deepcopy(self.new_spec)

    def scale(self, n: int | None = None, cores=None, memory=None):
        """Ask for `n` workers (or enough for `cores` threads / `memory` bytes).

        Only the spec changes; then the cluster reconciles. Sync: returns when done.
        Async: the spec is edited at once and the returned task completes the reconcile.
        """
        target = self._target_from(n, cores, memory)
        if self.asynchronous:
            self._edit_spec(target)
            task = asyncio.ensure_future(self._correct_state())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return task
        return self.sync(self._scale, target)

    async def _scale(self, n, **kwargs):
        self._edit_spec(n)
        await self._correct_state()

    # -- introspection ------------------------------------------------------------------------
    def _count_workers(self) -> int:
        return self._worker_count(n for n in self._started_names if n in self.workers)

    def _gather_logs(self, cluster, scheduler, workers):
        out = super()._gather_logs(cluster, scheduler, workers)
        if scheduler and self.scheduler is not None and hasattr(self.scheduler, "logs"):
            out["Scheduler"] = list(self.scheduler.logs)
        if workers:
            for name, w in self.workers.items():
                logs = getattr(w, "logs", None)
                if logs is not None and not callable(logs):
                    out[str(name)] = list(logs)
        return out

    def _summary(self) -> dict:
        threads = 0
        memory = 0
        for name in self.workers:
            spec = self.worker_spec.get(name) or {}
            opts = spec.get("options", {})
            per = _group_size(spec)
            threads += (opts.get("nthreads") or 1) * per
            limit = opts.get("memory_limit")
            if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 1:
                memory += int(limit) * per
        return {"workers": self._worker_count(self.workers), "threads": threads,
                "memory": memory or None}
