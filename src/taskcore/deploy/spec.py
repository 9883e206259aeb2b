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

A handle is a cluster member (taskcore/member.py: `start()`, `close()`,
`finished()`, `address`, `status`, and the optional hooks with their
defaults): a ProcessInterface subclass (a subprocess, an SSH process, a batch
job, a pod...), a Nanny, or an in-process Scheduler or Worker. The cluster
calls nothing on a handle outside that contract. The scheduler spec is built
the same way (`cls(**options)`), workers as `cls(scheduler_address, name=name,
**options)`. `ProcessInterface` and `Status` are defined in taskcore/process.py
(the layer under both deploy/ and the nanny) and re-exported here.

The scheduler is only ever talked to over the network (`_scheduler_rpc`, one
RPC path), also when it runs on the cluster's own loop: the cluster never
reads an in-process scheduler's state, so every backend behaves the same.

Reconnecting (`from_name`) is generic: the registry entry holds the spec as
data (deploy/specdata.py) and each member's `record()`; `_from_registry`
rebuilds the specs, and each member class adopts its running process from
`record=`. A backend only says what else it needs (`_registry_config`, and
`_restore` to set its own attributes back), and registers by entry point
in the `taskcore.deploy` group.

Members that end on their own: a spec entry may be marked *expiring*
(`expire(name)`): it is about to leave by itself (a batch job reaching its
walltime). It no longer counts towards the group's size, so a replacement is
planned at once, and when it ends it leaves the spec instead of being
restarted.

Multi-worker handles: a spec may carry `"group": [suffix, ...]`; one handle
then stands for `len(group)` workers (one process running several workers,
named `<name><suffix>`), and `scale(n)` counts workers, not handles.

Worker groups (heterogeneous workers): besides the default template
(`worker=`), a cluster may hold named templates (`worker_groups={"big": spec}`
or `add_worker_group`). Their entries carry `"worker_group": "big"`, are named
`big-0, big-1, ...`, and `scale(n, worker_group="big")` edits only them, so 2
big-memory workers can sit next to 8 small ones and each count moves on its own.

Keeping the spec: a worker that ends without the cluster closing it (a crash,
a kill, a host going away) is replaced under the same name, so the running set
keeps matching the spec. A worker that dies `max_rapid_deaths` times in a row,
each within `rapid_death_seconds` of its start, is taken out of the spec
instead (with an error in the logs), so a broken worker cannot loop forever.
A worker that fails to *start* is dropped from the spec at once.
"""
from __future__ import annotations

import asyncio
import copy
import importlib
import logging
import math
import time

from taskcore.deploy import specdata
from taskcore.deploy.cluster import Cluster
from taskcore.member import check_member
from taskcore.process import ProcessGone, ProcessInterface, Status
from taskcore.utils import parse_bytes

logger = logging.getLogger("taskcore.deploy")

__all__ = ["ProcessInterface", "SpecCluster", "Status"]


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
    unknown = set(spec) - {"cls", "options", "group", "worker_group"}
    if unknown:
        raise ValueError(f"spec for {name!r} has unknown keys {sorted(unknown)}")


def _group_size(spec) -> int:
    group = spec.get("group") if spec else None
    return len(group) if group else 1


def _is_adopted(spec) -> bool:
    return bool(spec) and "record" in (spec.get("options") or {})


class SpecCluster(Cluster):
    """A cluster whose workers are described by `workers={name: spec}`; see the module doc.

    `scheduler={"cls": ..., "options": {...}}` is started first; `worker=` is the
    template that `scale()` copies for new workers; `worker_groups={name: template}`
    are further templates, scaled on their own (`scale(n, worker_group=name)`).
    """

    def __init__(self, workers=None, scheduler=None, worker=None, asynchronous: bool = False,
                 name: str | None = None, shutdown_on_close: bool = True,
                 close_timeout: float = 30, retire_timeout: float = 30,
                 worker_groups: dict | None = None, max_rapid_deaths: int = 5,
                 rapid_death_seconds: float = 10):
        super().__init__(asynchronous=asynchronous, name=name, shutdown_on_close=shutdown_on_close)
        if scheduler is None:
            raise ValueError("SpecCluster needs a scheduler spec: {'cls': ..., 'options': {...}}")
        _check_spec("scheduler", scheduler)
        for n, s in (workers or {}).items():
            _check_spec(n, s)
        if worker is not None:
            _check_spec("worker template", worker)
        for g, t in (worker_groups or {}).items():
            _check_spec(f"worker group {g!r}", t)
        self.scheduler_spec = copy.copy(scheduler)
        self.worker_spec: dict = dict(workers or {})
        self.new_spec = copy.copy(worker)
        self.worker_groups: dict = {g: copy.copy(t) for g, t in (worker_groups or {}).items()}
        self.close_timeout = close_timeout
        self.retire_timeout = retire_timeout
        self.max_rapid_deaths = max_rapid_deaths
        self.rapid_death_seconds = rapid_death_seconds
        self._next_name = 0
        self._next_group_name: dict = {}
        self._lock: asyncio.Lock | None = None
        self._started_names: set = set()
        self._closing_names: set = set()
        self._watchers: dict = {}
        self._start_times: dict = {}
        self._rapid_deaths: dict = {}
        self._pending: set = set()
        self._expiring: set = set()
        self._closing = False
        if not asynchronous:
            self._start_sync()

    # -- starting and closing -----------------------------------------------------------------
    async def _start(self):
        self._lock = asyncio.Lock()
        cls = _resolve_cls(self.scheduler_spec["cls"])
        self.scheduler = check_member(cls(**self.scheduler_spec.get("options", {})),
                                      f"{self.name}'s scheduler")
        workers = None
        planned = getattr(self.scheduler, "planned_address", None)
        if planned and self.worker_spec:
            # The scheduler's address is known before it is ready (LocalCluster binds its
            # socket): the workers start alongside it, connecting once it listens.
            self.scheduler.address = planned
            workers = asyncio.ensure_future(self._correct_state(raise_errors=True))
        try:
            await self.scheduler.start()
        except BaseException:
            if workers is not None:
                workers.cancel()
                await asyncio.gather(workers, return_exceptions=True)
                if self.workers:
                    await self._close_workers(list(self.workers), retire=False)
            # A scheduler handle that failed half-way (a process started, not ready) still
            # holds resources: close it before the error propagates.
            try:
                await asyncio.wait_for(self.scheduler.close(), self.close_timeout)
            except BaseException:
                pass
            raise
        self._log(logging.INFO, "%s: scheduler at %s", self.name, self.scheduler.address)
        if workers is not None:
            await workers
        await self._learn_dashboard()
        await self._correct_state(raise_errors=True)
        self._save_registry()  # also with no workers (then reconciling changed nothing)

    async def _close(self):
        self._closing = True
        for t in list(self._pending):
            t.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        lock = self._lock or asyncio.Lock()
        async with lock:
            names = list(self.workers)
            closing = []
            if names:
                closing.append(asyncio.ensure_future(self._close_workers(names, retire=False)))
                await asyncio.sleep(0)      # the workers are told first
            for t in list(self._watchers.values()):
                t.cancel()
            if self.scheduler is not None:
                # At the same time as the workers: a closing scheduler tells its workers
                # to close before it drops their connections, so none takes the loss for
                # a failure to recover from.
                closing.append(asyncio.ensure_future(self._close_scheduler()))
            await asyncio.gather(*closing)
        self._log(logging.INFO, "%s: closed", self.name)

    async def _close_scheduler(self):
        try:
            await asyncio.wait_for(self.scheduler.close(), self.close_timeout)
        except Exception as e:  # a scheduler that will not close must not block the rest
            self._log(logging.WARNING, "%s: closing the scheduler failed: %r", self.name, e)

    async def _detach(self):
        """Stop watching and reconciling, and let every process run on."""
        self._closing = True
        for t in list(self._pending):
            t.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        for t in list(self._watchers.values()):
            t.cancel()
        for h in [self.scheduler, *self.workers.values()]:
            if h is not None:
                h.detach_handle()

    # -- reconciliation -----------------------------------------------------------------------
    async def _correct_state(self, raise_errors: bool = False):
        """Start and stop handles until the running set matches `worker_spec`."""
        errors = []
        changed = False
        async with self._lock:
            while not self._closing:
                to_close = [n for n in self.workers if n not in self.worker_spec]
                to_open = [n for n in self.worker_spec if n not in self.workers]
                if not to_close and not to_open:
                    break
                changed = True
                if to_close:
                    await self._close_workers(to_close, retire=True)
                if to_open:
                    errors += await self._open_workers(to_open)
        if changed and not self._closing:
            self._save_registry()
        if errors and raise_errors:
            raise errors[0]

    def _schedule_reconcile(self, delay: float = 0.0):
        async def later():
            if delay:
                await asyncio.sleep(delay)
            await self._correct_state()

        task = asyncio.ensure_future(later())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _open_workers(self, names):
        handles = {}
        errors = []
        for name in names:
            spec = self.worker_spec[name]
            try:
                cls = _resolve_cls(spec["cls"])
                handles[name] = check_member(
                    cls(self.scheduler_address, name=name, **spec.get("options", {})),
                    f"{self.name}'s worker {name!r}")
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
                self.workers.pop(name, None)
                spec = self.worker_spec.get(name)
                if isinstance(result, ProcessGone) and _is_adopted(spec):
                    # A recorded process that died while nobody watched: start a fresh one
                    # under the same name (the reconcile loop picks it up next round).
                    self._log(logging.WARNING, "%s: worker %r is gone (%s); replacing it",
                              self.name, name, result)
                    self.worker_spec[name] = self._template_for(spec.get("worker_group"))
                    continue
                errors.append(result)
                # Dropped from the spec too: retrying a worker that cannot start would loop.
                self.worker_spec.pop(name, None)
                self._log(logging.ERROR, "%s: worker %r failed to start: %s", self.name, name,
                          result)
                try:
                    await asyncio.wait_for(handle.close(), self.close_timeout)
                except Exception:
                    pass
            else:
                self._started_names.add(name)
                self._start_times[name] = time.monotonic()
                self._log(logging.INFO, "%s: worker %r %s", self.name, name,
                          "submitted" if handle.pending else
                          f"started at {handle.worker_address or handle.address}")
                self._watchers[name] = asyncio.ensure_future(self._watch(name, handle))
        return errors

    async def _watch(self, name, handle):
        """Notice a worker that ends without us closing it, and replace it (the spec holds)."""
        try:
            await handle.finished()
        except Exception:
            pass
        if self._watchers.get(name) is asyncio.current_task():
            del self._watchers[name]
        if self.workers.get(name) is not handle or name in self._closing_names or self._closing:
            return
        self.workers.pop(name, None)
        self._started_names.discard(name)
        spec = self.worker_spec.get(name)
        if spec is None:
            return
        if name in self._expiring:
            # It was expected to end (expire()): its replacement is already planned.
            self._expiring.discard(name)
            self.worker_spec.pop(name, None)
            self._log(logging.INFO, "%s: worker %r ended as planned", self.name, name)
            self._save_registry()
            return
        now = time.monotonic()
        lived = now - self._start_times.get(name, now)
        deaths = self._rapid_deaths.get(name, 0) + 1 if lived < self.rapid_death_seconds else 1
        self._rapid_deaths[name] = deaths
        status = handle.status
        if deaths >= self.max_rapid_deaths:
            self._log(logging.ERROR, "%s: worker %r died %d times in a row soon after starting; "
                      "removing it from the spec", self.name, name, deaths)
            self.worker_spec.pop(name, None)
            self._rapid_deaths.pop(name, None)
            self._save_registry()
            return
        if _is_adopted(spec):
            self.worker_spec[name] = self._template_for(spec.get("worker_group"))
        delay = 0.0 if deaths <= 1 else min(0.5 * 2 ** (deaths - 2), 10.0)
        self._log(logging.WARNING, "%s: worker %r exited unexpectedly (status %s); starting a "
                  "replacement%s", self.name, name, getattr(status, "value", status),
                  f" in {delay:.1f} s" if delay else "")
        self._schedule_reconcile(delay)

    async def _close_workers(self, names, retire: bool):
        handles = [(n, self.workers[n]) for n in names if n in self.workers]
        self._closing_names.update(n for n, _ in handles)
        try:
            if retire:
                await self._retire([n for n, _ in handles])
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
                self._expiring.discard(name)
                self._start_times.pop(name, None)
                w = self._watchers.pop(name, None)
                if w is not None:
                    w.cancel()

    async def _scheduler_worker_info(self) -> dict | None:
        """{address: info} as the scheduler sees its workers, or None if it cannot be asked."""
        if not self.scheduler_address:
            return None
        try:
            info = await self._scheduler_rpc("scheduler_info", timeout=10)
            return info.get("workers") or {}
        except Exception as e:
            self._log(logging.DEBUG, "%s: cannot get worker info: %r", self.name, e)
        return None

    def _worker_names_of(self, name) -> set:
        """The names a spec entry's workers register under (several for multi-worker specs)."""
        spec = self.worker_spec.get(name) or {}
        handle = self.workers.get(name)
        names = {str(n) for n in (handle.worker_names if handle is not None else ())
                 if n is not None}
        suffixes = spec.get("group")
        if suffixes:
            names |= {f"{name}{s}" for s in suffixes}
        else:
            names.add(str(name))
        return names

    def _spec_names_by_worker_name(self) -> dict:
        out = {}
        for n in set(self.worker_spec) | set(self.workers):
            for wn in self._worker_names_of(n):
                out[wn] = n
        return out

    async def _worker_addresses(self, names) -> list:
        """Current worker addresses of these spec entries (the scheduler's view, by name)."""
        info = await self._scheduler_worker_info()
        if info:
            wanted = set()
            for n in names:
                wanted |= self._worker_names_of(n)
            found = [a for a, i in info.items() if str(i.get("name")) in wanted]
            if found:
                return found
        out = []
        for n in names:
            h = self.workers.get(n)
            if h is not None:
                a = h.worker_address or h.address
                if a:
                    out.append(a)
        return out

    async def _retire(self, names):
        """Before a scale-down, let the scheduler move unique data off the leaving workers.

        Best effort: on failure the workers are closed anyway and the scheduler
        recomputes what was lost.
        """
        addresses = await self._worker_addresses(names)
        if not addresses or not self.scheduler_address:
            return
        try:
            await self._scheduler_rpc("retire_workers", {"workers": addresses},
                                      timeout=self.retire_timeout)
        except Exception as e:
            self._log(logging.WARNING, "%s: retiring %s failed (closing them anyway): %r",
                      self.name, addresses, e)

    async def _close_handle(self, handle):
        try:
            await asyncio.wait_for(handle.close(), self.close_timeout)
        except asyncio.TimeoutError:
            handle.kill()
            raise

    # -- worker groups ------------------------------------------------------------------------
    def _template(self, worker_group=None):
        if worker_group is None:
            return self.new_spec
        try:
            return self.worker_groups[worker_group]
        except KeyError:
            raise ValueError(f"{self.name} has no worker group {worker_group!r} (groups: "
                             f"{sorted(self.worker_groups)})") from None

    def _template_for(self, worker_group=None) -> dict:
        """A fresh spec for one new worker of this group (deep copy of the template)."""
        template = self._template(worker_group)
        if template is None:
            raise ValueError(f"{self.name} has no worker template (worker=...) to scale up")
        spec = copy.deepcopy(template)
        if worker_group is not None:
            spec["worker_group"] = worker_group
        return spec

    def _in_group(self, worker_group=None) -> list:
        """The group's entries that count towards its size (expiring ones do not)."""
        return [n for n, s in self.worker_spec.items()
                if (s or {}).get("worker_group") == worker_group and n not in self._expiring]

    def expire(self, name) -> None:
        """Entry `name` will end on its own soon (a walltime): plan its replacement now.

        It stays in the spec and keeps running (and working) until it ends; then it
        leaves the spec instead of being restarted. Call on the cluster's loop.
        """
        if name not in self.worker_spec or name in self._expiring:
            return
        group = self.worker_spec[name].get("worker_group")
        target = self._planned_workers(group)
        self._expiring.add(name)
        self._log(logging.INFO, "%s: worker %r expires soon; planning its replacement",
                  self.name, name)
        self._edit_spec(target, group)
        self._schedule_reconcile()

    def add_worker_group(self, name: str, n: int = 0, spec: dict | None = None, **options):
        """Add a named group of workers with their own template; start `n` of them.

        `spec` is a full template (`{"cls": ..., "options": ...}`); without it the
        default template is copied and `options` override its options (for example
        `memory_limit="8GiB", resources={"BIG": 1}`). Returns like `scale`.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a worker group needs a non-empty string name")
        if name in self.worker_groups:
            raise ValueError(f"{self.name} already has a worker group {name!r}")
        if spec is None:
            if self.new_spec is None:
                raise ValueError("add_worker_group needs spec= when the cluster has no default "
                                 "worker template")
            spec = copy.deepcopy(self.new_spec)
            spec["options"] = {**spec.get("options", {}), **options}
        elif options:
            raise TypeError("give either spec= or option overrides, not both")
        _check_spec(f"worker group {name!r}", spec)
        self.worker_groups[name] = spec
        return self.scale(n, worker_group=name) if n else self._done()

    def remove_worker_group(self, name: str):
        """Retire every worker of the group, then forget its template."""
        self._template(name)

        async def _remove():
            await self._scale(0, worker_group=name)
            self.worker_groups.pop(name, None)
        if self.asynchronous:
            return asyncio.ensure_future(_remove())
        return self.sync(_remove)

    def _done(self):
        if self.asynchronous:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        return None

    # -- scaling ------------------------------------------------------------------------------
    def _new_worker_name(self, worker_group=None):
        if worker_group is not None:
            i = self._next_group_name.get(worker_group, 0)
            while f"{worker_group}-{i}" in self.worker_spec or f"{worker_group}-{i}" in self.workers:
                i += 1
            self._next_group_name[worker_group] = i + 1
            return f"{worker_group}-{i}"
        while self._next_name in self.worker_spec or self._next_name in self.workers:
            self._next_name += 1
        name = self._next_name
        self._next_name += 1
        return name

    def _worker_count(self, names) -> int:
        return sum(_group_size(self.worker_spec.get(n)) for n in names)

    def _planned_workers(self, worker_group=None) -> int:
        return self._worker_count(self._in_group(worker_group))

    def _target_from(self, n=None, cores=None, memory=None, worker_group=None) -> int:
        template = self._template(worker_group) or {}
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

    def _edit_spec(self, n: int, worker_group=None) -> None:
        """Change `worker_spec` so that the group describes `n` workers (never starts anything)."""
        template = self._template(worker_group)
        per = _group_size(template)
        target = math.ceil(n / per)
        names = self._in_group(worker_group)
        if target < len(names):
            # Drop what is not running yet first (a queued job included), then the newest:
            # old workers hold more data.
            def running(x):
                return x in self._started_names and not self.workers[x].pending

            order = ([x for x in reversed(names) if not running(x)]
                     + [x for x in reversed(names) if running(x)])
            for victim in order[:len(names) - target]:
                del self.worker_spec[victim]
        elif target > len(names):
            for _ in range(target - len(names)):
                spec = self._template_for(worker_group)
                self.worker_spec[self._new_worker_name(worker_group)] = spec

    def scale(self, n: int | None = None, cores=None, memory=None, worker_group=None):
        """Ask for `n` workers (or enough for `cores` threads / `memory` bytes).

        Only the spec changes; then the cluster reconciles. Sync: returns when done.
        Async: the spec is edited at once and the returned task completes the reconcile.
        `worker_group` scales that group only (default: the default template's workers).
        A manual scale of the group that adaptive manages ends adaptive mode.
        """
        target = self._target_from(n, cores, memory, worker_group)
        if self.adaptive is not None and self.adaptive.worker_group == worker_group:
            self._stop_adaptive("manual scale")
        if self.asynchronous:
            self._edit_spec(target, worker_group)
            task = asyncio.ensure_future(self._correct_state())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return task
        return self.sync(self._scale, target, worker_group=worker_group)

    async def _scale(self, n, worker_group=None, **kwargs):
        self._edit_spec(n, worker_group)
        await self._correct_state()

    def scale_up(self, n: int, worker_group=None):
        """Scale the group to `n` workers if that is more than planned now."""
        if self.adaptive is not None and self.adaptive.worker_group == worker_group:
            self._stop_adaptive("manual scale_up")
        if self.asynchronous:
            return asyncio.ensure_future(self._scale_up(n, worker_group=worker_group))
        return self.sync(self._scale_up, n, worker_group=worker_group)

    def scale_down(self, workers):
        """Retire and close these workers, given by spec name, worker name or address."""
        self._stop_adaptive("manual scale_down")
        workers = list(workers)
        if self.asynchronous:
            return asyncio.ensure_future(self._scale_down(workers))
        return self.sync(self._scale_down, workers)

    async def _scale_down(self, workers):
        names = await self._resolve_worker_names(workers)
        for n in names:
            self.worker_spec.pop(n, None)
        await self._correct_state()
        return names

    async def _resolve_worker_names(self, workers) -> list:
        """Spec names for a mix of spec names, worker names and worker addresses."""
        by_worker_name = self._spec_names_by_worker_name()
        out = []
        unresolved = []
        for w in workers:
            if w in self.worker_spec or w in self.workers:
                out.append(w)
            elif str(w) in by_worker_name:
                out.append(by_worker_name[str(w)])
            else:
                unresolved.append(w)
        if unresolved:
            addr_to_name = {}
            for n, h in self.workers.items():
                for a in (h.worker_address, h.address):
                    if a:
                        addr_to_name[a] = n
            info = await self._scheduler_worker_info() or {}
            for a, i in info.items():
                n = by_worker_name.get(str(i.get("name")))
                if n is not None:
                    addr_to_name[a] = n
            for w in unresolved:
                if w in addr_to_name:
                    out.append(addr_to_name[w])
                else:
                    raise ValueError(f"{self.name} has no worker {w!r}")
        return list(dict.fromkeys(out))

    # -- introspection ------------------------------------------------------------------------
    def _count_workers(self) -> int:
        """Workers started and running (a batch job still queued does not count)."""
        return self._worker_count(n for n in self._started_names
                                  if n in self.workers and not self.workers[n].pending)

    async def _gather_logs(self, cluster, scheduler, workers):
        out = await super()._gather_logs(cluster, scheduler, workers)

        if scheduler and self.scheduler is not None:
            got = await self.scheduler.fetch_logs()
            if got is not None:
                out["Scheduler"] = got
        if workers:
            for name, w in list(self.workers.items()):
                got = await w.fetch_logs()
                if got is not None:
                    out[str(name)] = got
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
            if isinstance(limit, str) and limit.strip().lower() not in ("auto", "none", "0"):
                try:
                    limit = parse_bytes(limit)
                except ValueError:
                    limit = None
            if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 1:
                memory += int(limit) * per
        return {"workers": self._worker_count(self.workers), "threads": threads,
                "memory": memory or None}

    # -- registry -------------------------------------------------------------------------------
    def _registry_config(self) -> dict | None:
        """Backend data (JSON) that `_restore` needs to rebuild it; None: not registrable."""
        return None

    def _restore(self, config: dict, **kwargs) -> dict:
        """Set the backend's own attributes from `_registry_config()`'s data, on a bare
        instance, before SpecCluster.__init__ runs; return the context for loading the
        specs (deploy/specdata.py). `kwargs` are from_name's extra arguments."""
        if kwargs:
            raise TypeError(f"unexpected arguments for {type(self).__name__}.from_name: "
                            f"{sorted(kwargs)}")
        return {}

    def _registry_entry(self) -> dict | None:
        config = self._registry_config()
        if config is None:
            return None
        workers = {}
        for name, h in self.workers.items():
            spec = self.worker_spec.get(name) or {}
            workers[str(name)] = {"record": h.record(), "worker_group": spec.get("worker_group"),
                                  "group": spec.get("group")}
        entry = {"name": self.name, "detached": self._detachable(),
                 "scheduler_address": self.scheduler_address, "backend": self.backend,
                 "scheduler": self.scheduler.record() if self.scheduler is not None else None,
                 "workers": workers, "config": config}
        if self._detachable():
            # Only what can be adopted again needs its spec: an attached cluster is listed,
            # never rebuilt (and may hold what JSON cannot, such as a Security object).
            entry["spec"] = {
                "scheduler": specdata.dump(_without_record(self.scheduler_spec), "scheduler"),
                "worker": specdata.dump(self.new_spec, "worker"),
                "worker_groups": specdata.dump(self.worker_groups, "worker_groups"),
                "workers": {str(n): specdata.dump(_without_record(s), f"workers.{n}")
                            for n, s in self.worker_spec.items() if n in self.workers},
                "cluster": {"close_timeout": self.close_timeout,
                            "retire_timeout": self.retire_timeout,
                            "max_rapid_deaths": self.max_rapid_deaths,
                            "rapid_death_seconds": self.rapid_death_seconds}}
        return entry

    @classmethod
    def _from_registry(cls, entry, asynchronous=False, shutdown_on_close=False, **kwargs):
        """Rebuild the cluster around its running members: every backend, one way."""
        if "spec" not in entry:
            raise RuntimeError(f"cluster {entry.get('name')!r} has no stored spec to rebuild "
                               f"it from")
        self = cls.__new__(cls)
        self._created = entry.get("created")
        context = self._restore(entry.get("config") or {}, **kwargs)
        spec = specdata.load(entry["spec"], context)
        template = spec.get("worker")
        groups = spec.get("worker_groups") or {}
        scheduler = dict(spec["scheduler"])
        scheduler["options"] = dict(scheduler.get("options") or {}, record=entry["scheduler"])
        workers = {}
        for key, w in (entry.get("workers") or {}).items():
            one = spec["workers"].get(key)
            if one is None:
                group = w.get("worker_group")
                one = copy.deepcopy(groups[group] if group in groups else template)
                if group in groups:
                    one["worker_group"] = group
                if w.get("group"):
                    one["group"] = w["group"]
            one["options"] = dict(one.get("options") or {}, record=w["record"])
            workers[cls._name_from_registry(key)] = one
        SpecCluster.__init__(self, workers=workers, scheduler=scheduler, worker=template,
                             worker_groups=groups, asynchronous=asynchronous,
                             name=entry["name"], shutdown_on_close=shutdown_on_close,
                             **spec.get("cluster", {}))
        return self

    def _detachable(self) -> bool:
        return not self.shutdown_on_close

    @staticmethod
    def _name_from_registry(key: str):
        return int(key) if key.isdigit() else key


def _without_record(spec):
    """A spec without the adoption record a reconnected member was made with."""
    if not spec or "record" not in (spec.get("options") or {}):
        return spec
    out = dict(spec)
    out["options"] = {k: v for k, v in spec["options"].items() if k != "record"}
    return out
