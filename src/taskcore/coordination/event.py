"""Event: a cluster-wide flag that tasks and clients wait on.

`Event(name=None, client=None)`: `set()`, `clear()`, `wait(timeout=None) -> bool` (False
after `timeout`), `is_set()`. `set` wakes every waiter at once; a waiter whose client
leaves is dropped.
"""
from __future__ import annotations

import uuid

from taskcore.coordination.extension import (Extension, call, client_of, expect_name,
                                             maybe_sync, parse_timeout, waiter)

__all__ = ["Event", "EventExtension"]


class EventExtension(Extension):
    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.flags: set = set()
        self.waiters: dict = {}        # name -> [(future, client)]

    def rpc_set(self, peer, name):
        self.flags.add(expect_name(name, "event name"))
        for fut, _ in self.waiters.pop(name, ()):
            if not fut.done():
                fut.set_result(True)

    def rpc_clear(self, peer, name):
        self.flags.discard(expect_name(name, "event name"))

    def rpc_is_set(self, peer, name):
        return expect_name(name, "event name") in self.flags

    async def rpc_wait(self, peer, name, timeout=None):
        if expect_name(name, "event name") in self.flags:
            return True
        fut = waiter(timeout, f"event {name!r}")
        entry = (fut, peer.id)
        self.waiters.setdefault(name, []).append(entry)
        try:
            return await fut
        except TimeoutError:
            return False
        finally:
            ws = self.waiters.get(name)
            if ws is not None and entry in ws:
                ws.remove(entry)
                if not ws:
                    del self.waiters[name]

    def client_removed(self, client):
        for ws in self.waiters.values():
            for fut, c in ws:
                if c == client and not fut.done():
                    fut.cancel()


class Event:
    """A named flag shared across clients and tasks (dask.distributed's `Event`)."""

    def __init__(self, name=None, client=None):
        self.name = expect_name(name, "event name") if name is not None else \
            f"event-{uuid.uuid4().hex}"
        self.client = client_of(client)

    def set(self):
        """Set the flag: every waiter wakes."""
        return maybe_sync(self.client, call, self.client, "event.set", name=self.name)

    def clear(self):
        """Unset the flag: later waits wait."""
        return maybe_sync(self.client, call, self.client, "event.clear", name=self.name)

    def is_set(self):
        return maybe_sync(self.client, call, self.client, "event.is_set", name=self.name)

    def wait(self, timeout=None):
        """Wait until the flag is set: True, or False after `timeout` seconds."""
        return maybe_sync(self.client, self._wait, parse_timeout(timeout))

    async def _wait(self, timeout=None):
        # `timeout` travels in the request: Client.sync takes a `timeout` of its own.
        return await call(self.client, "event.wait", name=self.name, timeout=timeout)

    def __repr__(self):
        return f"<Event: {self.name}>"

    def __reduce__(self):
        return (Event, (self.name,))
