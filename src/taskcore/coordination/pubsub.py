"""Pub and Sub: messages from any task or client to every subscriber of a name.

`Pub(name, client=None).put(msg)` sends `msg` (anything picklable) without waiting;
`Sub(name, client=None)` receives every message put after it subscribed:
`get(timeout=None)` (TimeoutError after `timeout`), `for msg in sub:`, and in async code
`await sub.get()` and `async for msg in sub:`.

The path goes through the scheduler: a put is one rpc to it, and it forwards the message
(pickled once by the publisher, never unpickled on the scheduler) to each client with a
subscriber of that name, which hands it to its `Sub` objects. Messages from one publisher
arrive in the order they were put; a message is not kept for subscribers that come later.
Futures inside messages are not kept alive by the message.
"""
from __future__ import annotations

import asyncio
import collections
import uuid
import weakref

from taskcore.coordination.extension import (Extension, call, client_of, expect_name,
                                             maybe_sync, parse_timeout, send)

__all__ = ["Pub", "Sub", "PubSubExtension", "deliver"]


class PubSubExtension(Extension):
    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.subscribers: dict = {}          # name -> {client id: number of Subs}

    def rpc_subscribe(self, peer, name):
        subs = self.subscribers.setdefault(expect_name(name, "topic name"), {})
        subs[peer.id] = subs.get(peer.id, 0) + 1

    def rpc_unsubscribe(self, peer, name):
        subs = self.subscribers.get(name)
        if not subs or peer.id not in subs:
            return
        subs[peer.id] -= 1
        if subs[peer.id] <= 0:
            del subs[peer.id]
            if not subs:
                del self.subscribers[name]

    def rpc_put(self, peer, name, msg):
        subs = self.subscribers.get(expect_name(name, "topic name"))
        if not subs:
            return 0
        out = {"op": "pubsub-msg", "name": name, "msg": msg}
        n = 0
        for cid in subs:
            p = self.scheduler.clients.get(cid)
            if p is not None:
                self.scheduler.send(p, out)
                n += 1
        return n

    def rpc_subscribers(self, peer, name):
        return sorted(self.subscribers.get(name, ()))

    def client_removed(self, client):
        for name in list(self.subscribers):
            subs = self.subscribers[name]
            subs.pop(client, None)
            if not subs:
                del self.subscribers[name]


def deliver(client, msg):
    """A `pubsub-msg` from the scheduler, on the client's loop: to each of its Subs."""
    subs = getattr(client, "_pubsub", {}).get(msg.get("name"))
    if not subs:
        return
    payload = msg.get("msg")
    for sub in list(subs):
        sub._deliver(payload)


class Pub:
    """Publish messages to every `Sub` of `name` (dask.distributed's `Pub`)."""

    def __init__(self, name, client=None, worker=None, log_queue=None):
        self.name = expect_name(name, "topic name")
        self.client = client_of(client)

    def put(self, msg):
        """Send `msg` to the current subscribers; does not wait."""
        from taskcore.core.serialize import serialize_obj

        send(self.client, "pubsub.put", name=self.name, msg=serialize_obj(msg))

    def __repr__(self):
        return f"<Pub: {self.name}>"

    def __reduce__(self):
        return (Pub, (self.name,))


class Sub:
    """Receive the messages put to `name` from now on (dask.distributed's `Sub`)."""

    def __init__(self, name, client=None, worker=None):
        self.name = expect_name(name, "topic name")
        self.client = client_of(client)
        self.id = uuid.uuid4().hex
        self.buffer = collections.deque()
        self._waiters = []
        self._closed = False
        if self.client.asynchronous:
            # Started at once, so a put queued after this line comes after the subscription.
            self._started = asyncio.ensure_future(self._start())
        else:
            self._started = None
            maybe_sync(self.client, self._start)

    async def _start(self):
        c = self.client
        if not hasattr(c, "_pubsub"):
            c._pubsub = {}
        c._pubsub.setdefault(self.name, weakref.WeakSet()).add(self)
        await call(c, "pubsub.subscribe", name=self.name)

    def __await__(self):
        async def start():
            await self._ready()
            return self

        return start().__await__()

    async def _ready(self):
        started, self._started = self._started, None
        if started is not None:
            await started

    def _deliver(self, payload):
        self.buffer.append(payload)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def get(self, timeout=None):
        """The next message, waiting for it; TimeoutError after `timeout` seconds."""
        return maybe_sync(self.client, self._get, parse_timeout(timeout))

    async def _get(self, timeout=None):
        from taskcore.core.serialize import Serialized
        from taskcore.futures import bound_to

        await self._ready()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.buffer:
            w = loop.create_future()
            self._waiters.append(w)
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"no message on topic {self.name!r} within {timeout} s")
            try:
                await asyncio.wait_for(w, left)
            except asyncio.TimeoutError:
                if not self.buffer:
                    raise TimeoutError(f"no message on topic {self.name!r} within "
                                       f"{timeout} s") from None
        payload = self.buffer.popleft()
        if isinstance(payload, Serialized):
            with bound_to(self.client):
                payload = payload.deserialize()
        return payload

    def __iter__(self):
        while True:
            yield self.get()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._get()

    def close(self):
        """Stop receiving (also done when the Sub is garbage-collected)."""
        if self._closed:
            return
        self._closed = True
        subs = getattr(self.client, "_pubsub", {}).get(self.name)
        if subs is not None:
            subs.discard(self)
        if self.client.status == "running":
            send(self.client, "pubsub.unsubscribe", name=self.name)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"<Sub: {self.name}>"
