"""Queue: a named FIFO shared by every client and task of a cluster.

`Queue(name=None, client=None, maxsize=0)`: `put(value, timeout=None)` (waits while the
queue is full), `get(timeout=None, batch=False)` (`batch=True`: everything queued now,
maybe nothing; `batch=n`: exactly n items, waiting until there are n), `qsize()`. Futures
put in a queue are kept alive while queued; `get` hands them to the calling client.

The scheduler serves getters and putters first come, first served: a getter waiting for
n items holds back the getters after it, and items move only as whole batches, so a
timed-out `get(batch=n)` takes nothing.
"""
from __future__ import annotations

import asyncio
import collections
import uuid

from taskcore.coordination.extension import (Extension, call, client_of, expect_name,
                                             maybe_sync, pack, parse_timeout, unpack,
                                             waiter)

__all__ = ["Queue", "QueueExtension"]


class _Q:
    __slots__ = ("maxsize", "explicit", "items", "getters", "putters")

    def __init__(self, maxsize, explicit):
        self.maxsize = maxsize
        self.explicit = explicit                # made by a Queue(...), not by a put or get
        self.items = collections.deque()
        self.getters = collections.deque()     # (future, n, client)
        self.putters = collections.deque()     # (future, packed item, client)


class QueueExtension(Extension):
    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.queues: dict = {}

    def _queue(self, name):
        expect_name(name)
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Q(0, False)
        return q

    def rpc_create(self, peer, name, maxsize=0):
        if not isinstance(maxsize, int) or maxsize < 0:
            raise TypeError(f"maxsize must be an int >= 0, got {maxsize!r}")
        q = self._queue(name)
        if not q.explicit:                     # the first Queue(...) decides its size
            q.explicit = True
            q.maxsize = maxsize
            self._pump(q)
        elif maxsize and q.maxsize != maxsize:
            raise ValueError(f"queue {name!r} exists with maxsize={q.maxsize}, "
                             f"not {maxsize}")

    def _pump(self, q):
        """Move items: to waiting getters (in order), then from waiting putters."""
        moved = True
        while moved:
            moved = False
            while q.getters:
                fut, n, _ = q.getters[0]
                if fut.done():                 # timed out or its client left
                    q.getters.popleft()
                    continue
                if len(q.items) < n:
                    break
                q.getters.popleft()
                fut.set_result([q.items.popleft() for _ in range(n)])
                moved = True
            while q.putters and (not q.maxsize or len(q.items) < q.maxsize):
                fut, item, _ = q.putters.popleft()
                if fut.done():
                    continue
                q.items.append(item)
                self.keys.hold(item["keys"])
                fut.set_result(None)
                moved = True

    async def rpc_put(self, peer, name, value, timeout=None):
        q = self._queue(name)
        if not q.putters and (not q.maxsize or len(q.items) < q.maxsize):
            q.items.append(value)
            self.keys.hold(value["keys"])
            self._pump(q)
            return
        fut = waiter(timeout, f"room in queue {name!r} (maxsize {q.maxsize})")
        q.putters.append((fut, value, peer.id))
        await fut

    async def rpc_get(self, peer, name, timeout=None, batch=False):
        q = self._queue(name)
        if batch is True:
            items = list(q.items)
            q.items.clear()
        else:
            n = 1 if batch is False else batch
            if not isinstance(n, int) or n < 1:
                raise TypeError(f"batch must be True, False or an int >= 1, got {batch!r}")
            if not q.getters and len(q.items) >= n:
                items = [q.items.popleft() for _ in range(n)]
            else:
                fut = waiter(timeout, f"{n} item(s) in queue {name!r}")
                q.getters.append((fut, n, peer.id))
                self._pump(q)
                items = await fut
        if peer.kind == "client" and peer.id not in self.scheduler.clients:
            # The getter left between the grant and now: the items go back, in order.
            q.items.extendleft(reversed(items))
            self._pump(q)
            raise ConnectionError(f"client {peer.id} has disconnected")
        # The getter wants the keys before the queue lets go of them.
        keys = [k for item in items for k in item["keys"]]
        self.keys.give(peer, keys)
        self.keys.release(keys)
        self._pump(q)
        return items

    def rpc_qsize(self, peer, name):
        return len(self._queue(name).items)

    def client_removed(self, client):
        for q in self.queues.values():
            for fut, _, c in (*q.getters, *q.putters):
                if c == client and not fut.done():
                    fut.cancel()
            self._pump(q)


class Queue:
    """A named queue shared across clients and tasks (dask.distributed's `Queue`)."""

    def __init__(self, name=None, client=None, maxsize=0):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 0:
            raise TypeError(f"maxsize must be an int >= 0, got {maxsize!r}")
        self.name = expect_name(name) if name is not None else f"queue-{uuid.uuid4().hex}"
        self.client = client_of(client)
        self.maxsize = maxsize
        self._started = None
        if self.client.asynchronous:
            # Sent at once, so what this client queues after this line comes after it.
            self._started = asyncio.ensure_future(
                call(self.client, "queue.create", name=self.name, maxsize=maxsize))
        else:
            maybe_sync(self.client, call, self.client, "queue.create", name=self.name,
                       maxsize=maxsize)

    def __await__(self):
        async def start():
            await self._ready()
            return self

        return start().__await__()

    async def _ready(self):
        started, self._started = self._started, None
        if started is not None:
            await started

    def put(self, value, timeout=None, **kwargs):
        """Append `value`, waiting while the queue is full; TimeoutError after `timeout`."""
        return maybe_sync(self.client, self._put, value, parse_timeout(timeout))

    async def _put(self, value, timeout=None):
        await self._ready()
        await call(self.client, "queue.put", name=self.name, value=pack(value), timeout=timeout)

    def get(self, timeout=None, batch=False, **kwargs):
        """The next item (waiting for it), or a list: `batch=True` everything queued now,
        `batch=n` the next n items."""
        if not isinstance(batch, bool) and (not isinstance(batch, int) or batch < 1):
            raise TypeError(f"batch must be True, False or an int >= 1, got {batch!r}")
        return maybe_sync(self.client, self._get, parse_timeout(timeout), batch)

    async def _get(self, timeout=None, batch=False):
        await self._ready()
        items = await call(self.client, "queue.get", name=self.name, timeout=timeout,
                           batch=batch)
        values = [unpack(self.client, item) for item in items]
        return values if batch is not False else values[0]

    def qsize(self, **kwargs):
        """How many items are queued now."""
        return maybe_sync(self.client, self._qsize)

    async def _qsize(self):
        await self._ready()
        return await call(self.client, "queue.qsize", name=self.name)

    def __repr__(self):
        return f"<Queue: {self.name}>"

    def __reduce__(self):
        return (_rebuild_queue, (self.name, self.maxsize))


def _rebuild_queue(name, maxsize):
    return Queue(name, maxsize=maxsize)
