"""Lock and MultiLock: cluster-wide mutual exclusion held on the scheduler.

`Lock(name=None, client=None)`: `acquire(blocking=True, timeout=None) -> bool`,
`release()`, `locked()`, `with lock:` / `async with lock:`.
`MultiLock(names=[], client=None)`: `acquire(blocking=True, timeout=None, num_locks=None)`
takes `num_locks` (default: all) of its names at once or none of them; `release()`.

The scheduler keeps a FIFO of requests per name (`LockTable`). A request joins the queue of
each of its names in one scheduler step and holds the names where it reaches the front;
it is granted once it is at the front of `num_locks` of them, and then leaves the other
queues. Every request waits only for holders and for requests older than itself, so
there is no deadlock between multi-locks and no starvation. A lock is released when its
holder releases it, when the holder's client disconnects, or when the scheduler removes
the worker whose task holds it. Lock and MultiLock names are separate namespaces, as in
dask.
"""
from __future__ import annotations

import collections
import uuid

from taskcore.coordination.extension import (AcquireContext, Extension, call, client_of,
                                             current_worker, expect_name, maybe_sync,
                                             parse_timeout, waiter)

__all__ = ["Lock", "MultiLock", "LockExtension", "MultiLockExtension", "LockTable"]


class _Request:
    __slots__ = ("token", "client", "worker", "names", "num_locks", "fut", "granted")

    def __init__(self, token, client, worker, names, num_locks, fut):
        self.token = token
        self.client = client
        self.worker = worker
        self.names = names
        self.num_locks = num_locks
        self.fut = fut
        self.granted = False


class LockTable(Extension):
    """Requests per lock name; the scheduler-side state of both lock kinds."""

    kind = "lock"

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.queues: dict = {}          # name -> deque of _Request, the front holds it
        self.requests: dict = {}        # token -> _Request

    def _fronts(self, req):
        return [n for n in req.names if self.queues[n][0] is req]

    def _leave(self, req, names):
        """Take `req` out of the queues of `names`; grant the requests that move up."""
        moved = []
        for n in names:
            q = self.queues.get(n)
            if q is None or req not in q:
                continue
            front = q[0] is req
            q.remove(req)
            if not q:
                del self.queues[n]
            elif front:
                moved.append(q[0])
        for r in moved:
            self._grant_if_ready(r)

    def _grant_if_ready(self, req):
        if req.granted or req.fut.done():
            return
        fronts = self._fronts(req)
        if len(fronts) < req.num_locks:
            return
        req.granted = True
        others = [n for n in req.names if n not in fronts]
        req.names = fronts
        req.fut.set_result(True)
        self._leave(req, others)

    async def rpc_acquire(self, peer, names, token, blocking=True, timeout=None,
                          num_locks=None, worker=None):
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(expect_name(n, f"{self.kind} name") for n in names))
        if not names:
            raise ValueError(f"a {self.kind} needs at least one name")
        if num_locks is None:
            num_locks = len(names)
        if not isinstance(num_locks, int) or not 1 <= num_locks <= len(names):
            raise ValueError(f"num_locks must be between 1 and {len(names)}, got {num_locks!r}")
        if token in self.requests:
            raise RuntimeError(f"{self.kind} request {token!r} is already pending or held")
        if not blocking:
            free = [n for n in names if n not in self.queues]
            if len(free) < num_locks:
                return False
        fut = waiter(timeout, f"{self.kind} {', '.join(map(repr, names))}")
        req = _Request(token, peer.id, worker, names, num_locks, fut)
        self.requests[token] = req
        for n in names:
            self.queues.setdefault(n, collections.deque()).append(req)
        self._grant_if_ready(req)
        try:
            await fut
            return True
        except TimeoutError:
            self._drop(req)
            return False
        except BaseException:            # cancelled: the client left, the scheduler closes
            self._drop(req)
            raise

    def _drop(self, req):
        if self.requests.get(req.token) is req:
            del self.requests[req.token]
        if not req.fut.done():
            req.fut.cancel()
        self._leave(req, list(req.names))

    def rpc_release(self, peer, token):
        req = self.requests.get(token)
        if req is None or not req.granted:
            raise ValueError(f"this {self.kind} is not acquired (request {token!r})")
        self._drop(req)

    def rpc_locked(self, peer, name):
        q = self.queues.get(expect_name(name, f"{self.kind} name"))
        return bool(q) and q[0].granted

    def client_removed(self, client):
        for req in [r for r in self.requests.values() if r.client == client]:
            self._drop(req)

    def worker_removed(self, worker):
        for req in [r for r in self.requests.values() if r.worker == worker]:
            self._drop(req)


class LockExtension(LockTable):
    kind = "lock"


class MultiLockExtension(LockTable):
    kind = "multi-lock"


class _LockBase(AcquireContext):
    _ext = "lock"

    def _acquire_args(self, blocking, timeout):
        if not blocking and timeout is not None:
            raise ValueError("a non-blocking acquire takes no timeout")
        return parse_timeout(timeout)

    async def _acquire(self, names, blocking, timeout, num_locks=None, worker=None):
        token = uuid.uuid4().hex
        ok = await call(self.client, f"{self._ext}.acquire", names=names, token=token,
                        blocking=blocking, timeout=timeout, num_locks=num_locks,
                        worker=worker)
        if ok:
            self._tokens.append(token)
        return ok

    async def _release(self):
        if not self._tokens:
            raise ValueError(f"{type(self).__name__} is not acquired")
        await call(self.client, f"{self._ext}.release", token=self._tokens.pop())

    def release(self):
        """Release it (ValueError if this object does not hold it)."""
        return maybe_sync(self.client, self._release)


class Lock(_LockBase):
    """A cluster-wide lock (dask.distributed's `Lock`). Not reentrant: a second acquire
    through the same object waits like anyone else's."""

    _ext = "lock"

    def __init__(self, name=None, client=None, **kwargs):
        self.name = expect_name(name) if name is not None else f"lock-{uuid.uuid4().hex}"
        self.client = client_of(client)
        self._tokens = []

    def acquire(self, blocking=True, timeout=None):
        """Take the lock: True, or False when not blocking and it is held, or after
        `timeout`."""
        timeout = self._acquire_args(blocking, timeout)
        # The task's worker is read here, in the task's thread (a thread-local).
        return maybe_sync(self.client, self._acquire, [self.name], bool(blocking), timeout,
                          None, current_worker())

    def locked(self):
        """Does anyone hold it?"""
        return maybe_sync(self.client, call, self.client, "lock.locked", name=self.name)

    def __repr__(self):
        return f"<Lock: {self.name}>"

    def __reduce__(self):
        return (Lock, (self.name,))


class MultiLock(_LockBase):
    """Several named locks taken together, all or none (dask.distributed's `MultiLock`)."""

    _ext = "multi_lock"

    def __init__(self, names=(), client=None, **kwargs):
        if isinstance(names, str):
            names = [names]
        self.names = [expect_name(n, "lock name") for n in names]
        self.client = client_of(client)
        self._tokens = []

    def acquire(self, blocking=True, timeout=None, num_locks=None):
        """Take `num_locks` of the names (default: all) at once: True, or False when
        not blocking and they are held, or after `timeout`."""
        timeout = self._acquire_args(blocking, timeout)
        if not self.names:
            raise ValueError("MultiLock has no names to lock")
        return maybe_sync(self.client, self._acquire, list(self.names), bool(blocking),
                          timeout, num_locks, current_worker())

    def __repr__(self):
        return f"<MultiLock: {self.names}>"

    def __reduce__(self):
        return (MultiLock, (self.names,))
