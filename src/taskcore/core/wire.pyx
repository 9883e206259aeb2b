# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Frame header encoding and an incremental, allocation-bounded frame decoder.

Wire format (all integers little-endian)::

    u64 nframes | nframes x u64 length | nframes x u8 compression flag | frames

Theory of operation (decoder)
-----------------------------
The decoder is sans-I/O: a protocol asks it for a buffer (`get_buffer`),
lets the OS fill it, then reports how many bytes arrived (`buffer_updated`),
which returns the messages completed by those bytes.

* Small data lands in one reusable scratch buffer, so a single read can carry
  many small messages and they are parsed without another syscall. Small
  frames are copied out of the scratch (cheap) because the scratch is reused.
* A frame larger than `direct_threshold` gets its own buffer, allocated at
  its final size; what is already buffered is copied in, and from then on
  `get_buffer` hands out a view of that buffer's unfilled tail, so the kernel
  writes the payload straight into its final place: large frames are never
  concatenated or copied again.
* Every length is checked against `Limits` *before* anything is allocated, so
  a hostile length field can never trigger an unbounded allocation. A
  violation raises `ProtocolError` naming the fault; the caller closes that
  one connection.
* Memory is committed as bytes arrive, not as they are declared. The scratch
  starts at 16 kB and doubles (up to `scratch_size`) only when reads fill it,
  so an idle connection costs 16 kB. A frame of `GROW_MIN` (64 MiB) or more
  that no pooled buffer fits starts with a 64 MiB mapping that `mremap` doubles
  as it fills (the kernel moves page tables, it copies nothing), so a peer
  that declares 4 GiB and sends little holds little.
"""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo,
                             PyBUF_SIMPLE, PyBUF_WRITABLE)
from libc.stdint cimport uint64_t, uint8_t
from libc.string cimport memcpy, memmove

from taskcore.errors import ProtocolError

DEF_SCRATCH = 256 * 1024
SCRATCH_START = 16 * 1024
MAX_FRAMES_CAP = 1 << 32

# Format constants exposed to Python (tests, docs).
HEADER_PREFIX_SIZE = 8
FLAG_NONE = 0
FLAG_LZ4 = 1
KNOWN_FLAGS = frozenset((FLAG_NONE, FLAG_LZ4))

cdef enum DecoderState:
    ST_PREFIX = 0    # waiting for the 8-byte frame count
    ST_TABLE = 1     # waiting for the length and flag tables
    ST_FRAMES = 2    # reading frames through the scratch buffer
    ST_DIRECT = 3    # reading one large frame straight into its own buffer
    ST_BROKEN = 4    # a ProtocolError was raised; no further input accepted


@cython.final
cdef class Limits:
    """Bounds on untrusted input. All are checked before allocating."""

    def __init__(self, Py_ssize_t max_frames=1_000_000,
                 Py_ssize_t max_frame_size=4 * 1024 ** 3,
                 Py_ssize_t max_message_size=8 * 1024 ** 3):
        if max_frames < 1 or max_frame_size < 0 or max_message_size < 0:
            raise ValueError("limits must be positive")
        if max_frames > MAX_FRAMES_CAP:
            # The header table (8 + 9 * max_frames bytes) must stay far from overflowing.
            raise ValueError(f"max_frames is at most {MAX_FRAMES_CAP}, got {max_frames}")
        self.max_frames = max_frames
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size

    def __repr__(self):
        return (f"Limits(max_frames={self.max_frames}, max_frame_size={self.max_frame_size}, "
                f"max_message_size={self.max_message_size})")


cdef extern from "sys/mman.h" nogil:
    int madvise(void* addr, size_t length, int advice)
    int MADV_HUGEPAGE


cdef inline void _advise_huge(char* p, Py_ssize_t n) noexcept nogil:
    # A fresh multi-MB receive buffer costs one page fault per 4 kB as the kernel
    # fills it; transparent huge pages cut that 512-fold (THP "madvise" mode).
    cdef size_t HUGE = 2 * 1024 * 1024
    cdef size_t start = (<size_t>p + HUGE - 1) & ~(HUGE - 1)
    cdef size_t stop = (<size_t>p + <size_t>n) & ~(HUGE - 1)
    if stop > start:
        madvise(<void*>start, stop - start, MADV_HUGEPAGE)


# -- receive buffers for large frames ------------------------------------------------
#
# A large frame becomes the memory of the object it carries (a numpy array
# gets a view of it, no copy). Fresh memory for every frame costs a page fault
# per 4 kB as the kernel fills it, which halved the throughput of 200 MB
# transfers. So frames of at least POOL_MIN bytes live in RecvBuffer objects
# whose memory, once the last reference (the array) is gone, goes back to a
# small pool and is reused, already faulted in, by the next large frame.

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)
    void free(void* ptr)

cdef extern from "sys/mman.h" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    void* mremap(void* old_address, size_t old_size, size_t new_size, int flags)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MREMAP_MAYMOVE
    void* MAP_FAILED

cdef Py_ssize_t POOL_MIN = 1 << 20          # smaller frames are plain bytearrays
cdef Py_ssize_t POOL_GRAIN = 1 << 20        # capacities are rounded up to this
cdef Py_ssize_t GROW_MIN = 64 << 20         # frames this large grow as they arrive
cdef Py_ssize_t HUGE_AFTER = 2 << 20        # huge pages once this much of a frame arrived
cdef Py_ssize_t _pool_limit = 0             # bytes kept when free (set below)
cdef Py_ssize_t _pool_bytes = 0             # bytes now kept when free
cdef list _pool = []                        # [(capacity, address, mapped)] of free blocks


cdef void _release_block(char* p, Py_ssize_t cap, bint mapped) noexcept:
    if mapped:
        munmap(<void*>p, <size_t>cap)
    else:
        free(<void*>p)


def set_recv_pool_limit(Py_ssize_t nbytes):
    """Most bytes of free large-frame buffers kept for reuse (0 disables the pool)."""
    global _pool_limit, _pool_bytes
    _pool_limit = nbytes
    while _pool_bytes > _pool_limit and _pool:
        cap, addr, mapped = _pool.pop()
        _pool_bytes -= cap
        _release_block(<char*><size_t>addr, cap, mapped)


def recv_pool_stats():
    return {"limit": _pool_limit, "free_bytes": _pool_bytes, "free_blocks": len(_pool)}


cdef inline Py_ssize_t _round_grain(Py_ssize_t n) noexcept:
    return ((n + POOL_GRAIN - 1) // POOL_GRAIN) * POOL_GRAIN


cdef char* _pool_take(Py_ssize_t n, Py_ssize_t* capacity, bint* mapped) except NULL:
    """A block for an n-byte frame: a pooled one that fits (already faulted in),
    else fresh memory; for n >= GROW_MIN only GROW_MIN of it to begin with."""
    global _pool_bytes
    cdef Py_ssize_t i, cap
    cdef void* p = NULL
    for i in range(len(_pool)):
        cap = _pool[i][0]
        if cap >= n and cap <= n + n // 4 + POOL_GRAIN:
            _pool_bytes -= cap
            capacity[0] = cap
            entry = _pool.pop(i)
            mapped[0] = entry[2]
            return <char*><size_t>entry[1]
    if n >= GROW_MIN:
        p = mmap(NULL, <size_t>GROW_MIN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise MemoryError(f"cannot map a receive buffer for a {n}-byte frame")
        capacity[0] = GROW_MIN
        mapped[0] = True
        return <char*>p
    cap = _round_grain(n)
    if posix_memalign(&p, 2 * 1024 * 1024, <size_t>cap) != 0 or p == NULL:
        raise MemoryError(f"cannot allocate a {n}-byte receive buffer")
    capacity[0] = cap
    mapped[0] = False
    return <char*>p


cdef void _pool_give(char* p, Py_ssize_t cap, bint mapped) noexcept:
    global _pool_bytes
    if cap <= _pool_limit - _pool_bytes:
        _pool.append((cap, <size_t>p, mapped))
        _pool_bytes += cap
    else:
        _release_block(p, cap, mapped)


@cython.final
cdef class RecvBuffer:
    """Writable memory for one large received frame; recycled when released.

    Its buffer exposes `min(length, capacity)` bytes: while a mapped block is
    still growing, only what is allocated."""
    cdef char* data
    cdef Py_ssize_t length
    cdef Py_ssize_t capacity
    cdef Py_ssize_t exports
    cdef bint mapped
    cdef bint advised

    def __cinit__(self, Py_ssize_t length):
        self.data = _pool_take(length, &self.capacity, &self.mapped)
        self.length = length
        self.exports = 0

    def __dealloc__(self):
        if self.data != NULL:
            _pool_give(self.data, self.capacity, self.mapped)
            self.data = NULL

    cdef int reserve(self, Py_ssize_t want) except -1:
        """Grow a mapped block to hold `want` bytes (at least doubling, at most
        `length`). No view may be exported while the block moves."""
        cdef Py_ssize_t cap
        cdef void* p
        if want <= self.capacity:
            return 0
        if not self.mapped or self.exports:
            raise BufferError("cannot grow a receive buffer that is not mapped or is in use")
        cap = min(max(self.capacity * 2, _round_grain(want)), _round_grain(self.length))
        p = mremap(<void*>self.data, <size_t>self.capacity, <size_t>cap, MREMAP_MAYMOVE)
        if p == MAP_FAILED:
            raise MemoryError(f"cannot grow a receive buffer to {cap} bytes")
        self.data = <char*>p
        self.capacity = cap
        if self.advised:
            _advise_huge(self.data, cap)
        return 0

    cdef void advise(self) noexcept:
        """Huge pages for this block, once the peer has sent HUGE_AFTER bytes of it:
        before that, a peer that declares much and sends little would make each
        touched page a 2 MB one."""
        if not self.advised:
            self.advised = True
            _advise_huge(self.data, self.capacity)

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data, min(self.length, self.capacity), 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1

    def __len__(self):
        return self.length

    def __repr__(self):
        return f"<RecvBuffer {self.length} bytes>"

    def __reduce__(self):
        return (bytearray, (bytes(memoryview(self)),))


cdef inline uint64_t _read_u64(const char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)  # x86-64 and aarch64 are little-endian: no byte swap needed
    return v


cdef inline void _write_u64(char* p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)


cpdef Py_ssize_t frame_nbytes(object frame) except -1:
    """Length in bytes of a bytes-like frame (any contiguous buffer)."""
    cdef Py_buffer view
    if type(frame) is bytes:
        return len(<bytes>frame)
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    try:
        return view.len
    finally:
        PyBuffer_Release(&view)


cpdef bytes encode_header(list frames, object flags=None):
    """The header that precedes `frames` on the wire.

    `flags` is None (no compression) or a sequence of per-frame flags.
    """
    cdef Py_ssize_t n = len(frames), i
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8 + 9 * n)
    cdef char* p = PyBytes_AS_STRING(out)
    _write_u64(p, <uint64_t>n)
    for i in range(n):
        _write_u64(p + 8 + 8 * i, <uint64_t>frame_nbytes(frames[i]))
    if flags is None:
        for i in range(n):
            p[8 + 8 * n + i] = 0
    else:
        if len(flags) != n:
            raise ValueError("one compression flag per frame is required")
        for i in range(n):
            p[8 + 8 * n + i] = <char><uint8_t>flags[i]
    return out


cpdef list encode(list frames, object flags=None):
    """Header plus frames, as a list suitable for `transport.writelines`."""
    cdef list out = [encode_header(frames, flags)]
    out.extend(frames)
    return out


@cython.final
cdef class FrameDecoder:
    """Incremental decoder; see the module docstring for the theory."""

    def __init__(self, Limits limits=None, Py_ssize_t scratch_size=DEF_SCRATCH,
                 Py_ssize_t direct_threshold=64 * 1024, Limits next_limits=None):
        self.limits = limits if limits is not None else Limits()
        self.next_limits = next_limits
        if scratch_size < 64:
            raise ValueError("scratch_size too small")
        self.max_scratch = scratch_size
        self.scratch = bytearray(min(scratch_size, SCRATCH_START))
        self.scratch_view = memoryview(self.scratch)
        self.start = 0
        self.end = 0
        self.offered = 0
        self.direct_threshold = min(direct_threshold, scratch_size // 2)
        self.state = ST_PREFIX
        self.nframes = 0
        self.frame_index = 0
        self.frames = None
        self.flags = None
        self.lengths = None
        self.direct = None
        self.direct_view = None
        self.direct_filled = 0
        self.direct_len = 0
        self.direct_cap = 0

    # -- buffer protocol for asyncio.BufferedProtocol -------------------------------

    cpdef object get_buffer(self, Py_ssize_t sizehint=-1):
        """A writable view the next read should fill."""
        cdef Py_ssize_t cap
        if self.state == ST_DIRECT:
            if self.direct_filled == self.direct_cap:
                # A growing frame filled what it has: map more (see RecvBuffer).
                self.direct_view.release()
                (<RecvBuffer>self.direct).reserve(self.direct_filled + 1)
                self.direct_view = memoryview(self.direct)
                self.direct_cap = len(self.direct_view)
            return self.direct_view[self.direct_filled:]
        if self.state == ST_BROKEN:
            raise ProtocolError("decoder is broken after an earlier protocol error")
        cap = len(self.scratch)
        if self.offered == -1:
            # The last read filled all it was offered: more is coming than fits.
            self._compact()
            self._grow(min(cap * 2, self.max_scratch))
            cap = len(self.scratch)
        if self.end == cap:
            # Scratch is full of an incomplete item: move it to the front.
            self._compact()
            if self.end == cap:
                # A header table or a frame under direct_threshold, each already
                # validated against the limits, so growing is bounded.
                self._grow(cap * 2)
        self.offered = len(self.scratch) - self.end
        return self.scratch_view[self.end:]

    cpdef list buffer_updated(self, Py_ssize_t nbytes):
        """Account for `nbytes` written into the last buffer; return completed messages.

        Each completed message is a tuple `(frames, flags)`; `flags` is None when no
        frame is compressed (the common case, kept allocation-free).
        """
        cdef list out = []
        if self.state == ST_DIRECT:
            self.direct_filled += nbytes
            if self.direct_filled >= HUGE_AFTER and type(self.direct) is RecvBuffer:
                (<RecvBuffer>self.direct).advise()
            if self.direct_filled < self.direct_len:
                return out
            self.frames.append(self.direct)
            self.direct = None
            self.direct_view = None
            self.direct_filled = 0
            self.direct_len = 0
            self.direct_cap = 0
            self.frame_index += 1
            self.state = ST_FRAMES
        else:
            if nbytes == self.offered and len(self.scratch) < self.max_scratch:
                self.offered = -1           # grow at the next get_buffer
            self.end += nbytes
        self._parse(out)
        return out

    # -- convenience for tests and non-buffered transports --------------------------

    def feed(self, data):
        """Feed arbitrary bytes (any chunking); return completed messages."""
        cdef list out = []
        cdef Py_ssize_t pos = 0, n = len(data), k
        mv = memoryview(data).cast("B")
        while pos < n:
            buf = self.get_buffer(-1)
            k = min(len(buf), n - pos)
            buf[:k] = mv[pos:pos + k]
            buf = None          # as a transport does: the view is let go before the next
            pos += k
            out.extend(self.buffer_updated(k))
        return out

    @property
    def in_message(self):
        """True while a message is partly received (a stalled peer holds it so)."""
        return self.state != ST_PREFIX or self.end > self.start

    @property
    def scratch_size(self):
        return len(self.scratch)

    @property
    def buffered(self):
        """Bytes received but not yet part of a completed message."""
        return (self.end - self.start) + self.direct_filled

    # -- internals ------------------------------------------------------------------

    cdef void _compact(self):
        cdef char* base
        cdef Py_ssize_t n = self.end - self.start
        if self.start == 0:
            return
        base = self.scratch  # bytearray -> char*
        if n:
            memmove(base, base + self.start, n)
        self.start = 0
        self.end = n

    cdef int _grow(self, Py_ssize_t new_size) except -1:
        # A new bytearray rather than a resize: a view handed out earlier may
        # still be alive (its owner's business), and a resize would refuse.
        cdef bytearray bigger = PyByteArray_FromStringAndSize(NULL, new_size)
        cdef Py_ssize_t n = self.end - self.start
        if n:
            memcpy(<char*>bigger, <char*>self.scratch + self.start, n)
        self.scratch = bigger
        self.scratch_view = memoryview(bigger)
        self.start = 0
        self.end = n
        return 0

    cdef int _fail(self, str why) except -1:
        self.state = ST_BROKEN
        raise ProtocolError(why)

    cdef int _parse(self, list out) except -1:
        cdef char* base
        cdef Py_ssize_t avail, i, need, L
        cdef uint64_t n64, len64, total
        cdef uint8_t flag
        cdef bint any_flag
        cdef Limits lim = self.limits
        while True:
            base = self.scratch
            avail = self.end - self.start
            if self.state == ST_PREFIX:
                if avail < 8:
                    break
                n64 = _read_u64(base + self.start)
                if n64 == 0:
                    self._fail("message header declares 0 frames")
                if n64 > <uint64_t>lim.max_frames:
                    self._fail(_foreign_protocol(base + self.start) or
                               f"message header declares {n64} frames, above the limit of "
                               f"{lim.max_frames} (max_frames)")
                self.nframes = <Py_ssize_t>n64
                self.state = ST_TABLE
                continue
            elif self.state == ST_TABLE:
                need = 8 + 9 * self.nframes
                if avail < need:
                    break
                self.lengths = []
                self.flags = None
                total = 0
                any_flag = False
                for i in range(self.nframes):
                    len64 = _read_u64(base + self.start + 8 + 8 * i)
                    if len64 > <uint64_t>lim.max_frame_size:
                        self._fail(f"frame {i} declares {len64} bytes, above the limit of "
                                   f"{lim.max_frame_size} (max_frame_size)")
                    total += len64
                    if total > <uint64_t>lim.max_message_size:
                        self._fail(f"message declares more than {lim.max_message_size} bytes "
                                   f"(max_message_size)")
                    self.lengths.append(<Py_ssize_t>len64)
                for i in range(self.nframes):
                    flag = <uint8_t>base[self.start + 8 + 8 * self.nframes + i]
                    if flag != 0:
                        any_flag = True
                        if flag != FLAG_LZ4:
                            self._fail(f"unknown compression flag {flag} on frame {i}")
                if any_flag:
                    self.flags = [<uint8_t>base[self.start + 8 + 8 * self.nframes + i]
                                  for i in range(self.nframes)]
                self.start += need
                self.frames = []
                self.frame_index = 0
                self.state = ST_FRAMES
                continue
            elif self.state == ST_FRAMES:
                if self.frame_index == self.nframes:
                    out.append((self.frames, self.flags))
                    if self.next_limits is not None:
                        # The first message (the handshake) was read under strict
                        # limits; the rest of the stream gets the configured ones.
                        self.limits = self.next_limits
                        self.next_limits = None
                        lim = self.limits
                    self.frames = None
                    self.flags = None
                    self.lengths = None
                    self.state = ST_PREFIX
                    continue
                L = <Py_ssize_t>self.lengths[self.frame_index]
                if avail >= L:
                    self.frames.append(PyBytes_FromStringAndSize(base + self.start, L))
                    self.start += L
                    self.frame_index += 1
                    continue
                if L >= self.direct_threshold:
                    # Large frame: allocate once at final size, then read straight into it.
                    # Uninitialized: zero-filling 200 MB would cost as much as receiving it.
                    if L >= POOL_MIN:
                        self.direct = RecvBuffer(L)
                    else:
                        self.direct = PyByteArray_FromStringAndSize(NULL, L)
                    self.direct_view = memoryview(self.direct)
                    self.direct_cap = len(self.direct_view)
                    if avail:
                        self.direct_view[:avail] = self.scratch_view[self.start:self.start + avail]
                    self.direct_filled = avail
                    self.direct_len = L
                    self.start = 0
                    self.end = 0
                    self.state = ST_DIRECT
                    break
                # Small frame not complete yet: make room at the end of the scratch.
                if self.start + L > len(self.scratch):
                    self._compact()
                break
            else:
                break
        if self.start == self.end:
            self.start = 0
            self.end = 0
        return 0


cdef str _foreign_protocol(const char* p):
    """Name what the peer speaks when its first bytes are not our framing (only
    looked at once a header was refused): a TLS handshake or an HTTP request."""
    cdef const uint8_t* b = <const uint8_t*>p
    if b[0] == 0x16 and b[1] == 0x03:
        return ("the peer began a TLS handshake, but this side speaks plain tcp:// "
                "(use tls:// with a Security on both sides, or tcp:// on both)")
    if p[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ") or p[:8] == b"OPTIONS ":
        return ("the peer sent an HTTP request to a taskcore comm port (the dashboard "
                "has its own port)")
    return None


def _default_pool_limit():
    import os
    env = os.environ.get("TASKCORE_RECV_POOL_BYTES")
    if env is not None:
        return int(env)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 1024 ** 3
    return min(1024 ** 3, total // 16)


set_recv_pool_limit(_default_pool_limit())
