# Frame header encoding and the incremental frame decoder (see wire.pyx).

cdef class Limits:
    # Upper bounds for untrusted input, checked before any allocation.
    cdef readonly Py_ssize_t max_frames        # frames per message
    cdef readonly Py_ssize_t max_frame_size    # bytes per frame
    cdef readonly Py_ssize_t max_message_size  # bytes per message (all frames)

cpdef Py_ssize_t frame_nbytes(object frame) except -1
cpdef bytes encode_header(list frames, object flags=*)
cpdef list encode(list frames, object flags=*)

cdef class FrameDecoder:
    cdef public Limits limits          # limits for the message being decoded
    cdef public Limits next_limits     # if set: replaces limits after the first message
    # Scratch buffer: bytes [start, end) are received but not yet consumed.
    # Invariant: 0 <= start <= end <= len(scratch).
    cdef bytearray scratch
    cdef object scratch_view
    cdef Py_ssize_t start, end
    cdef Py_ssize_t max_scratch        # the scratch starts small and grows to this
    cdef Py_ssize_t offered            # size of the last scratch view handed out
    cdef Py_ssize_t direct_threshold   # frames at least this large are read in place
    cdef int state                     # DecoderState
    cdef Py_ssize_t nframes, frame_index
    cdef list frames                   # completed frames of the current message
    cdef list flags                    # per-frame flags, or None when all are 0
    cdef list lengths
    # ST_DIRECT: one large frame being filled in place; direct_filled <= direct_len.
    cdef object direct                 # bytearray, or RecvBuffer when large
    cdef object direct_view
    cdef Py_ssize_t direct_filled, direct_len
    cdef Py_ssize_t direct_cap         # bytes of `direct` allocated so far (grows as data arrives)

    cpdef object get_buffer(self, Py_ssize_t sizehint=*)
    cpdef list buffer_updated(self, Py_ssize_t nbytes)
    cdef void _compact(self)
    cdef int _grow(self, Py_ssize_t new_size) except -1
    cdef int _fail(self, str why) except -1
    cdef int _parse(self, list out) except -1
