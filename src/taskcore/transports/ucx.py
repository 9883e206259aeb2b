"""ucx:// on ucxx: UCX's tag messages between taskcore processes.

UCX picks the fastest path between two processes (shared memory, InfiniBand,
NVLink, plain TCP); without a GPU or RDMA NIC set ``UCX_TLS=tcp``. Addresses are
``ucx://host:port``; a listener binds every interface (ucxx has no bind address)
and reports ``host`` as its contact address.

Wire format (this module owns it)
---------------------------------
A comm sends, per batch of messages (one `dumps` of everything queued in one loop
tick), one small *header* message and then each non-empty frame as its own UCX tag
message, all on the endpoint's tag, which UCX matches in order:

    header = magic b"TCU1" | kind u32 | nframes u32 | table
    table  = nframes x (nbytes u64, flags u8)        little-endian, packed
    flags  = bit 0: "device": the frame is device memory (received into device
             memory when this side can, else into host memory)

``kind`` is DATA (table inline), DATA_EXT (the table did not fit in
`HEADER_BYTES`: it follows as one message of exactly ``9 * nframes`` bytes) or
CLOSE (the peer closes: no table, no frames). The receiver checks the table
against its `Limits` (the handshake limits for the first message) before it
allocates anything, allocates each frame once (a bytearray, or a recycled
`RecvBuffer` from 1 MiB, or numpy memory for the largest) and receives it there:
no copy on either side. Host frames are sent from their own memory (no join).
A header it cannot parse, or a frame larger than announced, is a `ProtocolError`
that closes that one comm.

Writing from another thread: as tcp's comm, a sync client's connection allows
`write_now`: the caller's thread, about to block on a result, posts its one queued
message (a single small frame) itself, under the lock every post of a batch holds.

Progress and ucxx's set-up are in `ucx_progress.py`.

Device memory
-------------
When the UCX context has a CUDA transport (`cuda_copy`, `cuda_ipc`, `gdr_copy`),
batches are serialized with `taskcore.core.serialize.dumps_device` and device
frames travel as device memory (see `ucx_progress.device_support`). Otherwise plain `dumps`
copies device objects to host frames and the receiver rebuilds them.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import logging
import os
import struct
import threading
import weakref

from taskcore.core.serialize import dumps, loads
from taskcore.errors import AddressError, CommClosedError, ProtocolError
from taskcore.transports.addressing import get_ip, parse_host_port, unparse_host_port
from taskcore.transports.base import HANDSHAKE_LIMITS, Backend, Comm, Listener
from taskcore.transports.policy import DEFAULT_POLICY, RefusalLog, sweep_stalled
from taskcore.transports.ucx_progress import (ENV_DEFAULTS, device_support,  # noqa: F401
                                              import_ucxx, progress)

logger = logging.getLogger("taskcore.transports.ucx")

SCHEME = "ucx"
MAGIC = b"TCU1"
KIND_DATA, KIND_DATA_EXT, KIND_CLOSE = 1, 2, 3
FLAG_DEVICE = 1
_PREFIX = struct.Struct("<4sII")
_ENTRY = 9                                     # u64 nbytes + u8 flags
HEADER_BYTES = 4096                            # the receive buffer for headers
INLINE_FRAMES = (HEADER_BYTES - _PREFIX.size) // _ENTRY
DIRECT_MAX = 8192                              # write_now takes messages up to this size
HIGH_WATER = 4 * 1024 * 1024                   # bytes posted, not yet sent, before write() waits
POOL_MIN = 1 << 20                             # frames from here use recycled RecvBuffers


# -- the comm --------------------------------------------------------------------------------

def _host_buffer(n):
    """Writable memory for a received host frame of `n` bytes, allocated once."""
    if n >= POOL_MIN:
        from taskcore.core.wire import RecvBuffer

        buf = RecvBuffer(n)
        view = memoryview(buf)
        if len(view) == n:          # a block of 64 MiB and more grows as it fills: not here
            return view
        import numpy as np

        return memoryview(np.empty(n, dtype="u1"))
    return bytearray(n)


def _is_device(frame):
    return hasattr(frame, "__cuda_array_interface__")


def _copy_exc(exc):
    """A copy of why the comm closed, to raise: raising the stored one would give it a
    traceback whose frames hold the comm."""
    try:
        new = copy.copy(exc)
    except Exception:
        return exc
    new.__cause__ = exc.__cause__
    return new


class UCXComm:
    """A comm over one ucxx Endpoint (see the module doc for the wire format)."""

    def __init__(self, ep, driver, local_address, peer_address, limits=None,
                 handshake_limits=None, high_water=HIGH_WATER):
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull

        self._Array = Array
        self._mask = TagMaskFull
        self.ep = ep
        self._uep = ep._ep               # the request-level endpoint (see module doc)
        self._send_tag = Tag(ep._tags["msg_send"])
        self._recv_tag = Tag(ep._tags["msg_recv"])
        self.driver = driver
        self.loop = driver.loop
        self.local_address = local_address
        self.peer_address = peer_address
        from taskcore.core.wire import Limits

        self.limits = limits or Limits()
        self._next_limits = self.limits if handshake_limits is not None else None
        self._rlimits = handshake_limits or self.limits
        self.high_water = high_water
        self.handshake_info = None
        self.closed = False
        self.exc = None
        self.on_message = None
        self.on_close = None
        self.lost = self.loop.create_future()
        self.outbox = []
        self.flush_scheduled = False
        self.flushed = None
        self.drain_waiter = None
        self.inflight = 0                 # bytes posted for sending, not yet completed
        self.inbox = collections.deque()
        self.inbox_bytes = 0
        self.read_waiter = None
        self.reading_paused = False
        self.receiving = False            # a header receive is posted
        self.mid_message = False          # a header arrived, its frames have not all
        self.frames_received = 0          # counts completed receives (for the stall sweep)
        self.bytes_read = 0
        self.bytes_written = 0
        # write_now (see there): every post of a batch holds this lock, so a caller
        # thread's message never lands between another batch's header and frames.
        self._post_lock = threading.Lock()
        self._write_now_ok = False
        self.direct_writes = 0
        self._hdr = bytearray(HEADER_BYTES)
        self._hdr_arr = Array(self._hdr)
        ref = weakref.ref(self)
        ep.set_close_callback(_on_endpoint_closed, cb_args=(ref,))

    def __repr__(self):
        return (f"<UCXComm {self.local_address} -> {self.peer_address} "
                f"{'closed' if self.closed else 'open'}>")

    # ucx:// frames go uncompressed: UCX links are fast, and loopback ones fastest.
    @property
    def compression(self):
        return False

    @compression.setter
    def compression(self, value):
        pass

    @property
    def device_frames(self):
        """True when this comm writes with dumps_device: GPU memory travels as it is (the
        worker then hands it GPU results themselves, not host copies)."""
        return bool(device_support())

    # -- receiving ------------------------------------------------------------------------

    def start(self):
        self._post_header()
        return self

    def _post_header(self):
        if self.closed or self.reading_paused or self.receiving:
            return
        self.receiving = True
        try:
            req = self._uep.tag_recv(self._hdr_arr, self._recv_tag, self._mask)
        except Exception as e:
            self._fail(CommClosedError(f"connection to {self.peer_address} lost: {e}"))
            return
        self.driver.watch(req, self._on_header)

    def _recv_error(self, req):
        """None if `req` succeeded, else the exception that closes this comm."""
        try:
            req.check_error()
            return None
        except Exception as e:
            if self.closed:
                return self.exc or CommClosedError("closed")
            if "Truncated" in type(e).__name__:          # UCX(X)MessageTruncatedError
                return ProtocolError(f"a message from {self.peer_address} is larger than its "
                                     f"header announced")
            return CommClosedError(f"connection to {self.peer_address} lost: "
                                   f"{type(e).__name__}: {e}")

    def _on_header(self, req):
        self.receiving = False
        if self.closed:
            return
        err = self._recv_error(req)
        if err is not None:
            self._fail(err)
            return
        self.frames_received += 1
        try:
            self._parse_header()
        except ProtocolError as e:
            self._fail(e)

    def _parse_header(self):
        hdr = self._hdr
        magic, kind, nframes = _PREFIX.unpack_from(hdr, 0)
        if magic != MAGIC:
            raise ProtocolError(f"malformed ucx:// header from {self.peer_address}: bad magic "
                                f"{bytes(magic)!r} (not a taskcore peer?)")
        if kind == KIND_CLOSE:
            self._lost(CommClosedError(f"connection to {self.peer_address} closed by peer"))
            return
        if kind not in (KIND_DATA, KIND_DATA_EXT):
            raise ProtocolError(f"malformed ucx:// header from {self.peer_address}: "
                                f"unknown kind {kind}")
        lim = self._rlimits
        if nframes < 1 or nframes > lim.max_frames:
            raise ProtocolError(f"a message from {self.peer_address} declares {nframes} frames;"
                                f" the limit is 1 to {lim.max_frames} (max_frames)")
        if kind == KIND_DATA:
            if nframes > INLINE_FRAMES:
                raise ProtocolError(f"malformed ucx:// header from {self.peer_address}: "
                                    f"{nframes} frames do not fit inline")
            self._table(memoryview(hdr)[_PREFIX.size:_PREFIX.size + _ENTRY * nframes], nframes)
            return
        if kind == KIND_DATA_EXT and nframes <= INLINE_FRAMES:
            raise ProtocolError(f"malformed ucx:// header from {self.peer_address}: "
                                f"{nframes} frames announced in a separate table")
        table = bytearray(_ENTRY * nframes)
        self.mid_message = True
        try:
            req = self._uep.tag_recv(self._Array(table), self._recv_tag, self._mask)
        except Exception as e:
            self._fail(CommClosedError(f"connection to {self.peer_address} lost: {e}"))
            return

        def on_table(req):
            if self.closed:
                return
            err = self._recv_error(req)
            if err is not None:
                self._fail(err)
                return
            self.frames_received += 1
            try:
                self._table(memoryview(table), nframes)
            except ProtocolError as e:
                self._fail(e)

        self.driver.watch(req, on_table)

    def _table(self, table, nframes):
        lim = self._rlimits
        sizes = []
        flags = []
        total = 0
        for i in range(nframes):
            n, f = struct.unpack_from("<QB", table, i * _ENTRY)
            if n > lim.max_frame_size:
                raise ProtocolError(f"a message from {self.peer_address} declares a frame of {n}"
                                    f" bytes; the limit is {lim.max_frame_size} (max_frame_size)")
            if f & ~FLAG_DEVICE:
                raise ProtocolError(f"a message from {self.peer_address} has unknown frame "
                                    f"flags {f:#x}")
            total += n
            sizes.append(n)
            flags.append(f)
        if total > lim.max_message_size:
            raise ProtocolError(f"a message from {self.peer_address} declares {total} bytes; "
                                f"the limit is {lim.max_message_size} (max_message_size)")
        if self._next_limits is not None:          # the handshake's limits end here
            self._rlimits, self._next_limits = self._next_limits, None
        device = device_support() if any(flags) else False
        frames = []
        for n, f in zip(sizes, flags):
            if f & FLAG_DEVICE and device and n:
                frames.append(device[1](n))
            else:
                frames.append(_host_buffer(n))
        pending = [i for i, n in enumerate(sizes) if n]
        self.mid_message = bool(pending)
        if not pending:
            self._deliver(frames, total)
            return
        state = {"left": len(pending)}

        def on_frame(req):
            if self.closed:
                return
            err = self._recv_error(req)
            if err is not None:
                self._fail(err)
                return
            self.frames_received += 1
            state["left"] -= 1
            if state["left"] == 0:
                self.mid_message = False
                self._deliver(frames, total)

        try:
            for i in pending:
                req = self._uep.tag_recv(self._Array(frames[i]), self._recv_tag, self._mask)
                self.driver.watch(req, on_frame)
        except Exception as e:
            self._fail(CommClosedError(f"connection to {self.peer_address} lost: {e}"))

    def _deliver(self, frames, nbytes):
        self.bytes_read += nbytes
        try:
            batch = loads(frames)
            if type(batch) is not list:
                raise ProtocolError(f"a wire message must carry a list of messages, "
                                    f"got {type(batch).__name__}")
        except ProtocolError as e:
            self._fail(e)
            return
        except Exception as e:
            self._fail(ProtocolError(f"could not decode message: {e!r}"))
            return
        handler = self.on_message
        drv = self.driver
        drv.depth += 1                    # replies sent by the handler go out as one batch
        try:
            if handler is not None:
                for msg in batch:
                    if self.closed:
                        break
                    handler(msg)
            else:
                self.inbox.extend(batch)
                self.inbox_bytes += nbytes
                if self.inbox_bytes > self.high_water or len(self.inbox) > 100_000:
                    self.reading_paused = True     # UCX holds the rest (back-pressure)
                self._wake_reader()
        except Exception:
            logger.exception("message handler failed on %s", self)
        finally:
            drv.depth -= 1
            if drv.depth == 0 and drv.dirty:
                dirty, drv.dirty = drv.dirty, []
                for comm in dirty:
                    comm._flush()
        self._post_header()

    def _wake_reader(self):
        w = self.read_waiter
        if w is not None:
            self.read_waiter = None
            if not w.done():
                w.set_result(None)

    async def read(self):
        while True:
            if self.inbox:
                msg = self.inbox.popleft()
                if not self.inbox:
                    self.inbox_bytes = 0
                    if self.reading_paused:
                        self.reading_paused = False
                        self._post_header()
                return msg
            if self.closed:
                raise _copy_exc(self.exc)
            if self.on_message is not None:
                raise RuntimeError("read() is not available while a message handler is set")
            self.read_waiter = self.loop.create_future()
            await self.read_waiter

    def set_message_handler(self, handler):
        self.on_message = handler
        if handler is not None:
            while self.inbox and not self.closed:
                handler(self.inbox.popleft())
            self.inbox_bytes = 0
            if self.reading_paused:
                self.reading_paused = False
                self._post_header()

    # -- sending ------------------------------------------------------------------------------

    def send(self, msg):
        """Queue `msg`; it goes out, batched, at the end of this callback or loop tick."""
        if self.closed:
            raise _copy_exc(self.exc)
        self.outbox.append(msg)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            if self.driver.depth > 0:
                self.driver.dirty.append(self)
            else:
                self.loop.call_soon(self._flush_cb)

    def flush(self):
        """Post what `send` queued now (a sender that knows its batch is complete)."""
        if self.flush_scheduled:
            self._flush()

    def _flush_cb(self):
        if self.flush_scheduled:
            self._flush()

    async def write(self, msg):
        """Queue `msg`; return once it is posted and fewer than `high_water` bytes of this
        comm are still on their way (a slow reader holds the writer back)."""
        self.send(msg)
        if self.flush_scheduled:
            if self.flushed is None:
                self.flushed = self.loop.create_future()
            await self.flushed
        while self.inflight > self.high_water and not self.closed:
            if self.drain_waiter is None:
                self.drain_waiter = self.loop.create_future()
            await self.drain_waiter
        if self.closed and self.exc is not None and not isinstance(self.exc, CommClosedError):
            raise _copy_exc(self.exc)

    def _flush(self):
        self.flush_scheduled = False
        w = self.flushed
        if w is not None:
            self.flushed = None
            if not w.done():
                w.set_result(None)
        if not self.outbox or self.closed:
            self.outbox = []
            return
        batch, self.outbox = self.outbox, []
        device = device_support()
        try:
            frames = device[0](batch) if device else dumps(batch)
        except Exception:
            frames = self._dumps_each(batch, device)
            if not frames:
                return
        self._post_frames(frames, device)

    def _dumps_each(self, batch, device):
        # One message that cannot be serialized is dropped, and said so; the others go.
        good = []
        for msg in batch:
            try:
                (device[0] if device else dumps)([msg])
                good.append(msg)
            except Exception as e:
                logger.error("dropping a message to %s that cannot be serialized: %r",
                             self.peer_address, e)
        return (device[0] if device else dumps)(good) if good else None

    def _post_frames(self, frames, device):
        n = len(frames)
        sizes = []
        flags = []
        any_device = False
        for f in frames:
            if _is_device(f):
                any_device = True
                a = self._Array(f)
                sizes.append(a.nbytes)
                flags.append(FLAG_DEVICE)
            else:
                sizes.append(memoryview(f).nbytes)
                flags.append(0)
        table = b"".join(struct.pack("<QB", s, fl) for s, fl in zip(sizes, flags))
        if n <= INLINE_FRAMES:
            msgs = [_PREFIX.pack(MAGIC, KIND_DATA, n) + table]
        else:
            msgs = [_PREFIX.pack(MAGIC, KIND_DATA_EXT, n), table]
        if any_device and device and device[3] is not None:
            device[3]()                     # UCX is not stream-ordered: finish the writes
        msgs.extend(f for f, s in zip(frames, sizes) if s)
        total = sum(sizes)
        self.bytes_written += total
        self._post_sends(msgs, total)

    def allow_write_now(self):
        """Let `write_now` post from other threads (a sync client's connection)."""
        self._write_now_ok = True

    def write_now(self, msg):
        """From a thread other than the loop's, about to block on a reply: post `msg`
        (one small message, one host frame) to UCX now, instead of waiting for the
        loop thread to wake up and flush it. False: not done (nothing queued here may be
        overtaken, the comm must allow it, the message must be small), and the loop
        sends it as usual. The loop adopts the requests to see them complete."""
        if not self._write_now_ok or self.closed or self.outbox or self.flush_scheduled:
            return False
        try:
            frames = dumps([msg])
        except Exception:
            return False
        if len(frames) != 1 or len(frames[0]) > DIRECT_MAX:
            return False
        frame = frames[0]
        header = _PREFIX.pack(MAGIC, KIND_DATA, 1) + struct.pack("<QB", len(frame), 0)
        Array = self._Array
        with self._post_lock:
            if self.closed or self.outbox or self.flush_scheduled:
                return False
            try:
                reqs = [self._uep.tag_send(Array(m), self._send_tag) for m in (header, frame)]
            except Exception:
                return False            # the loop's own post will fail and say why
        self.bytes_written += len(frame)
        self.direct_writes += 1
        try:
            self.loop.call_soon_threadsafe(self._adopt, reqs, (header, frame))
        except RuntimeError:            # the loop is closed: so is the comm, soon
            pass
        return True

    def _adopt(self, reqs, keep):
        """Watch requests a caller thread posted (write_now), holding their memory."""
        def on_sent(req):
            if not self.closed:
                try:
                    req.check_error()
                except Exception as e:
                    self._fail(CommClosedError(f"connection to {self.peer_address} lost "
                                               f"while writing: {type(e).__name__}: {e}"))
        for req in reqs:
            self.driver.watch_send(req, lambda r, keep=keep: on_sent(r))

    def _post_sends(self, msgs, total):
        self.inflight += total
        state = {"left": len(msgs), "msgs": msgs}   # the frames stay alive until sent

        def on_sent(req):
            state["left"] -= 1
            if state["left"] == 0:
                state["msgs"] = None
                self.inflight -= total
                if self.inflight <= self.high_water:
                    self._wake_drain()
            if not self.closed:
                try:
                    req.check_error()
                except Exception as e:
                    self._fail(CommClosedError(f"connection to {self.peer_address} lost while "
                                               f"writing: {type(e).__name__}: {e}"))

        Array = self._Array
        try:
            with self._post_lock:
                reqs = [self._uep.tag_send(Array(m), self._send_tag) for m in msgs]
            for req in reqs:
                self.driver.watch_send(req, on_sent)
        except Exception as e:
            self.inflight -= total
            self._fail(CommClosedError(f"connection to {self.peer_address} lost: {e}"))

    def _wake_drain(self):
        w = self.drain_waiter
        if w is not None:
            self.drain_waiter = None
            if not w.done():
                w.set_result(None)

    # -- closing ------------------------------------------------------------------------------

    def _fail(self, exc):
        """Close at once because of `exc` (a ProtocolError names the peer's fault)."""
        if self.closed:
            return
        if isinstance(exc, ProtocolError):
            log = logger.warning if self.handshake_info is not None else logger.debug
            log("closing connection from %s: %s", self.peer_address, exc)
        self._lost(exc)

    def _lost(self, exc):
        if self.closed:
            return
        self.closed = True
        self.exc = exc
        self.outbox = []
        ep, self.ep = self.ep, None
        if ep is not None:
            try:
                ep.abort()
            except Exception:
                pass
        self._uep = None
        self.on_message = None           # the handler usually holds this comm: no cycle left
        self._wake_reader()
        self._wake_drain()
        w = self.flushed
        if w is not None:
            self.flushed = None
            if not w.done():
                w.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)
        cb, self.on_close = self.on_close, None
        if cb is not None:
            cb(self)

    async def close(self):
        """Send what is queued and a close notice, then close the endpoint."""
        if self.closed:
            await self.lost
            return
        self._flush()
        if not self.closed:
            self._post_sends([_PREFIX.pack(MAGIC, KIND_CLOSE, 0)], 0)
            deadline = self.loop.time() + 5
            while self.inflight > 0 and not self.closed and self.loop.time() < deadline:
                if self.drain_waiter is None:
                    self.drain_waiter = self.loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(self.drain_waiter), 1)
                except asyncio.TimeoutError:
                    pass
                if self.inflight <= self.high_water and self.inflight > 0:
                    await asyncio.sleep(0.001)
            # The close notice must have left before the endpoint goes.
            await asyncio.sleep(0)
        self._lost(CommClosedError(f"comm to {self.peer_address} was closed locally"))

    def abort(self):
        """Close at once, discarding anything not yet sent.

        A close notice still goes out, best effort: UCX tells the peer of a closed
        endpoint only at its next progress sweep, up to half a second later."""
        if not self.closed and self._uep is not None:
            try:
                with self._post_lock:
                    req = self._uep.tag_send(self._Array(_PREFIX.pack(MAGIC, KIND_CLOSE, 0)),
                                             self._send_tag)
                for _ in range(100):            # a few microseconds: never blocks
                    if req.completed:
                        break
                    self.driver.worker.progress()
            except Exception:
                pass
        self._lost(CommClosedError(f"comm to {self.peer_address} was aborted locally"))


Comm.register(UCXComm)


def _on_endpoint_closed(ref):
    """ucxx's endpoint close callback (the peer went away, or the link failed)."""
    comm = ref()
    if comm is not None and not comm.closed:
        # Called during progress: finish this round before closing, so messages that
        # completed in it are delivered first.
        comm.loop.call_soon(_close_lost, ref)


def _close_lost(ref):
    comm = ref()
    if comm is not None and not comm.closed:
        comm.driver.run()                 # deliver what already arrived
        if not comm.closed:
            comm._lost(CommClosedError(f"connection to {comm.peer_address} closed by peer"))


# -- listening and connecting --------------------------------------------------------------

def _check_loc(loc, default_port=None):
    host, port = parse_host_port(loc, default_port)
    if not host:
        if default_port is None:
            raise AddressError(f"ucx:// address {loc!r} has no host")
    return host, port


class UCXListener(Listener):
    def __init__(self, loc, on_comm, limits=None, handshake=True, policy=None):
        self.host, self.port = _check_loc(loc, 0)
        self.on_comm = on_comm
        self.limits = limits
        self.handshake_limits = HANDSHAKE_LIMITS if handshake else None
        self.policy = policy or DEFAULT_POLICY
        self.max_connections = self.policy.connection_limit()
        self.comms = set()
        self._tasks = set()
        self._ucx = None
        self._sweeper = None
        self._peers = itertools.count(1)
        self.refused_full = RefusalLog(logger, "connections over max_connections")
        self.stalls = RefusalLog(logger, "stalled connections closed",
                                 action="closing connection from")
        self.closed_stalled = 0

    async def start(self):
        ucxx = import_ucxx()
        self.driver = progress()
        self._ucx = ucxx.create_listener(self._on_endpoint, port=self.port)
        self.bound_port = self._ucx.port
        self._sweeper = asyncio.ensure_future(
            sweep_stalled(self, lambda comm: comm.frames_received, "frame"))
        return self

    def _on_endpoint(self, ep):
        # ucxx calls this on our loop once the endpoint exchanged its tags.
        peer = f"{SCHEME}://peer-{next(self._peers)}.{self.contact_address[len(SCHEME) + 3:]}"
        if self._ucx is None:
            ep.abort()
            return
        if len(self.comms) >= self.max_connections:
            self.refused_full(peer, f"{len(self.comms)} connections are open, the limit "
                                    f"(max_connections, TASKCORE_MAX_CONNECTIONS)")
            ep.abort()
            return
        comm = UCXComm(ep, self.driver, self.contact_address, peer, self.limits,
                       self.handshake_limits)
        comm.on_close = self.comms.discard
        self.comms.add(comm)
        comm.start()
        task = asyncio.ensure_future(self.on_comm(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def listen_address(self):
        return f"{SCHEME}://{unparse_host_port(self.host or '0.0.0.0', self.bound_port)}"

    @property
    def contact_address(self):
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = get_ip()
        return f"{SCHEME}://{unparse_host_port(host, self.bound_port)}"

    async def stop(self):
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._ucx is not None:
            self._ucx.close()
            self._ucx = None
        for comm in list(self.comms):
            comm.abort()
        for task in list(self._tasks):
            task.cancel()


async def _create_endpoint(host, port, timeout):
    """`ucxx.create_endpoint`, except that a refused connection fails at once.

    ucxx's own version exchanges the endpoints' tags by awaiting a stream receive;
    when the refusal is processed before that receive is posted, the receive never
    completes and the connect hangs for its whole timeout. Here the endpoint's close
    callback ends the wait instead."""
    import ucxx
    from ucxx._lib import libucxx as ucx_api
    from ucxx._lib_async import Endpoint
    from ucxx._lib_async.exchange_peer_info import exchange_peer_info
    from ucxx._lib_async.utils import hash64bits

    loop = asyncio.get_running_loop()
    ctx = ucxx.core._get_ctx()
    try:
        uep = ucx_api.UCXEndpoint.create(ctx.worker, host, port, True)
    except Exception as e:
        raise ConnectionRefusedError(f"cannot connect to ucx://{unparse_host_port(host, port)}:"
                                     f" {type(e).__name__}: {e}") from None
    dead = loop.create_future()

    def on_dead():
        if not dead.done():
            dead.set_result(None)

    uep.set_close_callback(on_dead)
    ctx.worker.progress()
    msg_tag = hash64bits("msg_tag", os.urandom(16), uep.handle)
    exchange = asyncio.ensure_future(
        exchange_peer_info(endpoint=uep, msg_tag=msg_tag, listener=False,
                           connect_timeout=timeout))
    # Abandoned when the endpoint fails first; its late error is expected, not news.
    exchange.add_done_callback(lambda t: t.cancelled() or t.exception())
    why = None
    try:
        if uep.alive:
            await asyncio.wait([exchange, dead], return_when=asyncio.FIRST_COMPLETED)
        if exchange.done() and not exchange.cancelled() and exchange.exception() is None:
            peer = exchange.result()
        else:
            why = (exchange.exception() if exchange.done() and not exchange.cancelled()
                   else None)
            try:
                uep.raise_on_error()
            except Exception as e:
                why = e
            raise ConnectionRefusedError(
                f"cannot connect to ucx://{unparse_host_port(host, port)}: "
                f"{type(why).__name__ + ': ' + str(why) if why else 'the endpoint failed'}")
    finally:
        if not exchange.done():
            exchange.cancel()
    uep.remove_close_callback()
    return Endpoint(endpoint=uep, ctx=ctx, tags={"msg_send": peer["msg_tag"],
                                                 "msg_recv": msg_tag})


class UCXBackend(Backend):
    scheme = SCHEME

    async def connect(self, loc, limits=None, handshake=True, **options):
        host, port = _check_loc(loc)
        if port == 0:
            raise AddressError(f"ucx://{loc}: port 0 is not an address to connect to")
        import_ucxx()
        driver = progress()
        try:
            ep = await _create_endpoint(host, port, options.get("connect_timeout", 5.0))
        finally:
            driver.kick()                 # ucxx progressed the worker itself: reap
        # ucxx does not say which local port an endpoint uses: the host that routes there.
        local_host = get_ip("127.0.0.1" if host == "localhost" else host)
        local = f"{SCHEME}://{unparse_host_port(local_host, 0)}"
        comm = UCXComm(ep, driver, local, f"{SCHEME}://{unparse_host_port(host, port)}",
                       limits, HANDSHAKE_LIMITS if handshake else None)
        return comm.start()

    async def listen(self, loc, on_comm, limits=None, handshake=True, policy=None, **options):
        listener = UCXListener(loc, on_comm, limits=limits, handshake=handshake, policy=policy)
        return await listener.start()
