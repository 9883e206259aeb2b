# cython: language_level=3, boundscheck=False, wraparound=False
"""The stream protocol: framed, batched messages over an asyncio stream transport.

This is the one module of the compiled core that touches I/O. Like asyncpg's
`CoreProtocol`, the Cython class owns the transport and all per-message work,
and a thin Python class mixes in `asyncio.BufferedProtocol` (see
`taskcore.transports.tcp`).

Reading
    uvloop calls `get_buffer`/`buffer_updated`; the `FrameDecoder` hands out
    buffers (a shared scratch for small data, a final-size buffer for large
    frames) and returns the messages each read completed. Every wire message is
    one *batch*: a list of messages serialized together, so one `loads` call
    serves every message the peer sent in one tick.

Writing
    `send(msg)` only appends to an outbox. The outbox is flushed as one wire
    message (one `dumps`, one `writelines`):
      * at the end of the I/O callback that is running, if any, on this loop
        (a reply to a request goes out in the same loop iteration: no extra
        ~10 µs wake-up per hop), or else
      * via `loop.call_soon`, once per tick however many messages were sent.
    That batches per event-loop tick rather than on a timer (docs/design.md).

Writing from another thread (`write_now`)
    A sync client's caller thread that is about to block on a result writes its
    one queued message to the socket itself, just before it blocks, instead of
    leaving it to the loop thread (whose wake-up and flush are otherwise one
    more step of the round trip: -8 to -14% of a submit -> result, measured in
    paired rounds). It writes through a dup of the socket's descriptor, only
    when nothing is queued or buffered on the loop's side (a comm allows it with
    `allow_write_now`: the client's connection to its scheduler), and under `wlock`,
    which every write to the socket holds; whatever the kernel does not take
    at once is left in `tail` for the loop thread, which writes it before
    anything else. Nobody holds the GIL while waiting for `wlock` (it is taken
    with the GIL released), so neither thread can block the other for good.
    Plain TCP only: TLS encrypts in the transport.

Backpressure
    The transport calls `pause_writing` when its buffer passes the high-water
    mark; `await write(msg)` then waits for `resume_writing`, so a slow reader
    never makes the sender buffer without bound.

Errors
    A `ProtocolError` from the decoder or the deserializer aborts this one
    connection; `read()` then raises it, naming the fault.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock, PyThread_release_lock)
from libc.errno cimport EINTR, errno
from posix.unistd cimport close as c_close
from taskcore.core.wire cimport FrameDecoder, Limits, encode_header, frame_nbytes

cdef extern from "sys/socket.h":
    ssize_t c_send "send"(int fd, const void* buf, size_t n, int flags) nogil
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

import collections
import logging
from copy import copy as _copy
import os
import socket
import weakref

from taskcore.core.serialize import dumps, loads, compress_frames, decompress_frames
from taskcore.errors import CommClosedError, ProtocolError

logger = logging.getLogger("taskcore.protocol")

cdef object _deque = collections.deque
# The op of the last message a comm sends before it drops a peer that broke the protocol.
PROTOCOL_ERROR = "protocol-error"
cdef object _ProtocolError = ProtocolError
cdef object _CommClosedError = CommClosedError

# Messages smaller than this go out as one contiguous write (header + frames
# joined); larger ones use writelines so big frames are never copied.
cdef Py_ssize_t SMALL_WRITE = 64 * 1024
# write_now takes messages up to this size (frame 0 alone, never compressed).
cdef Py_ssize_t DIRECT_MAX = 8192


cdef class MessageSink:
    """The write side of a comm as compiled code sees it (protocol.pxd).

    This base is the behaviour of a comm without a fast path: nothing
    (`queue` must be provided by a subclass; see `CallSink`)."""

    cdef int queue(self, object msg) except -1:
        raise TypeError(f"{type(self).__name__} does not implement queue()")

    cdef int begin_batch(self) except -1:
        return 0

    cdef int end_batch(self) except -1:
        return 0

    cdef int flush_now(self) except -1:
        return 0

    cdef bint write_now(self, object msg) except -1:
        return False


@cython.final
cdef class CallSink(MessageSink):
    """The sink of a comm written in Python (inproc://, third-party transports):
    `queue` is its `send`, a batch ends with its `flush()`, and `write_now` is
    its own if it has one (see `StreamProtocol.write_now` for the contract)."""

    def __init__(self, comm):
        self.comm = comm
        self._send = comm.send
        self._write_now = getattr(comm, "write_now", None)

    cdef int queue(self, object msg) except -1:
        self._send(msg)
        return 0

    cdef int end_batch(self) except -1:
        return self.flush_now()

    cdef int flush_now(self) except -1:
        flush = getattr(self.comm, "flush", None)
        if flush is not None:
            flush()
        return 0

    cdef bint write_now(self, object msg) except -1:
        if self._write_now is None:
            return False
        return bool(self._write_now(msg))


cdef object _fresh(object exc):
    """A copy of why a comm closed, to raise: raising the stored exception itself
    would give it a traceback whose frames hold the comm (a reference cycle)."""
    try:
        new = _copy(exc)
    except Exception:
        return exc
    new.__cause__ = exc.__cause__
    return new


cpdef MessageSink sink_of(object comm):
    """The sink compiled senders use for `comm`: the comm's own `sink` when it
    provides one (a capability: StreamProtocol is its own), else a CallSink
    over its `send`. Taken once per connection."""
    s = getattr(comm, "sink", None)
    if s is not None:
        return <MessageSink?>s
    return CallSink(comm)


@cython.final
cdef class LoopFlusher:
    """Per-event-loop record of comms with queued output inside I/O callbacks."""

    def __cinit__(self):
        self.depth = 0
        self.dirty = []

    cdef inline void enter(self):
        self.depth += 1

    cdef void leave(self):
        cdef StreamProtocol p
        cdef list dirty
        self.depth -= 1
        if self.depth == 0 and self.dirty:
            dirty = self.dirty
            self.dirty = []
            for p in dirty:
                p._flush()


cdef object _flushers = weakref.WeakKeyDictionary()


cdef LoopFlusher _flusher_for(object loop):
    f = _flushers.get(loop)
    if f is None:
        f = LoopFlusher()
        _flushers[loop] = f
    return <LoopFlusher>f


cdef class StreamProtocol:
    """Framed message protocol core. Subclass together with asyncio.BufferedProtocol."""

    def __cinit__(self, *args, **kwargs):
        self.wlock = PyThread_allocate_lock()
        if self.wlock == NULL:
            raise MemoryError("cannot allocate a lock")
        self.wfd = -1
        self.rawfd = -1
        self.tail = None

    def __dealloc__(self):
        if self.wfd >= 0:
            c_close(self.wfd)
        if self.wlock != NULL:
            PyThread_free_lock(self.wlock)

    def __init__(self, loop, Limits limits=None, Limits handshake_limits=None,
                 bint compression=False, Py_ssize_t high_water=4 * 1024 * 1024):
        """`handshake_limits`, if given, bound the first message only (the handshake,
        read before the peer is authenticated); `limits` bound everything after it."""
        self.loop = loop
        self.flusher = _flusher_for(loop)
        if limits is None:
            limits = Limits()
        if handshake_limits is not None:
            self.decoder = FrameDecoder(handshake_limits, next_limits=limits)
        else:
            self.decoder = FrameDecoder(limits)
        self.limits = limits
        self.outbox = []
        self.flush_scheduled = False
        self.paused = False
        self.closed = False
        self.drain_waiter = None
        self.flushed = None
        self.inbox = _deque()
        self.inbox_bytes = 0
        self.reading_paused = False
        self.read_waiter = None
        self.on_message = None
        self.on_close = None
        self.exc = None
        self.compression = compression
        self.high_water = high_water
        self.transport = None
        self.connected = loop.create_future()
        self.lost = loop.create_future()
        self.local_address = None
        self.peer_address = None
        self.handshake_info = None
        self.bytes_read = 0
        self.bytes_written = 0

    # -- asyncio protocol callbacks -------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:  # pragma: no cover - some platforms/socket kinds refuse
                pass
        transport.set_write_buffer_limits(high=self.high_water)
        if (sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
                and transport.get_extra_info("sslcontext") is None):
            try:
                self.rawfd = sock.fileno()
            except (OSError, ValueError):
                self.rawfd = -1
        if not self.connected.done():
            self.connected.set_result(None)

    def get_buffer(self, Py_ssize_t sizehint):
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef list done
        cdef tuple item
        cdef list handled = []
        cdef LoopFlusher fl = self.flusher
        self.bytes_read += nbytes
        fl.enter()
        try:
            try:
                done = self.decoder.buffer_updated(nbytes)
                for item in done:
                    # The handled messages are freed after the flush below, when
                    # this returns: replies go out before the deallocations.
                    handled.append(self._deliver(item))
            except _ProtocolError as e:
                self._protocol_error(e)
            except Exception as e:
                # A decode fault we did not anticipate is still the peer's fault
                # as far as this connection goes: contain it here.
                self._protocol_error(_ProtocolError(f"could not decode message: {e!r}"))
        finally:
            fl.leave()

    def eof_received(self):
        return False  # close the transport

    def connection_lost(self, exc):
        self.closed = True
        self.rawfd = -1
        self._lock_writes()
        if self.wfd >= 0:
            c_close(self.wfd)
            self.wfd = -1
        self.tail = None
        PyThread_release_lock(self.wlock)
        if self.exc is None:
            self.exc = _CommClosedError(
                f"connection to {self.peer_address} closed" + (f": {exc}" if exc else ""))
        self._wake_all()
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.connected.done():
            self.connected.set_exception(self.exc)
        # Break the comm -> handler -> peer record -> comm cycle here, so a closed
        # connection is freed by reference counting, not by the cycle collector.
        self.on_message = None
        cb = self.on_close
        if cb is not None:
            self.on_close = None
            cb(self)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        w = self.drain_waiter
        if w is not None:
            self.drain_waiter = None
            if not w.done():
                w.set_result(None)

    # -- receiving ------------------------------------------------------------------

    cdef object _deliver(self, tuple item):
        """Decode one wire message and hand its messages on; returns them."""
        frames, flags = item
        if flags is not None:
            frames = decompress_frames(frames, flags, self.limits.max_frame_size)
        batch = loads(frames)
        if type(batch) is not list:
            raise _ProtocolError(f"a wire message must carry a list of messages, "
                                 f"got {type(batch).__name__}")
        handler = self.on_message
        if handler is not None:
            for msg in <list>batch:
                if self.closed:
                    break
                handler(msg)
        else:
            self.inbox.extend(<list>batch)
            # Receive-side flow control: if the application does not read, stop
            # reading from the socket so TCP pushes back on the sender.
            for f in frames:
                self.inbox_bytes += frame_nbytes(f)
            if (not self.reading_paused and self.transport is not None and
                    (self.inbox_bytes > self.high_water or len(self.inbox) > 100_000)):
                self.reading_paused = True
                self.transport.pause_reading()
            w = self.read_waiter
            if w is not None:
                self.read_waiter = None
                if not w.done():
                    w.set_result(None)
        return batch

    cdef void _protocol_error(self, exc):
        if self.handshake_info is None:
            # Before the handshake the listener's throttled refusal log says it; a
            # warning per garbage connection here would flood the log.
            logger.debug("closing connection from %s: %s", self.peer_address, exc)
        else:
            logger.warning("closing connection from %s: %s", self.peer_address, exc)
        self.exc = exc
        self.closed = True
        self._wake_all()
        if self.transport is not None:
            if self.handshake_info is not None and not self.transport.is_closing():
                self._tell_peer(str(exc))
            else:
                self.transport.abort()

    cdef void _tell_peer(self, str reason):
        """After the handshake the peer speaks this protocol: one last message, the
        `protocol-error` op, says why its connection ends (its side would otherwise see
        only a dropped connection). Then the connection closes once that is written,
        or is aborted a second later."""
        cdef list frames
        try:
            frames = dumps([{"op": PROTOCOL_ERROR, "reason": reason}])
            self._lock_writes()
            try:
                self.transport.writelines([encode_header(frames, None)] + frames)
            finally:
                PyThread_release_lock(self.wlock)
            self.transport.close()
            self.loop.call_later(1.0, self.transport.abort)
        except Exception:
            self.transport.abort()

    cdef void _wake_all(self):
        w = self.flushed
        if w is not None:
            self.flushed = None
            if not w.done():
                w.set_result(None)
        w = self.read_waiter
        if w is not None:
            self.read_waiter = None
            if not w.done():
                w.set_result(None)
        w = self.drain_waiter
        if w is not None:
            self.drain_waiter = None
            if not w.done():
                w.set_result(None)

    async def read(self):
        """The next message. Raises CommClosedError/ProtocolError once closed and drained."""
        while True:
            if self.inbox:
                msg = self.inbox.popleft()
                if not self.inbox:
                    self.inbox_bytes = 0
                    if self.reading_paused:
                        self.reading_paused = False
                        if not self.closed:
                            self.transport.resume_reading()
                return msg
            if self.closed:
                raise _fresh(self.exc)
            if self.on_message is not None:
                raise RuntimeError("read() is not available while a message handler is set")
            self.read_waiter = self.loop.create_future()
            await self.read_waiter

    def set_message_handler(self, handler):
        """Deliver messages by calling `handler(msg)` from the I/O callback (fast path).

        Messages already received are delivered immediately.
        """
        self.on_message = handler
        if handler is not None:
            while self.inbox and not self.closed:
                handler(self.inbox.popleft())
            self.inbox_bytes = 0
            if self.reading_paused and not self.closed:
                self.reading_paused = False
                self.transport.resume_reading()

    # -- sending --------------------------------------------------------------------

    def send(self, msg):
        """Queue `msg`; it goes out, batched, at the end of this callback or tick."""
        self.queue(msg)

    @property
    def sink(self):
        """This comm's `MessageSink` (itself: the compiled write path)."""
        return self

    cdef int begin_batch(self) except -1:
        # Inside begin/end, queue() only appends (no call_soon for a flush of
        # its own); end_batch() writes everything queued, now.
        self.flusher.enter()
        return 0

    cdef int end_batch(self) except -1:
        self.flusher.leave()
        return 0

    cdef int flush_now(self) except -1:
        # Also inside an I/O callback: the comm stays in the flusher's list, and
        # its flush at the end of the callback then finds nothing to write.
        if self.flush_scheduled:
            self._flush()
        return 0

    cdef int queue(self, object msg) except -1:
        """`send` for compiled callers: a plain C call through the sink's vtable.
        (A cpdef method would first look itself up on the instance, every call,
        since TCPComm is a Python subclass that might override it.)"""
        if self.closed:
            raise _fresh(self.exc) if self.exc is not None else _CommClosedError("comm closed")
        self.outbox.append(msg)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            if self.flusher.depth > 0:
                self.flusher.dirty.append(self)
            else:
                self.loop.call_soon(self._flush_cb)
        return 0

    cpdef flush(self):
        """Write what `send` queued now rather than at the end of this callback or
        tick: for a sender that knows its batch is complete outside an I/O
        callback (saves a loop iteration on a latency-bound path)."""
        if self.flush_scheduled:
            self._flush()

    async def write(self, msg):
        """Queue `msg`; return once it was handed to the transport and the transport is
        below its high-water mark.

        Writers in the same tick still share one flush (they all wait on the same
        future), but a writer that never yields cannot pile up an unbounded outbox.
        """
        self.queue(msg)
        if self.flush_scheduled:
            if self.flushed is None:
                self.flushed = self.loop.create_future()
            await self.flushed
        if self.paused and not self.closed:
            if self.drain_waiter is None:
                self.drain_waiter = self.loop.create_future()
            await self.drain_waiter
        if self.closed and self.exc is not None and not isinstance(self.exc, _CommClosedError):
            raise _fresh(self.exc)

    def _flush_cb(self):
        if self.flush_scheduled:                    # not flushed early by flush()
            self._flush()

    cdef int _flush(self) except -1:
        cdef list batch
        self.flush_scheduled = False
        w = self.flushed
        if w is not None:
            self.flushed = None
            if not w.done():
                w.set_result(None)
        if not self.outbox or self.transport is None:
            return 0
        if self.closed or self.transport.is_closing():
            self.outbox = []
            return 0
        batch = self.outbox
        self.outbox = []
        try:
            frames = dumps(batch)
        except Exception:
            frames = self._dumps_each(batch)
            if frames is None:
                return 0
        self._write_frames(frames)
        return 0

    cdef object _dumps_each(self, list batch):
        # One message in the batch could not be serialized: send the others,
        # log the one that failed. The damage stays with that message.
        cdef list good = []
        for msg in batch:
            try:
                dumps([msg])
                good.append(msg)
            except Exception as e:
                logger.error("dropping a message to %s that cannot be serialized: %r",
                             self.peer_address, e)
        if not good:
            return None
        return dumps(good)

    cdef int _write_frames(self, list frames) except -1:
        cdef Py_ssize_t total = 0, n
        flags = None
        if self.compression:
            frames, flags = compress_frames(frames)
        header = encode_header(frames, flags)
        for f in frames:
            total += frame_nbytes(f)
        self.bytes_written += total + len(header)
        self._lock_writes()
        try:
            if self.tail is not None:          # the rest of a write_now goes first
                tail, self.tail = self.tail, None
                self.transport.write(tail)
            if total < SMALL_WRITE:
                if len(frames) == 1 and type(frames[0]) is bytes:
                    self._send_small(header + <bytes>frames[0])
                else:
                    self._send_small(b"".join([header] + frames))
            else:
                self.transport.writelines([header] + frames)
        finally:
            PyThread_release_lock(self.wlock)
        return 0

    cdef int _send_small(self, bytes data) except -1:
        """On the loop's thread, holding `wlock`: a small write goes straight to the
        socket when the transport holds nothing (uvloop's write path costs ~1k
        instructions more per message); whatever the kernel does not take at once
        goes to the transport, which writes it in order."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef ssize_t r
        if self.rawfd >= 0 and not self.transport.get_write_buffer_size():
            r = c_send(self.rawfd, PyBytes_AS_STRING(data), n, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r == n:
                return 0
            if r > 0:
                self.transport.write(data[r:])
                return 0
        self.transport.write(data)         # full, broken or not plain TCP: uvloop's way
        return 0

    cdef int _lock_writes(self) except -1:
        """Take `wlock`; wait for it with the GIL released (see the module doc)."""
        if not PyThread_acquire_lock(self.wlock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.wlock, WAIT_LOCK)
        return 0

    def _write_tail(self):
        self._lock_writes()
        try:
            if self.tail is not None and not self.closed:
                tail, self.tail = self.tail, None
                self.transport.write(tail)
        finally:
            PyThread_release_lock(self.wlock)

    cdef bint write_now(self, object msg) except -1:
        """Write `msg` (as a batch of one) to the socket from the calling thread,
        which is not the loop's (see the module doc). False, with nothing done,
        unless it is small and nothing is queued or buffered for this comm."""
        cdef bytes data
        cdef char* buf
        cdef Py_ssize_t n, done = 0
        cdef ssize_t r
        cdef int fd
        if (self.wfd < 0 or self.closed or self.paused or self.flush_scheduled or self.outbox
                or self.tail is not None):
            return False
        frames = dumps([msg])
        if (len(frames) != 1 or type(frames[0]) is not bytes
                or PyBytes_GET_SIZE(frames[0]) > DIRECT_MAX):
            return False
        data = encode_header(frames, None) + <bytes>frames[0]
        buf = PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
        self._lock_writes()
        try:
            # Again under the lock: the loop thread may have written meanwhile, and
            # what its transport still buffers must go out before this.
            fd = self.wfd
            if (fd < 0 or self.closed or self.flush_scheduled or self.outbox
                    or self.tail is not None or self.transport.get_write_buffer_size()):
                return False
            with nogil:
                while done < n:
                    r = c_send(fd, buf + done, n - done, MSG_NOSIGNAL)
                    if r < 0:
                        if errno == EINTR:
                            continue
                        break          # full (EAGAIN) or broken: the loop takes over
                    done += r
            self.bytes_written += n
            self.direct_writes += 1
            if done < n:
                self.tail = data[done:]
                self.loop.call_soon_threadsafe(self._write_tail)
            return True
        finally:
            PyThread_release_lock(self.wlock)

    def allow_write_now(self):
        """Let other threads `write_now` on this comm (a plain TCP one; on any other
        this does nothing and `write_now` keeps refusing). It costs a second
        descriptor for the socket, so only the comms that use it ask: a sync
        client's connection to its scheduler. Call it on the loop's thread."""
        if self.wfd >= 0 or self.closed or self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if (sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
                and self.transport.get_extra_info("sslcontext") is None):
            try:
                self.wfd = os.dup(sock.fileno())
            except (OSError, ValueError):
                self.wfd = -1

    def send_now(self, msg):
        """`write_now` for Python callers (tests): True if `msg` was written here."""
        return self.write_now(msg)

    # -- closing --------------------------------------------------------------------

    async def close(self):
        """Flush queued messages, close gracefully and wait until the connection is gone."""
        if self.transport is None:
            self.closed = True
            return
        if not self.closed:
            self._flush()
            self.closed = True
            if self.exc is None:
                self.exc = _CommClosedError(f"comm to {self.peer_address} was closed locally")
            self._wake_all()
            self.transport.close()
        await self.lost

    def abort(self):
        """Close at once, discarding anything not yet written."""
        self.outbox = []
        if not self.closed:
            self.closed = True
            if self.exc is None:
                self.exc = _CommClosedError(f"comm to {self.peer_address} was aborted locally")
            self._wake_all()
        if self.transport is not None:
            self.transport.abort()

    @property
    def mid_message(self):
        """True while a message is partly received and this side is reading: a
        peer that stops here holds the connection's buffers (see transports/policy)."""
        return (not self.closed and not self.reading_paused
                and self.decoder.in_message)

    @property
    def is_closed(self):
        return self.closed

    @property
    def pending_output(self):
        """Bytes queued in the transport (not yet accepted by the kernel)."""
        if self.transport is None:
            return 0
        return self.transport.get_write_buffer_size()
