"""Semaphore: at most `max_leases` holders at once, cluster-wide.

`Semaphore(max_leases=1, name=None, lease_timeout="30s", client=None)`:
`acquire(timeout=None) -> bool`, `release() -> bool`, `get_value()` (leases held now, by
anyone), `close()`, `with sem:` / `async with sem:`.

Each acquire is a lease. Its holder refreshes it (the Semaphore object sends its leases to
the scheduler every `lease_timeout / 5` from its client's loop), and the scheduler releases
a lease that was not refreshed for `lease_timeout`: a holder that hangs, or whose client
is gone, does not keep it forever. A lease is also released at once when the holder's
client disconnects, and when the scheduler removes the worker whose task holds it (a
killed worker). Waiters are served first come, first served.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import uuid

from taskcore.coordination.extension import (AcquireContext, Extension, call, client_of,
                                             current_worker, expect_name, maybe_sync,
                                             parse_timeout, send, waiter)

__all__ = ["Semaphore", "SemaphoreExtension"]

logger = logging.getLogger("taskcore.coordination")


class _Lease:
    __slots__ = ("client", "worker", "timeout", "refreshed", "timer")

    def __init__(self, client, worker, timeout, now):
        self.client = client
        self.worker = worker
        self.timeout = timeout
        self.refreshed = now
        self.timer = None


class _Sem:
    __slots__ = ("max_leases", "leases", "waiters")

    def __init__(self, max_leases):
        self.max_leases = max_leases
        self.leases: dict = {}                       # lease id -> _Lease
        self.waiters = collections.deque()           # (future, lease id, client, worker, timeout)


class SemaphoreExtension(Extension):
    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.sems: dict = {}

    def _sem(self, name):
        sem = self.sems.get(expect_name(name, "semaphore name"))
        if sem is None:
            raise ValueError(f"no semaphore named {name!r} is registered")
        return sem

    def rpc_register(self, peer, name, max_leases):
        expect_name(name, "semaphore name")
        if not isinstance(max_leases, int) or max_leases < 1:
            raise ValueError(f"max_leases must be an int >= 1, got {max_leases!r}")
        sem = self.sems.get(name)
        if sem is None:
            self.sems[name] = _Sem(max_leases)
        elif sem.max_leases != max_leases:
            raise ValueError(f"semaphore {name!r} exists with max_leases={sem.max_leases}, "
                             f"not {max_leases}")

    def _grant(self, name, sem, lease_id, client, worker, timeout):
        loop = asyncio.get_running_loop()
        lease = _Lease(client, worker, timeout, loop.time())
        sem.leases[lease_id] = lease
        lease.timer = loop.call_later(timeout, self._check_lease, name, lease_id)

    def _check_lease(self, name, lease_id):
        sem = self.sems.get(name)
        lease = None if sem is None else sem.leases.get(lease_id)
        if lease is None:
            return
        loop = asyncio.get_running_loop()
        left = lease.refreshed + lease.timeout - loop.time()
        if left > 0:
            lease.timer = loop.call_later(left, self._check_lease, name, lease_id)
            return
        logger.warning("semaphore %r: lease %s of client %s was not refreshed for %s s; "
                       "releasing it", name, lease_id, lease.client, lease.timeout)
        self._release(name, sem, lease_id)

    def _release(self, name, sem, lease_id):
        lease = sem.leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease.timer is not None:
            lease.timer.cancel()
        self._serve(name, sem)
        return True

    def _serve(self, name, sem):
        while sem.waiters and len(sem.leases) < sem.max_leases:
            fut, lease_id, client, worker, timeout = sem.waiters.popleft()
            if fut.done():
                continue
            self._grant(name, sem, lease_id, client, worker, timeout)
            fut.set_result(True)

    async def rpc_acquire(self, peer, name, lease_id, lease_timeout, timeout=None,
                          worker=None):
        sem = self._sem(name)
        if not isinstance(lease_timeout, (int, float)) or lease_timeout <= 0:
            raise ValueError(f"lease_timeout must be > 0 seconds, got {lease_timeout!r}")
        if not sem.waiters and len(sem.leases) < sem.max_leases:
            self._grant(name, sem, lease_id, peer.id, worker, lease_timeout)
            return True
        fut = waiter(timeout, f"a lease of semaphore {name!r} "
                              f"({len(sem.leases)} of {sem.max_leases} held)")
        sem.waiters.append((fut, lease_id, peer.id, worker, lease_timeout))
        try:
            return await fut
        except TimeoutError:
            return False

    def rpc_release(self, peer, name, lease_id):
        """False when the lease was already released (it expired)."""
        sem = self._sem(name)
        return self._release(name, sem, lease_id)

    def rpc_refresh(self, peer, name, lease_ids):
        sem = self.sems.get(name)
        if sem is None:
            return
        now = asyncio.get_running_loop().time()
        for lid in lease_ids:
            lease = sem.leases.get(lid)
            if lease is not None:
                lease.refreshed = now

    def rpc_get_value(self, peer, name):
        return len(self._sem(name).leases)

    def _release_where(self, match):
        for name, sem in self.sems.items():
            for lid in [lid for lid, lease in sem.leases.items() if match(lease)]:
                self._release(name, sem, lid)

    def client_removed(self, client):
        for sem in self.sems.values():
            for fut, _, c, _, _ in sem.waiters:
                if c == client and not fut.done():
                    fut.cancel()
        self._release_where(lambda lease: lease.client == client)

    def worker_removed(self, worker):
        self._release_where(lambda lease: lease.worker == worker)

    def close(self):
        for sem in self.sems.values():
            for lease in sem.leases.values():
                if lease.timer is not None:
                    lease.timer.cancel()


class Semaphore(AcquireContext):
    """Limit concurrent access to a resource across the cluster (dask.distributed's
    `Semaphore`)."""

    def __init__(self, max_leases=1, name=None, scheduler_rpc=None, loop=None, register=True,
                 lease_timeout="30s", client=None):
        if not isinstance(max_leases, int) or isinstance(max_leases, bool) or max_leases < 1:
            raise ValueError(f"max_leases must be an int >= 1, got {max_leases!r}")
        self.max_leases = max_leases
        self.name = (expect_name(name, "semaphore name") if name is not None
                     else f"semaphore-{uuid.uuid4().hex}")
        self.lease_timeout = parse_timeout(lease_timeout)
        if not self.lease_timeout:
            raise ValueError(f"lease_timeout must be > 0, got {lease_timeout!r}")
        self.refresh_interval = self.lease_timeout / 5
        self.client = client_of(client)
        self._leases = collections.deque()
        self._refresh_timer = None
        self._started = None
        if register and self.client.asynchronous:
            # Sent at once, so what this client queues after this line comes after it.
            self._started = asyncio.ensure_future(
                call(self.client, "semaphore.register", name=self.name, max_leases=max_leases))
        elif register:
            maybe_sync(self.client, call, self.client, "semaphore.register", name=self.name,
                       max_leases=max_leases)

    async def _ready(self):
        started, self._started = self._started, None
        if started is not None:
            await started

    def __await__(self):
        async def start():
            await self._ready()
            return self

        return start().__await__()

    def acquire(self, timeout=None):
        """Take a lease: True, or False after `timeout` seconds."""
        # The task's worker is read here, in the task's thread (a thread-local).
        return maybe_sync(self.client, self._acquire, parse_timeout(timeout), current_worker())

    async def _acquire(self, timeout=None, worker=None):
        await self._ready()
        lease_id = uuid.uuid4().hex
        ok = await call(self.client, "semaphore.acquire", name=self.name, lease_id=lease_id,
                        lease_timeout=self.lease_timeout, timeout=timeout,
                        worker=worker)
        if ok:
            self._leases.append(lease_id)
            self._arm_refresh()
        return ok

    def _arm_refresh(self):
        if self._refresh_timer is None and self._leases:
            self._refresh_timer = self.client.loop.call_later(self.refresh_interval,
                                                              self._refresh)

    def _refresh(self):
        self._refresh_timer = None
        if not self._leases or self.client.status != "running":
            return
        send(self.client, "semaphore.refresh", name=self.name, lease_ids=list(self._leases))
        self._arm_refresh()

    def release(self):
        """Give the oldest of this object's leases back: True, or False when the
        scheduler had already released it (not refreshed for `lease_timeout`).
        RuntimeError when this object holds no lease."""
        if not self._leases:
            raise RuntimeError(f"semaphore {self.name!r} released too often: this object "
                               f"holds no lease")
        return maybe_sync(self.client, self._release)

    async def _release(self):
        if not self._leases:
            raise RuntimeError(f"semaphore {self.name!r} released too often")
        lease_id = self._leases.popleft()
        return await call(self.client, "semaphore.release", name=self.name, lease_id=lease_id)

    def get_value(self):
        """How many leases are held now, by anyone."""
        return maybe_sync(self.client, self._get_value)

    async def _get_value(self):
        await self._ready()
        return await call(self.client, "semaphore.get_value", name=self.name)

    def close(self):
        """Release this object's leases and stop refreshing."""
        return maybe_sync(self.client, self._close)

    async def _close(self):
        timer, self._refresh_timer = self._refresh_timer, None
        if timer is not None:
            timer.cancel()
        while self._leases:
            await self._release()

    def __repr__(self):
        return f"<Semaphore: {self.name} max_leases={self.max_leases}>"

    def __reduce__(self):
        return (_rebuild_semaphore, (self.max_leases, self.name, self.lease_timeout))


def _rebuild_semaphore(max_leases, name, lease_timeout):
    return Semaphore(max_leases=max_leases, name=name, lease_timeout=lease_timeout)
