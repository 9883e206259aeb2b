# Table of contents of taskcore.core.serialize for other Cython modules
# (protocol.pyx, worker_state.pyx) that want C-level access.
#
# Invariants:
# - Serialized.kind is SER_MSGPACK or SER_PICKLE, and frames is a non-empty
#   list of bytes-like objects. Both are fixed after construction: a
#   Serialized is shared between messages and must never be mutated.
# - Serialized frames are emitted by dumps() as they are (same objects), so a
#   received run spec is forwarded without copying or unpickling.

cimport cython

cdef enum:
    # Serialized.kind
    SER_MSGPACK = 0   # frames are a dumps() message: frame 0 msgpack + out-of-band frames
    SER_PICKLE = 1    # frames[0] is a pickle stream, frames[1:] its out-of-band buffers


@cython.final
cdef class Serialized:
    cdef readonly int kind
    cdef readonly list frames
    cdef Py_ssize_t _nbytes       # -1 until first asked for
    cdef object _build(self)      # deserialize() without its retry of a lost import race


@cython.final
cdef class Serialize:
    cdef readonly object obj


cpdef list dumps(object msg)
cpdef list dumps_device(object msg)
cpdef object loads(object frames)
cpdef Serialized serialize_obj(object obj)
cpdef Py_ssize_t nbytes(object obj) except -1
cpdef Py_ssize_t device_nbytes(object obj) except -2
