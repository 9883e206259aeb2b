# cython: language_level=3
"""Message serialization: ``dumps(msg) -> frames`` and ``loads(frames) -> msg``.

Theory of operation
===================

A message becomes a list of frames. Frame 0 is msgpack; every other frame is
an out-of-band buffer that some value in frame 0 refers to. The comm layer
(wire.pyx/protocol.pyx) moves the frames without looking inside them.

msgpack carries dict/list/str/bytes/int/float/bool/None natively. The packer
runs with ``strict_types=True``, so everything else, including tuples and
subclasses of the native types, reaches ``_Encoder.default``, which turns it
into one of these msgpack ext types (codes 1-5)::

    EXT_TUPLE      payload: msgpack array of the items (packed by a nested
                   packer, so items go through ``default`` too)
    EXT_PICKLE     payload: frame-ref header + (tag 0) the pickle stream inline
                   (tag 1) nothing: the pickle stream is the last frame referred
                   to; the frames before it are pickle-5 out-of-band buffers
    EXT_BUFFER     payload: frame-ref header (count 1, tag = bytes/bytearray/
                   memoryview) + optional msgpack [format, shape] for
                   memoryviews. From ``Serialize(bytes-like)``
    EXT_SERIALIZED payload: frame-ref header (tag = Serialized.kind). The
                   frames are the Serialized's own frames, forwarded as-is
    EXT_EXCEPTION  payload: msgpack [type name, str(exc), traceback text,
                   EXT_PICKLE of the exception or nil]
    EXT_DEVICE     payload: frame-ref header (tag 0) + msgpack [family, header].
                   A GPU object (its type exposes ``__cuda_array_interface__``)
                   taken apart by its family in taskcore/device.py: the frames
                   are its device memory, copied to host by ``dumps`` and kept
                   on the device by ``dumps_device`` (for the ucx transport)

The frame-ref header is 9 bytes, little-endian: ``u32 first | u32 count |
u8 tag``. Out-of-band frames are numbered from 1 in the order ``default`` made
them, which is also the order in which the unpacker meets their ext values
(both walk the message depth-first, keys before values). ``loads`` therefore
checks that each reference starts exactly at the next unused frame and that all
frames are used: overlapping, out-of-order, out-of-range and left-over frames
are all caught by one comparison each, and named in the ``ProtocolError``.

Tuples of scalars (priorities, dask-style keys) are packed and unpacked by a
small hand-written fast path that writes exactly the bytes msgpack would;
everything else in a tuple goes through a nested msgpack Packer/unpackb.

Zero copy: pickle protocol 5 hands each contiguous buffer of 2 kB or more
to ``buffer_callback``; we append ``PickleBuffer.raw()`` (a memoryview of the
original memory) as a frame. On loads, pickle gets the received frame objects
as its buffers and the array is rebuilt on top of them, so it shares memory
with the frame (writable iff the frame is). Plain ndarrays go through
``_ArrayReducer`` (exact dtype incl. byte order, zero copy for datetime64 as
well); arrays inside other pickled objects (pandas) use numpy's own reducer.

GPU objects: the check costs ordinary pickled objects one dict lookup (a
per-type cache of "is this a device type", filled on a type's first visit)
and msgpack-native values nothing. ``loads`` takes device frames (objects
exposing ``__cuda_array_interface__``) as well as host frames, but only where
an EXT_DEVICE refers to them; a host frame there is copied to the device.
Device objects nested in a pickled object are pickled by their own library
(a host copy; see taskcore/device.py).

Exceptions carry their type name, ``str()`` and ``traceback.format_exception``
text next to the pickled exception; if it cannot be pickled (sender) or
rebuilt (receiver) the receiver gets a ``RemoteException`` with the same type
name, message and traceback. A pickle that fails to load anywhere else is a
``ProtocolError`` from ``loads`` (the original error is its ``__cause__``).

Hot path notes: one module-level ``_Encoder``/``_Decoder`` is reused, with its
bound ``default``/``ext_hook`` methods created once (no per-call closures). A
``busy`` flag makes reuse safe against threads (client thread + event loop
thread) and re-entrancy (a ``__reduce__`` that calls dumps): a busy encoder is
never shared, the caller just builds a fresh one. Checking and setting the
flag runs without releasing the GIL, so it is atomic.

Trust: pickle executes code. ``loads`` validates the structure (never a
TypeError, segfault or unbounded allocation from frame 0 or the ext headers),
but the peer must be trusted (handshake auth) before unpickling its data.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_CheckBuffer, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytearray cimport PyByteArray_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.list cimport PyList_AsTuple
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from cpython.sequence cimport PySequence_List
from libc.string cimport memcmp, memcpy

import pickle
import sys
import threading
import time
import traceback
import types

import cloudpickle
import lz4.block
import msgpack

from taskcore.errors import ProtocolError

cdef extern from *:
    """
    /* Build a msgpack.ExtType (a namedtuple subclass) without running its
       Python-level __new__ validation (~1 us): allocate the tuple subtype and
       fill both slots, exactly as tuple.__new__ does for subclasses. Only
       called with an int code in 0..127 and a bytes payload. */
    static PyObject* taskcore_make_ext(PyObject* type, PyObject* code, PyObject* data) {
        PyTypeObject* tp = (PyTypeObject*)type;
        PyObject* o = tp->tp_alloc(tp, 2);
        if (o == NULL) return NULL;
        Py_INCREF(code); PyTuple_SET_ITEM(o, 0, code);
        Py_INCREF(data); PyTuple_SET_ITEM(o, 1, data);
        return o;
    }
    static inline void taskcore_put_u32(unsigned char* p, unsigned long v) {
        p[0] = (unsigned char)(v & 0xff); p[1] = (unsigned char)((v >> 8) & 0xff);
        p[2] = (unsigned char)((v >> 16) & 0xff); p[3] = (unsigned char)((v >> 24) & 0xff);
    }
    static inline unsigned long taskcore_get_u32(const unsigned char* p) {
        return (unsigned long)p[0] | ((unsigned long)p[1] << 8) |
               ((unsigned long)p[2] << 16) | ((unsigned long)p[3] << 24);
    }
    /* big-endian helpers for the msgpack scalar-tuple fast paths */
    static inline unsigned char* taskcore_put_be(unsigned char* p, uint64_t v, int n) {
        int i;
        for (i = n - 1; i >= 0; i--) { p[i] = (unsigned char)(v & 0xff); v >>= 8; }
        return p + n;
    }
    static inline uint64_t taskcore_get_be(const unsigned char* p, int n) {
        uint64_t v = 0; int i;
        for (i = 0; i < n; i++) v = (v << 8) | p[i];
        return v;
    }
    static inline uint64_t taskcore_double_bits(double d) {
        uint64_t v; memcpy(&v, &d, 8); return v;
    }
    static inline double taskcore_bits_double(uint64_t v) {
        double d; memcpy(&d, &v, 8); return d;
    }
    static inline double taskcore_bits_float(uint32_t v) {
        float f; memcpy(&f, &v, 4); return (double)f;
    }
    /* Does the type implement the buffer protocol (host memory)? */
    static int taskcore_type_has_buffer(PyObject* t) {
        PyBufferProcs* b = ((PyTypeObject*)t)->tp_as_buffer;
        return b != NULL && b->bf_getbuffer != NULL;
    }
    /* Does the pickle stream mention __main__? (bytes.__contains__ would
       first try the needle as an int and raise/clear a TypeError per call.) */
    static int taskcore_mentions_main(const char* p, Py_ssize_t n) {
        const char* end = p + n;
        while (end - p >= 8) {
            const char* q = (const char*)memchr(p, '_', (size_t)(end - p - 7));
            if (q == NULL) return 0;
            if (memcmp(q, "__main__", 8) == 0) return 1;
            p = q + 1;
        }
        return 0;
    }
    """
    object taskcore_make_ext(object type, object code, object data)
    void taskcore_put_u32(unsigned char* p, unsigned long v)
    unsigned long taskcore_get_u32(const unsigned char* p)
    unsigned char* taskcore_put_be(unsigned char* p, uint64_t v, int n)
    uint64_t taskcore_get_be(const unsigned char* p, int n)
    uint64_t taskcore_double_bits(double d)
    double taskcore_bits_double(uint64_t v)
    double taskcore_bits_float(uint32_t v)
    int taskcore_mentions_main(const char* p, Py_ssize_t n)
    int taskcore_type_has_buffer(object t)


__all__ = [
    "dumps", "dumps_device", "loads", "Serialize", "Serialized", "serialize_obj", "nbytes",
    "device_nbytes", "compress_frames", "decompress_frames", "RemoteException",
    "EXT_TUPLE", "EXT_PICKLE", "EXT_BUFFER", "EXT_SERIALIZED", "EXT_EXCEPTION", "EXT_DEVICE",
]

# ---------------------------------------------------------------- constants

cdef enum:
    _EXT_TUPLE = 1
    _EXT_PICKLE = 2
    _EXT_BUFFER = 3
    _EXT_SERIALIZED = 4
    _EXT_EXCEPTION = 5
    _EXT_DEVICE = 6

    _REF_HEADER = 9            # u32 first | u32 count | u8 tag

    _PICKLE_INLINE = 0         # EXT_PICKLE tags
    _PICKLE_IN_FRAME = 1

    _BUF_BYTES = 0             # EXT_BUFFER tags
    _BUF_BYTEARRAY = 1
    _BUF_MEMORYVIEW = 2

# Public copies, for tests and for anyone decoding frame 0 by hand.
EXT_TUPLE = _EXT_TUPLE
EXT_PICKLE = _EXT_PICKLE
EXT_BUFFER = _EXT_BUFFER
EXT_SERIALIZED = _EXT_SERIALIZED
EXT_EXCEPTION = _EXT_EXCEPTION
EXT_DEVICE = _EXT_DEVICE

# Pickle buffers smaller than this go in band: a frame costs a header entry,
# an allocation on the receiving side and a list slot, which is more than
# copying a couple of kB.
cdef Py_ssize_t MIN_OUT_OF_BAND = 2048
# Pickle streams up to this size ride inside frame 0 (one copy, fewer frames);
# bigger ones (object arrays, non-contiguous arrays, big Python structures)
# get their own frame so frame 0 stays small and nothing large is copied.
cdef Py_ssize_t MAX_INLINE_PICKLE = 16384
# Tuples nested deeper than this are pickled instead (pickle handles any
# depth); the decoder refuses ext nesting beyond _DECODE_MAX_DEPTH, which is
# larger, so everything the encoder makes is accepted.
cdef int _ENCODE_MAX_DEPTH = 32
cdef int _DECODE_MAX_DEPTH = 64
# Packers kept per nesting depth. Deeper levels get a throwaway packer.
cdef int _CACHED_PACKERS = 8
# msgpack's Packer keeps its grown buffer forever; after a message this big
# we replace the top-level packer so one huge message does not pin memory.
cdef Py_ssize_t _PACKER_RESET_SIZE = 1 << 20
# Most native-type checking serialize_obj does before pickling instead.
cdef int _NATIVE_MAX_DEPTH = 16
# bytes over this size in serialize_obj go out of band (zero copy).
cdef Py_ssize_t _SERIALIZE_OBJ_BYTES_OOB = 65536
# LZ4 block format cannot take inputs over LZ4_MAX_INPUT_SIZE.
cdef Py_ssize_t LZ4_MAX_INPUT_SIZE = 0x7E000000
# LZ4 expands at most ~255x (one 0xFF length byte per 255 output bytes), so a
# stored size beyond this is a lie, whatever the configured maximum.
cdef Py_ssize_t _LZ4_MAX_RATIO = 255

# --------------------------------------------------- stdlib bound once

cdef object _pickle_dumps = pickle.dumps
cdef object _pickle_loads = pickle.loads
cdef object _cloudpickle_dumps = cloudpickle.dumps
cdef object _format_exception = traceback.format_exception
cdef object _getsizeof = sys.getsizeof
cdef object _FunctionType = types.FunctionType
cdef object _Packer = msgpack.Packer
cdef object _unpackb = msgpack.unpackb
cdef object _ExtType = msgpack.ExtType
cdef object _lz4_compress = lz4.block.compress
cdef object _lz4_decompress = lz4.block.decompress
cdef object _ProtocolError = ProtocolError

# Python int objects for the ext codes, made once for taskcore_make_ext.
cdef object _CODE_TUPLE = _EXT_TUPLE
cdef object _CODE_PICKLE = _EXT_PICKLE
cdef object _CODE_BUFFER = _EXT_BUFFER
cdef object _CODE_SERIALIZED = _EXT_SERIALIZED
# Flags in the tag byte of a Serialized ext (the low 4 bits are its kind).
cdef int _SER_INLINE = 0x80     # payload after the header is the single frame
cdef int _SER_REPEAT = 0x40     # `first` is the sequence number of an earlier one
# The payload after the header is several small frames: u32 n | n x u32 length | the
# frames, one after the other. A dask task whose pickle points at a shared function's
# bytes out of band is two small frames; as frames of their own, a batch of 500,000
# such tasks would be a message of 1,000,000 frames, the wire's limit.
cdef int _SER_INLINE_FRAMES = 0x20
cdef Py_ssize_t _SER_INLINE_MAX = 4096
cdef Py_ssize_t _SER_INLINE_MAX_FRAMES = 8
cdef object _CODE_EXCEPTION = _EXT_EXCEPTION
cdef object _CODE_DEVICE = _EXT_DEVICE


class RemoteException(Exception):
    """Stands in for a remote exception that could not cross the wire as itself.

    Used when the original exception could not be pickled on the sending side
    (e.g. it holds a lock) or could not be rebuilt on the receiving side (e.g.
    a custom ``__init__`` whose signature does not match ``args``, or a class
    that is not importable here). It carries the original type's qualified
    name and ``str()`` message; ``__taskcore_traceback__`` is set as usual.
    """

    def __init__(self, type_name, message):
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self):
        return f"{self.type_name}: {self.message}"


class _PayloadError(Exception):
    """Internal: a user payload (pickle) failed to load inside the ext hook.

    Kept apart from structural errors so that ``loads`` can report it as a
    ProtocolError while ``Serialized.deserialize`` re-raises the original
    (a worker should report the user's ImportError, not a protocol fault).
    """


class _LoadFailed:
    """Internal sentinel type: an exception's pickle failed to load."""


cdef object _LOAD_FAILED = _LoadFailed()


# ------------------------------------------------------------ small helpers

cdef inline object _ext(object code, bytes data):
    return taskcore_make_ext(_ExtType, code, data)


cdef bytes _ref(Py_ssize_t first, Py_ssize_t count, int tag, object tail):
    """Frame-ref ext payload: u32 first | u32 count | u8 tag | tail."""
    cdef Py_ssize_t tlen = 0
    if first > 0xFFFFFFFF or count > 0xFFFFFFFF:
        raise ValueError("too many frames in one message")
    if tail is not None:
        tlen = PyBytes_GET_SIZE(tail)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _REF_HEADER + tlen)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    taskcore_put_u32(p, <unsigned long>first)
    taskcore_put_u32(p + 4, <unsigned long>count)
    p[8] = <unsigned char>tag
    if tlen:
        memcpy(p + _REF_HEADER, PyBytes_AS_STRING(tail), tlen)
    return out


cdef object _inline_frames(list frames, int tag):
    """The ext payload of a Serialized whose few small contiguous frames ride inline
    (ref header with no frames | u32 n | n x u32 length | the frames), or None when
    they do not fit in _SER_INLINE_MAX bytes."""
    cdef Py_ssize_t n = len(frames), i, total = _REF_HEADER + 4 + 4 * n, off
    cdef Py_buffer views[8]          # _SER_INLINE_MAX_FRAMES
    cdef Py_ssize_t got = 0
    cdef bytes out = None
    cdef unsigned char* p
    if n > _SER_INLINE_MAX_FRAMES:
        return None
    try:
        for i in range(n):
            if PyObject_GetBuffer(frames[i], &views[i], PyBUF_SIMPLE) < 0:
                return None
            got += 1
            total += views[i].len
            if total > _REF_HEADER + _SER_INLINE_MAX:
                return None
        out = PyBytes_FromStringAndSize(NULL, total)
        p = <unsigned char*>PyBytes_AS_STRING(out)
        taskcore_put_u32(p, 0)
        taskcore_put_u32(p + 4, 0)
        p[8] = <unsigned char>tag
        p += _REF_HEADER
        taskcore_put_u32(p, <unsigned long>n)
        off = 4 + 4 * n
        for i in range(n):
            taskcore_put_u32(p + 4 + 4 * i, <unsigned long>views[i].len)
            memcpy(p + off, views[i].buf, views[i].len)
            off += views[i].len
        return out
    except (BufferError, TypeError):   # not contiguous (or not a buffer): frames of their own
        return None
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])


cdef Py_ssize_t _SHARE_MIN = 256     # inline frames at least this large are shared


cdef list _split_inline_frames(bytes data, list last):
    """The frames of an inline-frames Serialized payload (after the ref header).

    A frame equal to the last one decoded at its position in this message is that
    same bytes object: consecutive dask tasks of one layer point at one shared
    function's bytes, and a scheduler holding a million of them would otherwise
    keep a million copies (and fault in the pages for them)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data) - _REF_HEADER, n, i, off, length
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data) + _REF_HEADER
    if size < 4:
        raise _ProtocolError("inline-frames Serialized ext is too short for its frame count")
    n = <Py_ssize_t>taskcore_get_u32(p)
    if n < 2 or n > _SER_INLINE_MAX_FRAMES or size < 4 + 4 * n:
        raise _ProtocolError(f"inline-frames Serialized ext declares {n} frames "
                             f"(2 to {_SER_INLINE_MAX_FRAMES}) in {size} bytes")
    off = 4 + 4 * n
    frames = []
    for i in range(n):
        length = <Py_ssize_t>taskcore_get_u32(p + 4 + 4 * i)
        if length > size - off:
            raise _ProtocolError(f"inline-frames Serialized ext: frame {i} of {length} bytes "
                                 f"runs past the payload's end")
        prev = last[i]
        if (length >= _SHARE_MIN and prev is not None and PyBytes_GET_SIZE(prev) == length
                and memcmp(PyBytes_AS_STRING(prev), p + off, length) == 0):
            frames.append(prev)
        else:
            frame = PyBytes_FromStringAndSize(<const char*>p + off, length)
            frames.append(frame)
            if length >= _SHARE_MIN:
                last[i] = frame
        off += length
    if off != size:
        raise _ProtocolError(f"inline-frames Serialized ext has {size - off} bytes after "
                             f"its frames")
    return frames


cdef Py_ssize_t _buffer_nbytes(object f) except -1:
    """Byte length of any buffer-protocol object (frames, mostly)."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    if type(f) is bytes:
        return PyBytes_GET_SIZE(f)
    if type(f) is bytearray:
        return PyByteArray_GET_SIZE(f)
    if type(f) is memoryview:
        return (<memoryview>f).nbytes
    PyObject_GetBuffer(f, &view, PyBUF_SIMPLE)
    n = view.len
    PyBuffer_Release(&view)
    return n


cdef inline bint _wants_cloudpickle(object obj):
    """Objects plain pickle would store by a reference the peer cannot resolve.

    Lambdas, closures and nested functions (qualname contains '<lambda>' or
    '<locals>') fail in pickle anyway; functions from __main__ pickle fine
    here but not on the peer. Checking up front keeps exceptions off the
    common "user function" path.
    """
    cdef object mod
    if type(obj) is _FunctionType:
        mod = (<object>obj).__module__
        return (mod == "__main__" or "<" in (<object>obj).__qualname__
                or _by_value(mod))
    return False


cdef object _registered = None


cdef bint _mentions_by_value(bytes data):
    # A container (a `client.run` payload's tuple, say) holding a function of a module
    # registered with register_pickle_by_value gets it pickled by reference: the
    # module's name in the stream gives it away. Nothing to scan unless one is registered.
    _by_value(None)                      # loads the registry on first use
    if not _registered:
        return False
    for m in _registered:
        if (<str>m).encode() in data:
            return True
    return False


cdef bint _by_value(object modname):
    # Modules registered with cloudpickle.register_pickle_by_value (test
    # modules, notebooks' helper files) cannot be imported by the peer, so
    # their functions must travel by value too.
    global _registered
    if _registered is None:
        try:
            from cloudpickle import cloudpickle as _cp
            _registered = _cp._PICKLE_BY_VALUE_MODULES
        except (ImportError, AttributeError):
            _registered = set()
    if not _registered or modname is None:
        return False
    for m in _registered:
        if modname == m or modname.startswith(m + "."):
            return True
    return False


# ---------------------------------------------- scalar-tuple fast paths
#
# Tuples are in nearly every message (priorities, dask-style keys such as
# ("x-abc", 0, 1)), and the generic route costs a nested Packer.pack or
# unpackb call per tuple (~300 ns each way). Tuples whose items are all
# scalars (None, bool, int, float, str, bytes) are written and read here
# directly instead. The bytes are exactly what msgpack's Packer writes for
# list(t) (the tests compare them), so the wire format is unchanged and the
# generic route still reads them; anything unusual (big items, nested
# containers, odd encodings from another writer) takes the generic route.

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL

cdef enum:
    _FAST_TUPLE_BUF = 512


cdef inline unsigned char* _put_int(unsigned char* p, long long d):
    # msgpack's canonical (smallest) integer encodings
    if d < -32:
        if d < -32768:
            if d < -2147483648:
                p[0] = 0xd3
                return taskcore_put_be(p + 1, <uint64_t>d, 8)
            p[0] = 0xd2
            return taskcore_put_be(p + 1, <uint64_t><uint32_t>(<int32_t>d), 4)
        if d < -128:
            p[0] = 0xd1
            return taskcore_put_be(p + 1, <uint64_t>(<uint16_t><int16_t>d), 2)
        p[0] = 0xd0
        p[1] = <unsigned char>(<int8_t>d)
        return p + 2
    if d < 128:
        p[0] = <unsigned char>(<int8_t>d)       # positive or negative fixint
        return p + 1
    if d < 256:
        p[0] = 0xcc
        p[1] = <unsigned char>d
        return p + 2
    if d < 65536:
        p[0] = 0xcd
        return taskcore_put_be(p + 1, <uint64_t>d, 2)
    if d < 4294967296:
        p[0] = 0xce
        return taskcore_put_be(p + 1, <uint64_t>d, 4)
    p[0] = 0xcf
    return taskcore_put_be(p + 1, <uint64_t>d, 8)


cdef object _pack_scalar_tuple(tuple t):
    """msgpack array bytes for t if all its items are small scalars, else None."""
    cdef unsigned char buf[_FAST_TUPLE_BUF]
    cdef unsigned char* p = buf
    cdef unsigned char* end = buf + _FAST_TUPLE_BUF
    cdef Py_ssize_t n = len(t), i, L
    cdef long long ll
    cdef unsigned long long ull
    cdef int overflow
    cdef const char* s
    cdef type tx
    if n < 16:
        p[0] = 0x90 | <unsigned char>n
        p += 1
    elif n <= 0xFFFF:
        p[0] = 0xdc
        p = taskcore_put_be(p + 1, <uint64_t>n, 2)
    else:
        return None
    for i in range(n):
        x = t[i]
        if end - p < 9:             # room for any fixed-size scalar
            return None
        tx = type(x)
        if x is None:
            p[0] = 0xc0
            p += 1
        elif x is True:
            p[0] = 0xc3
            p += 1
        elif x is False:
            p[0] = 0xc2
            p += 1
        elif tx is int:
            ll = PyLong_AsLongLongAndOverflow(x, &overflow)
            if overflow == 0:
                p = _put_int(p, ll)
            elif overflow > 0:
                try:
                    ull = PyLong_AsUnsignedLongLong(x)
                except OverflowError:
                    return None     # beyond uint64: default() pickles it
                p[0] = 0xcf
                p = taskcore_put_be(p + 1, ull, 8)
            else:
                return None
        elif tx is float:
            p[0] = 0xcb
            p = taskcore_put_be(p + 1, taskcore_double_bits(<double>x), 8)
        elif tx is str:
            try:
                s = PyUnicode_AsUTF8AndSize(x, &L)
            except UnicodeEncodeError:
                return None         # lone surrogates: let msgpack raise
            if L < 32:
                if end - p < 1 + L:
                    return None
                p[0] = 0xa0 | <unsigned char>L
                p += 1
            elif L < 256:
                if end - p < 2 + L:
                    return None
                p[0] = 0xd9
                p[1] = <unsigned char>L
                p += 2
            else:
                return None
            memcpy(p, s, L)
            p += L
        elif tx is bytes:
            L = PyBytes_GET_SIZE(x)
            if L >= 256 or end - p < 2 + L:
                return None
            p[0] = 0xc4
            p[1] = <unsigned char>L
            memcpy(p + 2, PyBytes_AS_STRING(x), L)
            p += 2 + L
        else:
            return None
    return PyBytes_FromStringAndSize(<char*>buf, p - buf)


cdef object _unpack_scalar_tuple(bytes data):
    """The tuple for a msgpack array of scalars, or None to take the generic route."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef const unsigned char* end = p + PyBytes_GET_SIZE(data)
    cdef Py_ssize_t n, i, L
    cdef unsigned int b
    cdef int w
    cdef uint64_t u
    cdef tuple tup
    if p == end:
        return None
    b = p[0]
    if 0x90 <= b <= 0x9f:
        n = b & 0x0f
        p += 1
    elif b == 0xdc and end - p >= 3:
        n = <Py_ssize_t>taskcore_get_be(p + 1, 2)
        p += 3
    else:
        return None
    if n > end - p:                 # every item takes at least one byte
        return None
    tup = PyTuple_New(n)            # NULL slots are safe if we bail out
    for i in range(n):
        if p >= end:
            return None
        b = p[0]
        p += 1
        if b <= 0x7f:
            x = <long>b
        elif b >= 0xe0:
            x = <long>(<int8_t>b)
        elif b == 0xc0:
            x = None
        elif b == 0xc2:
            x = False
        elif b == 0xc3:
            x = True
        elif 0xcc <= b <= 0xd3:
            w = 1 << ((b - 0xcc) & 3)       # 1, 2, 4, 8 bytes
            if end - p < w:
                return None
            u = taskcore_get_be(p, w)
            p += w
            if b <= 0xcf:
                x = u
            elif w == 1:
                x = <long>(<int8_t>u)
            elif w == 2:
                x = <long>(<int16_t>u)
            elif w == 4:
                x = <long>(<int32_t>u)
            else:
                x = <int64_t>u
        elif b == 0xcb:
            if end - p < 8:
                return None
            x = taskcore_bits_double(taskcore_get_be(p, 8))
            p += 8
        elif b == 0xca:
            if end - p < 4:
                return None
            x = taskcore_bits_float(<uint32_t>taskcore_get_be(p, 4))
            p += 4
        elif 0xa0 <= b <= 0xbf or b == 0xd9 or b == 0xc4:
            if b == 0xd9 or b == 0xc4:
                if p >= end:
                    return None
                L = p[0]
                p += 1
            else:
                L = b & 0x1f
            if end - p < L:
                return None
            if b == 0xc4:
                x = PyBytes_FromStringAndSize(<const char*>p, L)
            else:
                try:
                    x = PyUnicode_DecodeUTF8(<const char*>p, L, NULL)
                except UnicodeDecodeError:
                    return None     # the generic route reports it
            p += L
        else:
            return None
        Py_INCREF(x)
        PyTuple_SET_ITEM(tup, i, x)
    if p != end:
        return None
    return tup


# ------------------------------------------------------------ numpy arrays
#
# Plain ndarrays are pickled through _ArrayReducer instead of numpy's own
# __reduce_ex__, which (numpy 2.x) copies non-contiguous and datetime64/
# timedelta64 arrays in band and loses a non-native byte order on the way.
# Here every array becomes one flat uint8 PickleBuffer (zero copy when the
# array is C- or F-contiguous, one copy otherwise) plus dtype/shape/order, and
# the receiver rebuilds it with frombuffer on the received frame. Arrays of
# objects (and zero-itemsize dtypes) keep numpy's pickling.

cdef object _NDARRAY = None        # numpy.ndarray, once numpy is imported
cdef dict _SYS_MODULES = sys.modules


cdef inline bint _is_plain_ndarray(object obj):
    global _NDARRAY
    if _NDARRAY is None:
        np = _SYS_MODULES.get("numpy")
        if np is None:
            return False           # numpy not loaded: obj cannot be an array
        _NDARRAY = np.ndarray
    if type(obj) is not _NDARRAY:
        return False
    dt = (<object>obj).dtype
    return not dt.hasobject and dt.itemsize > 0


@cython.final
cdef class _ArrayReducer:
    cdef object arr

    def __reduce_ex__(self, protocol):
        a = self.arr
        flags = a.flags
        if flags.c_contiguous:
            order = "C"
        elif flags.f_contiguous:
            order = "F"
        else:
            a = sys.modules["numpy"].ascontiguousarray(a)
            order = "C"
        flat = a.ravel(order="K").view("u1")      # a view: same memory, 1-D bytes
        return (_rebuild_ndarray, (pickle.PickleBuffer(flat), a.dtype, a.shape, order))


def _rebuild_ndarray(buf, dtype, shape, order):
    import numpy
    return numpy.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


# ------------------------------------------------------------- GPU objects
#
# type -> its family in taskcore/device.py, or False: filled on the first visit
# of each type, so an ordinary pickled object costs one dict lookup. The
# module taskcore.device is imported on the first type that exposes
# __cuda_array_interface__ (never for a host-only program).

cdef dict _DEVICE_TYPES = {}
cdef object _NOT_DEVICE = False
cdef Py_ssize_t _DEVICE_TYPES_MAX = 4096     # dynamically made classes: bound the cache
cdef object _device_mod = None


cdef object _device():
    global _device_mod
    if _device_mod is None:
        import taskcore.device as dm
        _device_mod = dm
    return _device_mod


cdef object _classify_type(object t):
    if taskcore_type_has_buffer(t) or not hasattr(t, "__cuda_array_interface__"):
        fam = _NOT_DEVICE                       # host memory, or no CUDA Array Interface
    else:
        fam = _device().family_for_type(t) or _NOT_DEVICE
    if len(_DEVICE_TYPES) >= _DEVICE_TYPES_MAX:
        _DEVICE_TYPES.clear()
    _DEVICE_TYPES[t] = fam
    return fam


cdef inline object _device_family(object obj):
    """The device family of obj if it is a GPU object, else None."""
    cdef PyObject* p = PyDict_GetItem(_DEVICE_TYPES, type(obj))
    if p == <PyObject*>_NOT_DEVICE:
        return None
    fam = _classify_type(type(obj)) if p == NULL else <object>p
    if fam is _NOT_DEVICE or not fam.claims(obj):
        return None
    return fam


cdef bint _is_device_frame(object f):
    return hasattr(type(f), "__cuda_array_interface__")


# ------------------------------------------------------------------ Encoder

@cython.final
cdef class _Encoder:
    """Per-call state of dumps; reused (see ``busy``)."""
    cdef list frames            # frames[0] is a placeholder until packing ends
    cdef list pack_fns          # bound Packer.pack per tuple-nesting depth
    cdef int depth              # nesting depth of the packer now running
    cdef bint busy
    cdef object default_cb      # self.default, bound once
    cdef object buffer_cb       # self.buffer_callback, bound once
    cdef dict ser_memo          # id(Serialized) -> (sequence number, the object)
    cdef bint keep_device       # dumps_device: GPU frames stay on the device

    def __cinit__(self):
        self.frames = None
        self.ser_memo = None
        self.depth = 0
        self.busy = False
        self.keep_device = False
        self.default_cb = self.default
        self.buffer_cb = self.buffer_callback
        self.pack_fns = [self._new_pack_fn(256 * 1024)]

    cdef object _new_pack_fn(self, Py_ssize_t buf_size):
        return _Packer(
            default=self.default_cb, strict_types=True, use_bin_type=True,
            autoreset=True, datetime=False, buf_size=buf_size,
        ).pack

    cdef inline void acquire(self):
        self.busy = True
        self.frames = [None]
        self.ser_memo = None
        self.depth = 0

    cdef inline void release(self):
        self.frames = None
        self.ser_memo = None
        self.busy = False
        self.keep_device = False

    # msgpack calls this for every value it cannot pack natively.
    def default(self, obj):
        cdef type t = type(obj)
        if t is tuple:
            return self.encode_tuple(<tuple>obj)
        if t is Serialized:
            return self.encode_serialized(<Serialized>obj)
        if t is Serialize:
            return self.encode_forced((<Serialize>obj).obj)
        if isinstance(obj, BaseException):
            return self.encode_exception(obj)
        fam = _device_family(obj)
        if fam is not None:
            return self.encode_device(obj, fam)
        return self.encode_pickle(obj, False)

    # pickle protocol 5 calls this for every PickleBuffer (numpy data, ...).
    def buffer_callback(self, pb):
        try:
            mv = pb.raw()          # flat 'B' view of the same memory: no copy
        except BufferError:        # non-contiguous: let pickle copy it in band
            return True
        if (<memoryview>mv).nbytes < MIN_OUT_OF_BAND:
            return True
        self.frames.append(mv)
        return False

    cdef bytes pack_nested(self, object obj):
        cdef int d = self.depth + 1
        if d < len(self.pack_fns):
            pack = self.pack_fns[d]
        else:
            pack = self._new_pack_fn(1024)
            if d < _CACHED_PACKERS:
                self.pack_fns.append(pack)
        self.depth = d
        try:
            return pack(obj)
        finally:
            self.depth = d - 1

    cdef object encode_tuple(self, tuple t):
        data = _pack_scalar_tuple(t)
        if data is not None:
            return _ext(_CODE_TUPLE, <bytes>data)
        if self.depth >= _ENCODE_MAX_DEPTH:
            return self.encode_pickle(t, False)
        return _ext(_CODE_TUPLE, self.pack_nested(PySequence_List(t)))

    cdef object encode_serialized(self, Serialized s):
        # One Serialized object often appears in many messages of a batch (the
        # function of a map, in every compute-task): the first occurrence is
        # written out, later ones are back-references by sequence number, and
        # the peer gets one shared object back.
        cdef Py_ssize_t first, seq
        cdef object f0
        if self.ser_memo is None:
            self.ser_memo = {}
        hit = self.ser_memo.get(id(s))
        if hit is not None:
            return _ext(_CODE_SERIALIZED, _ref((<tuple>hit)[0], 0, s.kind | _SER_REPEAT, None))
        seq = len(self.ser_memo)
        self.ser_memo[id(s)] = (seq, s)   # keeps s alive, so its id stays unique
        if len(s.frames) == 1:
            f0 = s.frames[0]
            if type(f0) is bytes and PyBytes_GET_SIZE(f0) <= _SER_INLINE_MAX:
                # Small payloads ride inside frame 0: no frame of their own.
                return _ext(_CODE_SERIALIZED, _ref(0, 0, s.kind | _SER_INLINE, f0))
        else:
            payload = _inline_frames(s.frames, s.kind | _SER_INLINE_FRAMES)
            if payload is not None:
                return _ext(_CODE_SERIALIZED, payload)
        first = len(self.frames)
        self.frames.extend(s.frames)
        return _ext(_CODE_SERIALIZED, _ref(first, len(s.frames), s.kind, None))

    cdef object encode_forced(self, object obj):
        cdef type t = type(obj)
        cdef int tag
        cdef object tail = None
        cdef Py_ssize_t first
        if t is bytes:
            tag = _BUF_BYTES
            frame = obj
        elif t is bytearray:
            tag = _BUF_BYTEARRAY
            frame = obj
        elif t is memoryview:
            tag = _BUF_MEMORYVIEW
            frame, tail = self.flatten_memoryview(<memoryview>obj)
        elif t is Serialized:
            return self.encode_serialized(<Serialized>obj)
        elif t is Serialize:
            return self.encode_forced((<Serialize>obj).obj)
        else:
            fam = _device_family(obj)
            if fam is not None:
                return self.encode_device(obj, fam)
            return self.encode_pickle(obj, True)
        first = len(self.frames)
        self.frames.append(frame)
        return _ext(_CODE_BUFFER, _ref(first, 1, tag, tail))

    cdef object encode_device(self, object obj, object fam):
        """A GPU object: its family's header, its device memory as frames (copied to
        host unless this is dumps_device)."""
        cdef Py_ssize_t first = len(self.frames)
        header, bufs = fam.split(obj)
        if self.keep_device:
            self.frames.extend(bufs)
        else:
            to_host = _device().device_runtime().to_host
            for b in bufs:
                self.frames.append(to_host(b))
        tail = self.pack_nested([fam.name, header])
        return _ext(_CODE_DEVICE, _ref(first, len(bufs), 0, tail))

    cdef tuple flatten_memoryview(self, memoryview mv):
        """A flat 'B' frame for mv, plus how to rebuild its format and shape."""
        cdef object flat
        if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
            return mv, None
        if mv.c_contiguous:
            flat = mv.cast("B")                  # same memory
        else:
            flat = memoryview(mv.tobytes())      # strided: one copy, C order
        shape = list(mv.shape)
        try:
            flat.cast(mv.format, shape)          # only formats cast() can rebuild
        except (TypeError, ValueError):
            return flat, None                    # arrives as flat bytes
        return flat, self.pack_nested([mv.format, shape])

    cdef object encode_pickle(self, object obj, bint forced):
        cdef Py_ssize_t first = len(self.frames)
        cdef bytes data = self.pickle(obj)
        cdef Py_ssize_t nbuf = len(self.frames) - first
        if forced or PyBytes_GET_SIZE(data) > MAX_INLINE_PICKLE:
            self.frames.append(data)
            return _ext(_CODE_PICKLE, _ref(first, nbuf + 1, _PICKLE_IN_FRAME, None))
        return _ext(_CODE_PICKLE, _ref(first, nbuf, _PICKLE_INLINE, data))

    cdef bytes pickle(self, object obj):
        """Pickle protocol 5, out-of-band buffers appended to self.frames."""
        cdef Py_ssize_t mark = len(self.frames)
        cdef _ArrayReducer ar
        if _is_plain_ndarray(obj):
            ar = _ArrayReducer.__new__(_ArrayReducer)
            ar.arr = obj
            try:
                return _pickle_dumps(ar, protocol=5, buffer_callback=self.buffer_cb)
            except Exception:
                del self.frames[mark:]   # e.g. a dtype with odd metadata: numpy's way
        if _wants_cloudpickle(obj):
            return self.cloudpickle(obj, mark)
        cdef bytes data
        try:
            data = _pickle_dumps(obj, protocol=5, buffer_callback=self.buffer_cb)
        except Exception:
            # lambdas inside containers, local classes, ...: cloudpickle
            # pickles them by value. Drop buffers of the failed attempt.
            del self.frames[mark:]
            return self.cloudpickle(obj, mark)
        if taskcore_mentions_main(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) or \
                _mentions_by_value(data):
            # Something refers to __main__ (on the peer a different script) or to a
            # module registered to travel by value, by name; cloudpickle sends such
            # objects by value.
            del self.frames[mark:]
            return self.cloudpickle(obj, mark)
        return data

    cdef bytes cloudpickle(self, object obj, Py_ssize_t mark):
        try:
            return _cloudpickle_dumps(obj, protocol=5, buffer_callback=self.buffer_cb)
        except Exception as exc:
            del self.frames[mark:]
            raise TypeError(
                f"cannot serialize {type(obj).__module__}.{type(obj).__qualname__} "
                f"object: {type(exc).__name__}: {exc}"
            ) from exc

    cdef object encode_exception(self, object exc):
        cdef type t = type(exc)
        cdef Py_ssize_t mark = len(self.frames)
        if self.depth >= _ENCODE_MAX_DEPTH:
            return self.encode_pickle(exc, False)
        type_name = f"{t.__module__}.{t.__qualname__}"
        try:
            message = str(exc)
        except Exception:
            message = "<exception str() failed>"
        # Forwarding an exception that came from elsewhere keeps the
        # traceback of where it was raised first.
        tb = getattr(exc, "__taskcore_traceback__", None)
        if type(tb) is not str:
            try:
                tb = "".join(_format_exception(t, exc, exc.__traceback__))
            except Exception:
                tb = f"{type_name}: {message}\n"
        try:
            value = self.encode_pickle(exc, False)
        except Exception:
            del self.frames[mark:]
            value = None        # the receiver builds a RemoteException
        return _ext(_CODE_EXCEPTION, self.pack_nested([type_name, message, tb, value]))


cdef _Encoder _ENCODER = _Encoder()


cdef inline _Encoder _acquire_encoder():
    cdef _Encoder enc = _ENCODER
    if enc.busy:
        enc = _Encoder()
    enc.acquire()
    return enc


cpdef list dumps(object msg):
    """Serialize ``msg`` into frames: ``[msgpack frame 0, out-of-band frames...]``.

    Frames are ``bytes`` (frame 0, pickle streams), the caller's own
    bytes-like objects (``Serialize``/``Serialized`` payloads), memoryviews
    of the original buffers (numpy data) or host copies of GPU objects'
    memory (``dumps_device`` keeps those on the device). Treat them as
    read-only, and do not mutate the message's buffers until the frames are
    written.
    """
    return _dumps(msg, False)


cdef inline list _dumps(object msg, bint keep_device):
    cdef _Encoder enc = _acquire_encoder()
    cdef list frames
    enc.keep_device = keep_device
    try:
        frame0 = enc.pack_fns[0](msg)
        frames = enc.frames
    finally:
        enc.release()
    frames[0] = frame0
    if PyBytes_GET_SIZE(frame0) > _PACKER_RESET_SIZE:
        enc.pack_fns[0] = enc._new_pack_fn(256 * 1024)
    return frames


cpdef list dumps_device(object msg):
    """``dumps``, but the memory of GPU objects stays on the device: their frames are
    `taskcore.device.DeviceFrame`s (``__cuda_array_interface__``, no copy), the other
    frames are as ``dumps`` makes them. For a transport that moves device memory (ucx);
    ``loads`` takes these frames, or their host copies."""
    return _dumps(msg, True)


# ------------------------------------------------------------------ Decoder

@cython.final
cdef class _Decoder:
    """Per-call state of loads; reused (see ``busy``)."""
    cdef list frames
    cdef Py_ssize_t nframes
    cdef Py_ssize_t next            # next out-of-band frame to be referenced
    cdef int depth                  # ext nesting depth
    cdef bint busy
    cdef bint lenient               # next pickle failure -> _LOAD_FAILED
    cdef bint has_device            # some frame is device memory (only EXT_DEVICE may use it)
    cdef object hook                # self.ext_hook, bound once
    cdef list sers                  # Serialized objects decoded so far, by sequence number
    cdef list inline_last           # the last inline frames, by position (see _split_inline_frames)

    def __cinit__(self):
        self.frames = None
        self.sers = None
        self.busy = False
        self.hook = self.ext_hook

    cdef inline void acquire(self, list frames):
        self.busy = True
        self.frames = frames
        self.nframes = len(frames)
        self.next = 1
        self.depth = 0
        self.lenient = False
        self.has_device = False
        self.sers = None
        self.inline_last = None

    cdef inline void release(self):
        self.frames = None
        self.sers = None
        self.inline_last = None
        self.busy = False

    def ext_hook(self, int code, bytes data):
        if code == _EXT_TUPLE:
            return self.decode_tuple(data)
        if code == _EXT_SERIALIZED:
            return self.decode_serialized(data)
        if code == _EXT_PICKLE:
            return self.decode_pickle(data)
        if code == _EXT_BUFFER:
            return self.decode_buffer(data)
        if code == _EXT_EXCEPTION:
            return self.decode_exception(data)
        if code == _EXT_DEVICE:
            return self.decode_device(data)
        raise _ProtocolError(f"unknown msgpack ext code {code} in frame 0")

    cdef int take(self, bytes data, str what, Py_ssize_t* first, Py_ssize_t* count,
                  int* tag, bint device_ok) except -1:
        """Parse a frame-ref header and claim its frames (device frames only if
        `device_ok`)."""
        cdef Py_ssize_t i, n = PyBytes_GET_SIZE(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        if n < _REF_HEADER:
            raise _ProtocolError(f"{what} ext payload is {n} bytes, shorter than its header")
        first[0] = <Py_ssize_t>taskcore_get_u32(p)
        count[0] = <Py_ssize_t>taskcore_get_u32(p + 4)
        tag[0] = p[8]
        if first[0] != self.next:
            raise _ProtocolError(
                f"{what} ext refers to frames starting at {first[0]}, but the next "
                f"unused frame is {self.next} (overlapping or out-of-order frame reference)"
            )
        if first[0] + count[0] > self.nframes:
            raise _ProtocolError(
                f"{what} ext refers to frames {first[0]}..{first[0] + count[0] - 1}, "
                f"out of range: the message has {self.nframes} frames"
            )
        self.next = first[0] + count[0]
        if self.has_device and not device_ok:
            for i in range(first[0], first[0] + count[0]):
                if not PyObject_CheckBuffer(self.frames[i]):
                    raise _ProtocolError(f"{what} ext refers to frame {i}, which is device "
                                         f"memory (only a device ext may)")
        return 0

    cdef object unpack_nested(self, bytes data, str what):
        self.depth += 1
        if self.depth > _DECODE_MAX_DEPTH:
            raise _ProtocolError(f"ext values nested deeper than {_DECODE_MAX_DEPTH}")
        try:
            # unpackb bounds every length by len(data) on its own
            obj = _unpackb(data, ext_hook=self.hook, strict_map_key=False)
        except (_ProtocolError, _PayloadError):
            raise
        except Exception as exc:
            raise _ProtocolError(
                f"malformed {what} ext payload: {type(exc).__name__}: {exc}") from exc
        self.depth -= 1
        return obj

    cdef object decode_tuple(self, bytes data):
        tup = _unpack_scalar_tuple(data)
        if tup is not None:
            return tup
        items = self.unpack_nested(data, "tuple")
        if type(items) is not list:
            raise _ProtocolError("tuple ext payload is not a msgpack array")
        return PyList_AsTuple(items)

    cdef object decode_serialized(self, bytes data):
        cdef Py_ssize_t first, count, n = PyBytes_GET_SIZE(data)
        cdef int tag, kind
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        if n < _REF_HEADER:
            raise _ProtocolError(f"Serialized ext payload is {n} bytes, shorter than its header")
        tag = p[8]
        kind = tag & 0x0F
        if kind != SER_MSGPACK and kind != SER_PICKLE:
            raise _ProtocolError(f"Serialized ext has unknown kind {kind}")
        if self.sers is None:
            self.sers = []
        if tag & _SER_REPEAT:
            first = <Py_ssize_t>taskcore_get_u32(p)
            if first >= len(self.sers) or n != _REF_HEADER:
                raise _ProtocolError(f"Serialized back-reference {first} to an object not "
                                     f"seen before in this message")
            return self.sers[first]
        if tag & (_SER_INLINE | _SER_INLINE_FRAMES):
            if taskcore_get_u32(p) != 0 or taskcore_get_u32(p + 4) != 0 or n == _REF_HEADER:
                raise _ProtocolError("inline Serialized ext has a frame reference or no payload")
            if tag & _SER_INLINE:
                out = _make_serialized(kind, [data[_REF_HEADER:]])
            else:
                if self.inline_last is None:
                    self.inline_last = [None] * _SER_INLINE_MAX_FRAMES
                out = _make_serialized(kind, _split_inline_frames(data, self.inline_last))
        else:
            self.take(data, "Serialized", &first, &count, &tag, False)
            if count < 1:
                raise _ProtocolError("Serialized ext refers to no frames")
            out = _make_serialized(kind, self.frames[first:first + count])
        self.sers.append(out)
        return out

    cdef object decode_pickle(self, bytes data):
        cdef Py_ssize_t first, count
        cdef int tag
        cdef bint lenient = self.lenient
        self.lenient = False
        self.take(data, "pickle", &first, &count, &tag, False)
        if tag == _PICKLE_INLINE:
            stream = data[_REF_HEADER:]
            buffers = self.frames[first:first + count]
        elif tag == _PICKLE_IN_FRAME:
            if count < 1:
                raise _ProtocolError("pickle ext says its stream is in a frame but refers to no frames")
            if PyBytes_GET_SIZE(data) != _REF_HEADER:
                raise _ProtocolError("pickle ext with an out-of-band stream has trailing bytes")
            stream = self.frames[first + count - 1]
            buffers = self.frames[first:first + count - 1]
        else:
            raise _ProtocolError(f"pickle ext has unknown tag {tag}")
        try:
            return _pickle_loads(stream, buffers=buffers)
        except Exception as exc:
            if lenient:
                return _LOAD_FAILED
            raise _PayloadError(exc) from exc

    cdef object decode_buffer(self, bytes data):
        cdef Py_ssize_t first, count
        cdef int tag
        self.take(data, "buffer", &first, &count, &tag, False)
        if count != 1:
            raise _ProtocolError(f"buffer ext refers to {count} frames instead of 1")
        frame = self.frames[first]
        if tag == _BUF_BYTES:
            if PyBytes_GET_SIZE(data) != _REF_HEADER:
                raise _ProtocolError("bytes buffer ext has trailing bytes")
            return frame if type(frame) is bytes else bytes(frame)
        if tag == _BUF_BYTEARRAY:
            if PyBytes_GET_SIZE(data) != _REF_HEADER:
                raise _ProtocolError("bytearray buffer ext has trailing bytes")
            return frame if type(frame) is bytearray else bytearray(frame)
        if tag == _BUF_MEMORYVIEW:
            mv = memoryview(frame)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            if PyBytes_GET_SIZE(data) == _REF_HEADER:
                return mv
            spec = self.unpack_nested(data[_REF_HEADER:], "memoryview shape")
            try:
                fmt, shape = spec
                return mv.cast(fmt, shape)
            except (TypeError, ValueError) as exc:
                raise _ProtocolError(f"memoryview ext has a bad format/shape {spec!r}: {exc}") from exc
        raise _ProtocolError(f"buffer ext has unknown tag {tag}")

    cdef object decode_device(self, bytes data):
        cdef Py_ssize_t first, count
        cdef int tag
        self.take(data, "device", &first, &count, &tag, True)
        if tag != 0:
            raise _ProtocolError(f"device ext has unknown tag {tag}")
        if PyBytes_GET_SIZE(data) == _REF_HEADER:
            raise _ProtocolError("device ext has no [family, header] after its frame reference")
        spec = self.unpack_nested(data[_REF_HEADER:], "device")
        if (type(spec) is not list or len(spec) != 2 or type(spec[0]) is not str
                or type(spec[1]) is not dict):
            raise _ProtocolError(f"device ext payload is not [family, header]: {spec!r:.200}")
        try:
            return _device().rebuild(spec[0], spec[1], self.frames[first:first + count])
        except _ProtocolError:
            raise
        except Exception as exc:        # no CUDA runtime here, out of device memory, ...
            raise _PayloadError(exc) from exc

    cdef object decode_exception(self, bytes data):
        self.lenient = True
        items = self.unpack_nested(data, "exception")
        self.lenient = False
        if (type(items) is not list or len(items) != 4 or type(items[0]) is not str
                or type(items[1]) is not str or type(items[2]) is not str):
            raise _ProtocolError("exception ext payload is not [type, message, traceback, value]")
        type_name, message, tb, value = items
        if isinstance(value, BaseException):
            exc = value
        else:
            exc = RemoteException(type_name, message)
        try:
            exc.__taskcore_traceback__ = tb
        except Exception:       # exotic exception with a read-only __dict__
            pass
        return exc


cdef _Decoder _DECODER = _Decoder()


cdef object _decode(object frames, bint wrap_payload_errors):
    """loads() proper; ``wrap_payload_errors`` turns pickle failures into ProtocolError."""
    cdef list fl
    cdef Py_ssize_t i, n
    cdef _Decoder dec
    cdef bint has_device = False
    if type(frames) is list:
        fl = <list>frames
    else:
        try:
            fl = list(frames)
        except TypeError:
            raise _ProtocolError(
                f"frames must be a list of bytes-like objects, got {type(frames).__name__}") from None
    n = len(fl)
    if n == 0:
        raise _ProtocolError("message has no frames")
    for i in range(n):
        if not PyObject_CheckBuffer(fl[i]):
            if i > 0 and _is_device_frame(fl[i]):
                has_device = True
                continue
            raise _ProtocolError(f"frame {i} is a {type(fl[i]).__name__}, not a bytes-like object")
    dec = _DECODER
    if dec.busy:
        dec = _Decoder()
    dec.acquire(fl)
    dec.has_device = has_device
    try:
        msg = _unpackb(fl[0], ext_hook=dec.hook, strict_map_key=False)
        i = dec.next
    except _ProtocolError:
        raise
    except _PayloadError as perr:
        cause = perr.args[0]
        if wrap_payload_errors:
            raise _ProtocolError(
                f"cannot unpickle a value in the message: {type(cause).__name__}: {cause}"
            ) from cause
        raise cause
    except Exception as exc:
        raise _ProtocolError(f"malformed msgpack in frame 0: {type(exc).__name__}: {exc}") from exc
    finally:
        dec.release()
    if i != n:
        raise _ProtocolError(
            f"message has {n} frames but frame 0 refers only to frames 1..{i - 1}: "
            f"{n - i} unused frame(s)"
        )
    return msg


cpdef object loads(object frames):
    """Rebuild a message from frames (bytes, bytearray or memoryview each; the frames of
    a GPU object may also be device memory, as ``dumps_device`` makes them).

    Out-of-band numpy arrays and ``Serialize``'d buffers are backed by the
    given frames (no copy); ``Serialized`` values come back as ``Serialized``.
    Any malformed input, including a pickle that fails to load, raises
    ``ProtocolError`` naming the fault (original error as ``__cause__``).
    """
    return _decode(frames, True)


# ---------------------------------------------------------------- wrappers

@cython.final
@cython.freelist(16)
cdef class Serialize:
    """Force ``obj`` out of band, keeping its exact type.

    bytes/bytearray/memoryview become one frame each, as they are (no copy);
    other objects are pickled (protocol 5, zero-copy buffers) into frames.
    ``loads`` returns the bare object.
    """

    def __cinit__(self, obj):
        self.obj = obj

    def __repr__(self):
        return f"<Serialize: {type(self.obj).__name__}>"

    def __reduce__(self):
        return (Serialize, (self.obj,))


cdef inline Serialized _make_serialized(int kind, list frames):
    cdef Serialized s = Serialized.__new__(Serialized)
    s.kind = kind
    s.frames = frames
    return s


def _rebuild_serialized(kind, frames):
    # module-level so pickle can find it by reference
    return Serialized(kind, list(frames))


# Two threads unpickling (a worker's task threads) may each import a module the other
# is importing; CPython's import-deadlock detection then hands one of them the
# half-made module ("cannot import name ... from partially initialized module ..."),
# and the other may then miss the package that failed (a KeyError in importlib).
# Serialized.deserialize therefore unpickles one thread at a time. Against an import
# in some other code (a task importing while a run spec is unpickled) a failure of
# that kind is retried, one thread at a time, until the other import is done (a real
# circular import fails the same way for IMPORT_RACE_TIMEOUT seconds, then raises).
IMPORT_RACE_TIMEOUT = 10.0
cdef object _import_race_lock = threading.Lock()
cdef object _unpickle_lock = threading.RLock()


cdef bint _import_race(object e):
    return "partially initialized module" in str(e)


def load_after_imports(build):
    """`build()`, retried while it fails because another thread is still importing."""
    deadline = time.monotonic() + IMPORT_RACE_TIMEOUT
    with _import_race_lock:
        while True:
            try:
                return build()
            except (ImportError, AttributeError) as e:
                if not _import_race(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)


@cython.final
@cython.freelist(256)
cdef class Serialized:
    """An already-serialized object: a kind and its frames.

    ``loads`` hands it back as is (the scheduler never unpickles run specs);
    ``dumps`` emits its frames as they are (no copy). ``deserialize()`` builds
    the object. kind 0 ("msgpack"): frames are a ``dumps()`` message; kind 1
    ("pickle"): frames[0] is a pickle stream, frames[1:] its buffers.
    """

    # __cinit__ takes no arguments so that the internal factory
    # (_make_serialized, once per task at the scheduler) skips argument
    # parsing; the public constructor validates in __init__.
    def __cinit__(self):
        self._nbytes = -1

    def __init__(self, int kind, list frames not None):
        if kind != SER_MSGPACK and kind != SER_PICKLE:
            raise ValueError(f"unknown Serialized kind {kind}")
        if len(frames) == 0:
            raise ValueError("Serialized needs at least one frame")
        self.kind = kind
        self.frames = frames

    @property
    def serializer(self):
        return "msgpack" if self.kind == SER_MSGPACK else "pickle"

    @property
    def nbytes(self):
        """Total size of the frames in bytes."""
        cdef Py_ssize_t total = 0
        if self._nbytes < 0:
            for f in self.frames:
                total += _buffer_nbytes(f)
            self._nbytes = total
        return self._nbytes

    def deserialize(self):
        """Build the object. Errors from unpickling user code propagate as they are."""
        # One thread at a time: unpickling holds the GIL anyway, and two threads that
        # import one package at once can hand each other half-made modules (below).
        with _unpickle_lock:
            try:
                return self._build()
            except (ImportError, AttributeError) as e:
                if not _import_race(e):
                    raise
        return load_after_imports(lambda: self._build())

    cdef object _build(self):
        if self.kind == SER_PICKLE:
            if len(self.frames) == 1:      # no buffers: skip the keyword call
                return _pickle_loads(self.frames[0])
            return _pickle_loads(self.frames[0], buffers=self.frames[1:])
        return _decode(self.frames, False)

    def __repr__(self):
        return f"<Serialized {self.serializer} nbytes={self.nbytes} frames={len(self.frames)}>"

    def __reduce_ex__(self, protocol):
        # protocol 5 keeps large frames out of band (zero copy) when the
        # pickler has a buffer_callback; older protocols copy into bytes.
        if protocol >= 5:
            frames = [pickle.PickleBuffer(f) for f in self.frames]
        else:
            frames = [bytes(f) for f in self.frames]
        return (_rebuild_serialized, (self.kind, frames))


cdef bint _is_native(object obj, int depth):
    """True when msgpack (plus the tuple ext) carries obj exactly, type included."""
    cdef type t = type(obj)
    if obj is None or t is str or t is bool or t is float:
        return True
    if t is int:
        return -0x8000000000000000 <= obj <= 0xFFFFFFFFFFFFFFFF
    if t is bytes:
        return PyBytes_GET_SIZE(obj) <= _SERIALIZE_OBJ_BYTES_OOB
    if depth >= _NATIVE_MAX_DEPTH:
        return False
    if t is list or t is tuple:
        for x in obj:
            if not _is_native(x, depth + 1):
                return False
        return True
    if t is dict:
        for k, v in (<dict>obj).items():
            if not _is_native(k, depth + 1) or not _is_native(v, depth + 1):
                return False
        return True
    # GPU objects travel as an EXT_DEVICE of the message format (not pickled by their
    # library, which would copy them to host inside the pickle stream).
    return _device_family(obj) is not None


cpdef Serialized serialize_obj(object obj):
    """Serialize ``obj`` once into a ``Serialized`` (e.g. a run spec).

    msgpack when obj is msgpack-native (tuples included; GPU objects, and lists,
    tuples and dicts of them, as EXT_DEVICE with host copies of their memory); exceptions and
    bytes-likes through the message format (traceback text, zero copy);
    everything else pickle protocol 5 (cloudpickle for functions, lambdas,
    closures and ``__main__`` objects) with out-of-band buffers.
    """
    cdef type t = type(obj)
    cdef _Encoder enc
    cdef list frames
    if t is Serialized:
        return <Serialized>obj
    if t is Serialize:
        return _make_serialized(SER_MSGPACK, dumps(obj))
    if _is_native(obj, 0):
        return _make_serialized(SER_MSGPACK, dumps(obj))
    if t is bytes or t is bytearray or t is memoryview:
        return _make_serialized(SER_MSGPACK, dumps(Serialize(obj)))
    if isinstance(obj, BaseException):
        return _make_serialized(SER_MSGPACK, dumps(obj))
    enc = _acquire_encoder()
    try:
        data = enc.pickle(obj)
        frames = enc.frames
    finally:
        enc.release()
    frames[0] = data
    return _make_serialized(SER_PICKLE, frames)


# -------------------------------------------------------------------- sizes

cpdef Py_ssize_t nbytes(object obj) except -1:
    """Size in bytes of a result, for the scheduler's bookkeeping.

    Exact for bytes-likes, numpy arrays, pandas Series (anything with an int
    ``nbytes``), Serialized/Serialize, pandas DataFrames (shallow
    ``memory_usage``) and GPU objects (their device memory); ``sys.getsizeof``
    (shallow) for everything else.
    """
    cdef type t = type(obj)
    if t is bytes:
        return PyBytes_GET_SIZE(obj)
    if t is bytearray:
        return PyByteArray_GET_SIZE(obj)
    if t is memoryview:
        return (<memoryview>obj).nbytes
    if t is Serialized:
        return (<Serialized>obj).nbytes
    if t is Serialize:
        return nbytes((<Serialize>obj).obj)
    try:
        n = getattr(obj, "nbytes", None)
        if n is not None and not callable(n):
            return n.__index__()
        if t.__module__.startswith("pandas"):
            return int(obj.memory_usage(index=True, deep=False).sum())
        fam = _device_family(obj)
        if fam is not None:
            return fam.nbytes(obj)
    except Exception:
        pass
    return _getsizeof(obj)


cpdef Py_ssize_t device_nbytes(object obj) except -2:
    """The bytes of a GPU object (its type exposes ``__cuda_array_interface__``), or -1
    for anything else: one dict lookup for a type seen before."""
    fam = _device_family(obj)
    if fam is None:
        return -1
    return fam.nbytes(obj)


# -------------------------------------------------------------- compression

cdef bint _worth_compressing(object view, Py_ssize_t n, Py_ssize_t sample_size, double min_ratio):
    """Compress a sample (start and middle of the frame) and see if it shrinks."""
    cdef Py_ssize_t half
    if n <= sample_size:
        sample = view
    else:
        half = sample_size // 2
        sample = bytes(view[:half]) + bytes(view[n // 2:n // 2 + half])
    cdef Py_ssize_t slen = _buffer_nbytes(sample)
    return len(_lz4_compress(sample, store_size=False)) < min_ratio * slen


def compress_frames(frames, Py_ssize_t min_size=10_000, *, Py_ssize_t sample_size=10_000,
                    double min_ratio=0.9):
    """LZ4-compress the frames that are over ``min_size`` and compressible.

    Returns ``(frames, flags)``: flags is ``bytes`` with one entry per frame,
    0 = sent as is (same object), 1 = lz4 block format with stored size. A
    frame is compressed only when a sample shrinks below ``min_ratio`` of its
    size, and kept only when the whole frame does too.
    """
    cdef list out = []
    cdef Py_ssize_t i = 0, n
    cdef bytearray flags = bytearray(len(frames))
    for f in frames:
        n = _buffer_nbytes(f)
        if n > min_size and n <= LZ4_MAX_INPUT_SIZE:
            view = memoryview(f)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if _worth_compressing(view, n, sample_size, min_ratio):
                c = _lz4_compress(view, store_size=True)
                if PyBytes_GET_SIZE(c) < min_ratio * n:
                    out.append(c)
                    flags[i] = 1
                    i += 1
                    continue
        out.append(f)
        i += 1
    return out, bytes(flags)


def decompress_frames(frames, flags, Py_ssize_t max_size=LZ4_MAX_INPUT_SIZE):
    """Undo ``compress_frames``. ``max_size`` bounds each decompressed frame.

    The size stored in an lz4 frame is checked against ``max_size`` and against
    what lz4 can physically expand to, before anything is allocated.
    Decompressed frames are bytearrays (writable, like received frames).
    """
    cdef list out
    cdef Py_ssize_t i, n, size, nframes
    cdef Py_buffer view
    cdef const unsigned char* fp
    cdef unsigned int flag
    cdef list fl = list(frames)
    cdef bytes fb
    if type(flags) is bytes:
        fb = <bytes>flags
    else:
        try:
            fb = bytes(flags)
        except (TypeError, ValueError) as exc:
            raise _ProtocolError(f"compression flags must be integers 0..255: {exc}") from exc
    nframes = len(fl)
    if PyBytes_GET_SIZE(fb) != nframes:
        raise _ProtocolError(f"{PyBytes_GET_SIZE(fb)} compression flags for {nframes} frames")
    fp = <const unsigned char*>PyBytes_AS_STRING(fb)
    for i in range(nframes):
        if fp[i] != 0:
            break
    else:
        return fl                   # nothing compressed: the common case
    out = fl[:i]
    for i in range(i, nframes):
        f = fl[i]
        flag = fp[i]
        if flag == 0:
            out.append(f)
            continue
        if flag != 1:
            raise _ProtocolError(f"unknown compression flag {flag} on frame {i}")
        if not PyObject_CheckBuffer(f):
            raise _ProtocolError(f"frame {i} is a {type(f).__name__}, not a bytes-like object")
        PyObject_GetBuffer(f, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n < 4:
                raise _ProtocolError(f"lz4 frame {i} is {n} bytes, too short for its size header")
            size = <Py_ssize_t>taskcore_get_u32(<const unsigned char*>view.buf)
        finally:
            PyBuffer_Release(&view)
        if size > max_size:
            raise _ProtocolError(
                f"lz4 frame {i} claims {size} decompressed bytes, over the limit of {max_size}")
        if size > (n - 4) * _LZ4_MAX_RATIO + 64:
            raise _ProtocolError(
                f"lz4 frame {i} claims {size} decompressed bytes from {n - 4} compressed "
                f"bytes, more than lz4 can produce")
        try:
            out.append(_lz4_decompress(f, return_bytearray=True))
        except Exception as exc:
            raise _ProtocolError(f"corrupt lz4 data in frame {i}: {exc}") from exc
    return out
