"""Variable: one named value shared by every client and task of a cluster.

`Variable(name=None, client=None)`: `set(value)`, `get(timeout=None)` (waits until the
variable has a value), `delete()`. A value holding Futures keeps their keys alive on the
scheduler while the variable holds it; `get` returns Futures of the calling client.
"""
from __future__ import annotations

import uuid

from taskcore.coordination.extension import (Extension, call, client_of, expect_name,
                                             maybe_sync, pack, parse_timeout, unpack,
                                             waiter)

__all__ = ["Variable", "VariableExtension"]


class VariableExtension(Extension):
    """name -> packed value; getters waiting for a value that is not set yet."""

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.values: dict = {}
        self.waiting: dict = {}          # name -> [(future, client)]

    def rpc_set(self, peer, name, value):
        expect_name(name)
        self.keys.hold(value["keys"])         # the new value's keys first: a key in both
        old = self.values.get(name)           # the old and the new stays wanted
        self.values[name] = value
        if old is not None:
            self.keys.release(old["keys"])
        for fut, _ in self.waiting.pop(name, ()):
            if not fut.done():
                fut.set_result(None)

    async def rpc_get(self, peer, name, timeout=None):
        expect_name(name)
        if name not in self.values:
            fut = waiter(timeout, f"variable {name!r} to be set")
            entry = (fut, peer.id)
            self.waiting.setdefault(name, []).append(entry)
            try:
                await fut
            finally:
                ws = self.waiting.get(name)
                if ws is not None and entry in ws:
                    ws.remove(entry)
                    if not ws:
                        del self.waiting[name]
        value = self.values[name]
        self.keys.give(peer, value["keys"])
        return value

    def rpc_delete(self, peer, name):
        expect_name(name)
        old = self.values.pop(name, None)
        if old is not None:
            self.keys.release(old["keys"])

    def client_removed(self, client):
        for ws in self.waiting.values():
            for fut, c in ws:
                if c == client and not fut.done():
                    fut.cancel()


class Variable:
    """A named value shared across clients and tasks (dask.distributed's `Variable`)."""

    def __init__(self, name=None, client=None):
        self.name = expect_name(name) if name is not None else f"variable-{uuid.uuid4().hex}"
        self.client = client_of(client)

    def set(self, value, **kwargs):
        """Set the value (a Future's key is kept alive while the variable holds it)."""
        return maybe_sync(self.client, self._set, value)

    async def _set(self, value):
        await call(self.client, "variable.set", name=self.name, value=pack(value))

    def get(self, timeout=None, **kwargs):
        """The value, waiting until one is set; TimeoutError after `timeout`."""
        return maybe_sync(self.client, self._get, parse_timeout(timeout))

    async def _get(self, timeout=None):
        packed = await call(self.client, "variable.get", name=self.name, timeout=timeout)
        return unpack(self.client, packed)

    def delete(self):
        """Remove the value (its keys are released); waiting `get`s keep waiting."""
        return maybe_sync(self.client, call, self.client, "variable.delete", name=self.name)

    def __repr__(self):
        return f"<Variable: {self.name}>"

    def __reduce__(self):
        return (Variable, (self.name,))
