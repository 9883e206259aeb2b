"""inproc:// — comms between event loops inside one process.

Messages still go through `dumps`/`loads` (but not through byte framing), so
the semantics match tcp exactly: user objects arrive as copies, large buffers
arrive as zero-copy views, and `Serialized` payloads stay opaque. Delivery
uses `call_soon_threadsafe` on the receiving loop, so the two ends may run on
different threads (the Client's background loop and a LocalCluster's loop).
"""
from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import os
import socket
import threading

from taskcore.core.serialize import dumps, loads
from taskcore.errors import CommClosedError
from taskcore.transports.base import Backend, Comm, Listener

_listeners: dict = {}
_lock = threading.Lock()
_ids = itertools.count(1)


def new_address():
    return f"inproc://{socket.gethostname()}/{os.getpid()}/{next(_ids)}"


class InprocComm:
    compression = False

    def __init__(self, loop, local_address, peer_address):
        self.loop = loop
        self.local_address = local_address
        self.peer_address = peer_address
        self.peer = None
        self.inbox = collections.deque()
        self.read_waiter = None
        self.on_message = None
        self.on_close = None
        self.closed = False
        self.exc = None
        self.outbox = []
        self.flush_scheduled = False
        self.handshake_info = None
        self.lost = loop.create_future()  # resolved once the comm is closed, like TCPComm.lost

    def __repr__(self):
        return f"<InprocComm {self.local_address} -> {self.peer_address}>"

    # -- receiving ----------------------------------------------------------------
    def _receive(self, frames):
        if self.closed:
            return
        batch = loads(frames)
        if self.on_message is not None:
            for msg in batch:
                if self.closed:
                    break
                self.on_message(msg)
        else:
            self.inbox.extend(batch)
            self._wake()

    def _wake(self):
        w = self.read_waiter
        if w is not None:
            self.read_waiter = None
            if not w.done():
                w.set_result(None)

    async def read(self):
        while True:
            if self.inbox:
                return self.inbox.popleft()
            if self.closed:
                raise copy.copy(self.exc)  # the stored one stays free of tracebacks (cycles)
            self.read_waiter = self.loop.create_future()
            await self.read_waiter

    def set_message_handler(self, handler):
        self.on_message = handler
        if handler is not None:
            while self.inbox and not self.closed:
                handler(self.inbox.popleft())

    # -- sending ------------------------------------------------------------------
    def send(self, msg):
        if self.closed:
            raise copy.copy(self.exc)
        self.outbox.append(msg)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def flush(self):
        if self.flush_scheduled:
            self._flush()

    async def write(self, msg):
        self.send(msg)

    def _flush(self):
        self.flush_scheduled = False
        if not self.outbox or self.closed:
            return
        batch, self.outbox = self.outbox, []
        frames = dumps(batch)
        peer = self.peer
        try:
            peer.loop.call_soon_threadsafe(peer._receive, frames)
        except RuntimeError:  # the peer's loop is closed
            self._lost(CommClosedError(f"peer {self.peer_address} is gone"))

    # -- closing ------------------------------------------------------------------
    def _lost(self, exc):
        if self.closed and self.exc is not None and self.on_close is None:
            return
        self.closed = True
        if self.exc is None:
            self.exc = exc
        self.on_message = None  # the handler usually holds this comm: no cycle left behind
        self._wake()
        if not self.lost.done():
            self.lost.set_result(None)
        cb, self.on_close = self.on_close, None
        if cb is not None:
            cb(self)

    def _notify_peer(self):
        peer = self.peer
        exc = CommClosedError(f"connection to {self.local_address} closed by peer")
        try:
            peer.loop.call_soon_threadsafe(peer._lost, exc)
        except RuntimeError:
            pass

    async def close(self):
        if not self.closed:
            self._flush()
            self._notify_peer()
            self._lost(CommClosedError(f"comm to {self.peer_address} was closed locally"))

    def abort(self):
        if not self.closed:
            self.outbox = []
            self._notify_peer()
            self._lost(CommClosedError(f"comm to {self.peer_address} was aborted locally"))


Comm.register(InprocComm)


class InprocListener(Listener):
    def __init__(self, address, on_comm):
        self.address = address
        self.on_comm = on_comm
        self.loop = None
        self.comms = set()
        self._tasks = set()

    async def start(self):
        self.loop = asyncio.get_running_loop()
        with _lock:
            if self.address in _listeners:
                raise OSError(f"inproc address already in use: {self.address}")
            _listeners[self.address] = self
        return self

    @property
    def listen_address(self):
        return self.address

    contact_address = listen_address

    def _accept(self, comm):
        self.comms.add(comm)
        comm.on_close = self.comms.discard
        task = asyncio.ensure_future(self.on_comm(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self):
        with _lock:
            _listeners.pop(self.address, None)
        for comm in list(self.comms):
            comm.abort()
        for task in list(self._tasks):
            task.cancel()


class InprocBackend(Backend):
    scheme = "inproc"

    async def connect(self, loc, limits=None, handshake=True, **options):
        address = f"inproc://{loc}"
        with _lock:
            listener = _listeners.get(address)
        if listener is None:
            raise ConnectionRefusedError(f"no inproc listener at {address}")
        loop = asyncio.get_running_loop()
        local = new_address()
        ours = InprocComm(loop, local, address)
        theirs = InprocComm(listener.loop, address, local)
        ours.peer, theirs.peer = theirs, ours
        try:
            listener.loop.call_soon_threadsafe(listener._accept, theirs)
        except RuntimeError:
            raise ConnectionRefusedError(f"inproc listener at {address} is gone") from None
        return ours

    async def listen(self, loc, on_comm, limits=None, handshake=True, **options):
        address = f"inproc://{loc}" if loc else new_address()
        return await InprocListener(address, on_comm).start()
